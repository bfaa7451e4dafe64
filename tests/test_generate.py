"""Reference generation (contiguous KV cache) and the command line."""

import pytest
import torch

import gptoss
from gptoss.generate import generate_greedy_uncached, generate_tokens
from serve import cli


@pytest.fixture(scope="module")
def window8_model(tmp_path_factory):
    # A short window so a few dozen tokens of cached decoding cross it many times.
    config = gptoss.get_preset("tiny").replace(sliding_window=8, num_hidden_layers=3)
    path = gptoss.write_random_checkpoint(tmp_path_factory.mktemp("w8"), config, seed=11)
    return gptoss.load_model(path, dtype=torch.float32)


def test_cached_decoding_matches_the_full_forward_pass_token_for_token(window8_model):
    prompt = torch.randint(0, 199998, (13,), generator=torch.Generator().manual_seed(0)).tolist()
    cached = list(generate_tokens(window8_model, prompt, max_tokens=30, stop_token_ids=()))
    assert cached == generate_greedy_uncached(window8_model, prompt, max_tokens=30, stop_token_ids=())
    assert len(set(cached)) > 3  # not a degenerate repetition


def test_generation_stops_on_a_stop_token(window8_model):
    prompt = [1, 2, 3]
    first = next(generate_tokens(window8_model, prompt, max_tokens=5))
    assert list(generate_tokens(window8_model, prompt, max_tokens=5, stop_token_ids=(first,))) == [first]


def test_same_seed_gives_the_same_sample(window8_model):
    def run(seed):
        return list(generate_tokens(window8_model, [5, 6, 7], 12, stop_token_ids=(), temperature=1.0,
                                    top_p=0.9, seed=seed))

    assert run(3) == run(3)
    assert run(3) != run(4)


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt_ids=[]), "prompt_ids"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(prompt_ids=[201088]), "prompt_ids"),
], ids=["empty-prompt", "max-tokens", "temperature", "top-p", "out-of-vocab"])
def test_bad_generation_parameters_name_the_field(window8_model, kwargs, field):
    args = dict(prompt_ids=[1, 2], max_tokens=4) | kwargs
    with pytest.raises(ValueError, match=field):
        next(generate_tokens(window8_model, **args))


def test_cli_writes_a_checkpoint_and_chats_with_it(tmp_path, capsys):
    assert cli.main(["checkpoint", "--preset", "tiny", "--out", str(tmp_path / "ck"), "--seed", "2"]) == 0
    assert (tmp_path / "ck" / "model.safetensors.index.json").exists()
    code = cli.main(["generate", "--checkpoint", str(tmp_path / "ck"), "--prompt", "Hello there",
                     "--max-tokens", "6", "--dtype", "float32", "--show-analysis"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "6 generated" in err and "stopped by max_tokens" in err
    assert "[analysis]" in out and "raw completion" in out


def test_cli_reports_a_broken_checkpoint_without_a_traceback(tmp_path, capsys):
    code = cli.main(["generate", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "hi"])
    assert code == 2
    assert "no such checkpoint folder" in capsys.readouterr().err
