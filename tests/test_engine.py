"""engine/: the Engine end to end on a tiny random model, against the reference path."""

from __future__ import annotations

import random

import pytest
import torch

import gptoss
from engine import DEFAULT_STOP_TOKEN_IDS, Engine, EngineConfig, InvalidRequestError, SamplingParams
from tests.engine_helpers import (
    WINDOW_CONFIG,
    assert_pool_empty,
    drive,
    greedy,
    make_prompts,
    reference_greedy,
)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> gptoss.Transformer:
    path = gptoss.write_random_checkpoint(tmp_path_factory.mktemp("engine-w8"), WINDOW_CONFIG, seed=5)
    return gptoss.load_model(path, dtype=torch.float32)


def make_engine(model, **config) -> Engine:
    return Engine(model, EngineConfig(**({"block_size": 4, "num_kv_blocks": 256, "max_num_seqs": 8} | config)))


# --- greedy equality with the reference path ---------------------------------------------------


@pytest.mark.parametrize("config", [
    dict(max_num_batched_tokens=16, max_num_seqs=8),
    dict(max_num_batched_tokens=64, max_num_seqs=3, enable_chunked_prefill=False, block_size=8),
    dict(max_num_batched_tokens=512, max_num_seqs=16, block_size=16, enable_prefix_caching=False),
], ids=["chunked-prefill-mixed-with-decodes", "whole-prompts-few-seqs", "one-big-step"])
def test_greedy_outputs_equal_the_reference_for_requests_arriving_at_different_steps(model, config):
    lengths = [1, 7, 33, 12, 50, 3, 21, 9]
    max_tokens = [12, 5, 16, 9, 14, 20, 1, 11]
    prompts = make_prompts(lengths, seed=1)
    schedule = {0: [0, 1, 2], 2: [3], 3: [4, 5], 9: [6, 7]}
    arrivals = {step: [(f"r{i}", prompts[i], greedy(max_tokens[i])) for i in ids] for step, ids in schedule.items()}
    engine = make_engine(model, **config)
    tokens, reasons = drive(engine, arrivals)
    for i, prompt in enumerate(prompts):
        assert tokens[f"r{i}"] == reference_greedy(model, prompt, max_tokens[i]), f"request r{i}"
        assert reasons[f"r{i}"] == "length"
    assert_pool_empty(engine)


def test_greedy_outputs_equal_the_reference_across_preemption_and_recompute(model):
    prompts = make_prompts([20, 26, 17, 31, 23, 9], seed=2)
    engine = make_engine(model, num_kv_blocks=40, max_num_batched_tokens=16, max_num_seqs=6)
    tokens, _ = drive(engine, {0: [(f"r{i}", p, greedy(16)) for i, p in enumerate(prompts)]})
    assert engine.get_stats().num_preemptions > 0
    for i, prompt in enumerate(prompts):
        assert tokens[f"r{i}"] == reference_greedy(model, prompt, 16), f"request r{i}"
    assert_pool_empty(engine)


def test_prefix_cache_hit_computes_only_the_new_tokens_and_gives_identical_outputs(model):
    engine = make_engine(model, max_num_batched_tokens=64)
    shared = make_prompts([30], seed=3)[0]
    first, second = shared + [11, 12, 13], shared + [21, 22, 23, 24, 25]
    [done_first] = engine.generate([first], greedy(6))
    assert done_first.num_cached_tokens == 0
    before = engine.get_stats()
    [done] = engine.generate([second], greedy(6))
    after = engine.get_stats()
    # 7 full blocks of 4 shared tokens are reused; the window (8) of the sliding layers is among them.
    assert done.num_cached_tokens == 28
    assert after.num_scheduled_tokens - before.num_scheduled_tokens == len(second) - 28 + 6 - 1
    assert list(done.token_ids) == reference_greedy(model, second, 6)
    assert after.prefix_cache_hit_tokens == 28 and after.prefix_cache_hit_rate == pytest.approx(28 / (33 + 35))
    # The same prompt again: everything but the last token (whose logits are needed) comes from the cache.
    [again] = engine.generate([second], greedy(6))
    assert again.num_cached_tokens == 32 and again.token_ids == done.token_ids
    assert_pool_empty(engine)


def test_the_same_prompt_under_two_cache_salts_shares_no_block_and_gives_the_same_tokens(model):
    engine = make_engine(model, max_num_batched_tokens=64)
    prompt = make_prompts([30], seed=16)[0]

    def run(rid: str, salt: str):
        engine.add_request(rid, prompt, greedy(4), cache_salt=salt)
        return drive(engine, {})[0][rid], engine.get_stats().prefix_cache_hit_tokens

    tokens_a, hits = run("a", "tenant-a")
    assert hits == 0
    tokens_b, hits = run("b", "tenant-b")  # another tenant: nothing of tenant a's cache is used
    assert hits == 0 and tokens_b == tokens_a
    tokens_a2, hits = run("a2", "tenant-a")  # the first tenant again: its blocks are there
    assert hits == 28 and tokens_a2 == tokens_a
    with pytest.raises(InvalidRequestError, match="cache_salt"):
        engine.add_request("bad", prompt, greedy(1), cache_salt=b"bytes")
    assert_pool_empty(engine)


def test_sliding_window_layers_hold_a_bounded_number_of_blocks_as_a_sequence_grows(model):
    engine = make_engine(model, max_num_batched_tokens=16)
    prompt = make_prompts([10], seed=4)[0]
    engine.add_request("long", prompt, greedy(70))
    held, tokens = [], []
    while engine.has_work():
        for out in engine.step():
            tokens.extend(out.new_token_ids)
        if engine.has_work():
            held.append(engine.kv.get_num_blocks_held("long"))  # (full layers, sliding layers)
    assert tokens == reference_greedy(model, prompt, 70)
    full, sliding = zip(*held, strict=True)
    assert full[-1] == -(-(10 + 70) // 4)  # the whole context, in blocks of 4
    # A decode sees 8 tokens: 7 cached + itself, at most 3 blocks of 4 (misaligned), never more.
    assert max(sliding[2:]) <= 3 and max(full) > 6 * max(sliding)


def test_abort_frees_every_block_and_is_reported_by_the_next_step(model):
    engine = make_engine(model, max_num_seqs=2, max_num_batched_tokens=40)
    prompts = make_prompts([5, 50, 6], seed=6)
    for rid, prompt in zip("bac", prompts, strict=True):
        engine.add_request(rid, prompt, greedy(20))
    engine.step()  # b: whole prompt; a: a first chunk of 35; c: waits (max_num_seqs)
    assert engine.get_stats().num_waiting == 1 and engine.kv.num_used_blocks > 0
    assert engine.abort("a") and engine.abort("c") and not engine.abort("nope")
    outputs = {o.request_id: o for o in engine.step()}
    assert outputs["a"].finish_reason == "abort" and outputs["c"].finish_reason == "abort"
    assert outputs["b"].finish_reason is None and len(outputs["b"].new_token_ids) == 1
    assert not engine.abort("a")
    assert engine.abort("b")
    assert [o.finish_reason for o in engine.step()] == ["abort"]
    assert not engine.has_work()
    assert_pool_empty(engine)


def test_stress_of_random_requests_and_aborts_returns_the_pool_to_empty(model):
    rng = random.Random(0)
    engine = make_engine(model, num_kv_blocks=32, max_num_batched_tokens=24, max_num_seqs=6)
    live: list[str] = []
    expected: dict[str, tuple[list[int], int]] = {}
    tokens: dict[str, list[int]] = {}
    aborted: set[str] = set()
    for step in range(160):
        if rng.random() < 0.4:
            rid = f"s{step}"
            prompt = make_prompts([rng.randint(1, 40)], seed=step)[0]
            n = rng.randint(1, 16)
            kind = rng.choice(["greedy", "greedy", "sampled", "penalised"])
            params = {"greedy": greedy(n, logprobs=rng.choice([None, 2])),
                      "sampled": SamplingParams(max_tokens=n, temperature=0.8, top_p=0.9, stop_token_ids=(),
                                                seed=rng.choice([None, step])),
                      "penalised": greedy(n, presence_penalty=0.5, frequency_penalty=0.5)}[kind]
            engine.add_request(rid, prompt, params)
            live.append(rid)
            tokens[rid] = []
            if kind == "greedy":
                expected[rid] = (prompt, n)
        if live and rng.random() < 0.08:
            rid = live.pop(rng.randrange(len(live)))
            engine.abort(rid)
            aborted.add(rid)
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished and out.request_id in live:
                live.remove(out.request_id)
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    stats = engine.get_stats()
    assert stats.num_preemptions > 0 and len(aborted) > 2
    assert_pool_empty(engine)
    checked = [rid for rid in expected if rid not in aborted]
    assert len(checked) > 10
    for rid in checked:
        prompt, n = expected[rid]
        assert tokens[rid] == reference_greedy(model, prompt, n), rid


def test_the_engine_runs_a_bfloat16_model_with_a_bfloat16_kv_cache(model, tmp_path):
    path = gptoss.write_random_checkpoint(tmp_path / "bf16", WINDOW_CONFIG, seed=5)
    bf16 = gptoss.load_model(path, dtype=torch.bfloat16)
    engine = make_engine(bf16)
    assert engine.runner.kv_cache.dtype == torch.bfloat16
    prompts = make_prompts([12, 30], seed=15)
    done = engine.generate(prompts, greedy(5))
    for prompt, completion in zip(prompts, done, strict=True):
        # bfloat16 rounding may part ways with the reference after a while; the first token agrees.
        assert len(completion.token_ids) == 5
        assert completion.token_ids[0] == reference_greedy(bf16, prompt, 1)[0]
    assert_pool_empty(engine)


def test_max_tokens_ends_a_request_with_finish_reason_length(model):
    [done] = make_engine(model).generate([[5, 6, 7]], greedy(3))
    assert len(done.token_ids) == 3 and done.finish_reason == "length"


# --- sampling ----------------------------------------------------------------------------------


def test_same_seed_gives_the_same_tokens_whatever_else_is_in_the_batch(model):
    prompt = make_prompts([9], seed=7)[0]
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234, stop_token_ids=())
    [alone] = make_engine(model).generate([prompt], seeded)
    others = make_prompts([25, 4, 13], seed=8)
    crowd = {0: [("x0", others[0], SamplingParams(max_tokens=20, temperature=1.0, stop_token_ids=()))],
             2: [("seeded", prompt, seeded), ("x1", others[1], greedy(3))],
             3: [("x2", others[2], SamplingParams(max_tokens=9, temperature=0.7, seed=5, stop_token_ids=()))]}
    tokens, _ = drive(make_engine(model, max_num_batched_tokens=8), crowd)
    assert tokens["seeded"] == list(alone.token_ids)
    [other_seed] = make_engine(model).generate([prompt], SamplingParams(**{**seeded.__dict__, "seed": 99}))
    assert other_seed.token_ids != alone.token_ids


def test_a_stop_token_ends_the_request_and_is_part_of_its_output(model):
    prompt = make_prompts([6], seed=9)[0]
    ref = reference_greedy(model, prompt, 8)
    [done] = make_engine(model).generate([prompt], SamplingParams.greedy(max_tokens=8, stop_token_ids=(ref[3],)))
    assert list(done.token_ids) == ref[:ref.index(ref[3]) + 1] and done.finish_reason == "stop"


def test_the_default_stop_tokens_are_harmonys_return_and_call():
    from gptoss.tokenizer import CALL_ID, RETURN_ID, STOP_TOKEN_IDS, get_encoding

    # engine/sampling_params.py spells the ids out (it does not import the tokenizer): check the literal.
    assert set(DEFAULT_STOP_TOKEN_IDS) == set(STOP_TOKEN_IDS) == {RETURN_ID, CALL_ID}
    assert set(DEFAULT_STOP_TOKEN_IDS) == set(get_encoding().stop_tokens_for_assistant_actions())
    assert len(DEFAULT_STOP_TOKEN_IDS) == len(set(DEFAULT_STOP_TOKEN_IDS))


def test_logprobs_are_the_models_distribution_at_each_generated_position(model):
    prompt = make_prompts([11], seed=10)[0]
    [done] = make_engine(model).generate([prompt], greedy(4, logprobs=3))
    ref = torch.log_softmax(model(torch.tensor(prompt + list(done.token_ids[:-1])))[len(prompt) - 1:], dim=-1)
    assert len(done.logprobs) == 4
    for row, lp in zip(ref, done.logprobs, strict=True):
        values, ids = row.topk(3)
        assert lp.top_token_ids == tuple(ids.tolist()) and lp.token_id == ids[0].item()  # greedy: the top one
        assert lp.top_logprobs == pytest.approx(values.tolist(), abs=1e-4)
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)


def test_generate_runs_greedy_and_sampled_requests_together(model):
    prompts = make_prompts([5, 8], seed=12)
    done = make_engine(model).generate(prompts, [greedy(6), SamplingParams(max_tokens=6, seed=1, stop_token_ids=())])
    assert list(done[0].token_ids) == reference_greedy(model, prompts[0], 6)
    assert len(done[1].token_ids) == 6 and done[1].logprobs is None


# --- requests that never run ---------------------------------------------------------------------


BAD_REQUESTS = [
    ("empty-prompt", lambda: ([], greedy(4)), "prompt_token_ids", "must not be empty"),
    ("token-out-of-vocab", lambda: ([1, 201088], greedy(4)), "prompt_token_ids", r"in \[0, 201088\)"),
    ("negative-token", lambda: ([-1, 5], greedy(4)), "prompt_token_ids", r"in \[0, 201088\)"),
    ("negative-temperature", lambda: ([1, 2], SamplingParams(temperature=-0.5)), "temperature", ">= 0"),
    ("top-p-zero", lambda: ([1, 2], SamplingParams(top_p=0.0)), "top_p", r"in \(0, 1\]"),
    ("top-p-above-one", lambda: ([1, 2], SamplingParams(top_p=1.5)), "top_p", r"in \(0, 1\]"),
    ("top-k-negative", lambda: ([1, 2], SamplingParams(top_k=-1)), "top_k", ">= 0"),
    ("min-p-above-one", lambda: ([1, 2], SamplingParams(min_p=2.0)), "min_p", r"in \[0, 1\]"),
    ("penalty-out-of-range", lambda: ([1, 2], SamplingParams(frequency_penalty=2.5)), "frequency_penalty", "2"),
    ("max-tokens-zero", lambda: ([1, 2], SamplingParams(max_tokens=0)), "max_tokens", ">= 1"),
    ("prompt-plus-max-tokens-too-long", lambda: ([1] * 60, greedy(5)), "max_tokens", "<= 4"),
    ("prompt-too-long", lambda: ([1] * 64, greedy(1)), "prompt_token_ids", "at most 63 fit"),
    ("too-many-logprobs", lambda: ([1, 2], greedy(2, logprobs=21)), "logprobs", "<= 20"),
    ("stop-id-out-of-vocab", lambda: ([1, 2], SamplingParams(stop_token_ids=(201088,))), "stop_token_ids", "201088"),
    ("bad-seed", lambda: ([1, 2], SamplingParams(seed=-3)), "seed", "seed"),
    ("duplicate-id", lambda: ([1, 2], greedy(2)), "request_id", "already"),
]


@pytest.mark.parametrize("make, field, match", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_named_errors_and_do_not_disturb_running_requests(model, make, field, match):
    engine = make_engine(model, max_model_len=64)
    good = make_prompts([10], seed=13)[0]
    engine.add_request("good", good, greedy(6))
    tokens = [t for out in engine.step() for t in out.new_token_ids]
    with pytest.raises(InvalidRequestError, match=match) as info:
        prompt, params = make()
        engine.add_request("good" if field == "request_id" else "bad", prompt, params)
    assert info.value.param == field and field in str(info.value)
    while engine.has_work():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert tokens == reference_greedy(model, good, 6)
    assert_pool_empty(engine)


def test_a_request_larger_than_the_whole_kv_pool_is_rejected_up_front(model):
    engine = make_engine(model, num_kv_blocks=12, max_num_batched_tokens=8)
    # 11 usable blocks: full layers ceil(n / 4) + sliding layers at most 5 -> 24 tokens at most.
    assert engine.max_model_len == 24
    with pytest.raises(InvalidRequestError, match=r"max_tokens must be <= 4 \(24 tokens of what the KV cache") as info:
        engine.add_request("big", [1] * 20, greedy(10))
    assert info.value.param == "max_tokens"
    with pytest.raises(ValueError, match="max_model_len must be <= 24"):
        make_engine(model, num_kv_blocks=12, max_num_batched_tokens=8, max_model_len=100)


# --- lockstep ------------------------------------------------------------------------------------


def test_an_empty_step_still_runs_every_moe_layer_on_zero_tokens(model):
    engine = make_engine(model)
    seen: list[int] = []
    hooks = [block.mlp.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
             for block in model.layers]
    try:
        assert engine.step() == []
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == [0] * WINDOW_CONFIG.num_hidden_layers
    assert engine.get_stats().num_steps == 1 and not engine.has_work()


def test_a_step_runs_through_the_models_own_attention_modules(model):
    engine = make_engine(model)
    seen: list[tuple[int, int]] = []
    hooks = [block.self_attn.register_forward_hook(lambda mod, args, out: seen.append((mod.layer, args[0].shape[0])))
             for block in model.layers]
    try:
        engine.add_request("a", make_prompts([5], seed=15)[0], greedy(1))
        engine.step()
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == [(layer, 5) for layer in range(WINDOW_CONFIG.num_hidden_layers)]


def test_stats_report_queues_blocks_and_tokens_per_step(model):
    engine = make_engine(model, max_num_seqs=1, max_num_batched_tokens=8)
    for rid, prompt in zip("ab", make_prompts([12, 3], seed=14), strict=True):
        engine.add_request(rid, prompt, greedy(3))
    engine.step()
    stats = engine.get_stats()
    assert (stats.num_running, stats.num_waiting) == (1, 1)
    assert stats.last_step_num_tokens == 8 and stats.num_kv_blocks == 255
    assert stats.num_kv_blocks_used + stats.num_kv_blocks_free == stats.num_kv_blocks
    assert stats.kv_block_bytes == 2 * 2 * WINDOW_CONFIG.kv_size * 4 * 4  # 2 layer slots, K+V, 4 tokens, fp32
    assert 0 < stats.forward_time_s <= stats.step_time_s


# --- resuming a request elsewhere ---------------------------------------------------------------


@pytest.mark.parametrize("sampling", [
    greedy(24),
    SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=11, stop_token_ids=()),
    SamplingParams(max_tokens=24, temperature=0.8, seed=12, presence_penalty=1.5, frequency_penalty=1.0,
                   stop_token_ids=()),
], ids=["greedy", "seeded", "seeded-with-penalties"])
def test_a_request_resumed_on_another_engine_goes_on_with_the_tokens_it_would_have_made(model, sampling):
    """The engine a stream moves to gets the prompt and what was generated so far; it prefills both and
    samples the rest: the same tokens, as a seeded request's noise depends only on (seed, position) and
    the penalties count the resumed tokens as outputs."""
    prompt = make_prompts([19], seed=21)[0]
    [whole] = make_engine(model).generate([prompt], sampling)
    for cut in (1, 9, 23):
        other = make_engine(model, max_num_batched_tokens=8)  # a different chunking and batch
        other.add_request("noise", make_prompts([11], seed=22)[0], SamplingParams(max_tokens=30, temperature=1.0))
        other.add_request("moved", prompt, sampling, resumed_token_ids=whole.token_ids[:cut])
        tokens, finish = [], None
        while finish is None:
            for out in other.step():
                if out.request_id == "moved":
                    tokens += out.new_token_ids
                    finish = out.finish_reason
                    assert out.num_prompt_tokens == len(prompt)
        assert tokens == list(whole.token_ids[cut:]) and finish == "length", f"cut at {cut}"


def test_resumed_tokens_are_checked_like_a_prompt(model):
    engine = make_engine(model)
    with pytest.raises(InvalidRequestError, match="resumed_token_ids"):
        engine.add_request("a", [1, 2], greedy(4), resumed_token_ids=[1, 2, 3, 4])  # nothing left to generate
    with pytest.raises(InvalidRequestError, match="resumed_token_ids"):
        engine.add_request("b", [1, 2], greedy(4), resumed_token_ids=[10**9])


def test_a_renamed_output_differs_from_its_original_in_the_request_id_only():
    """RequestOutput.renamed spells out every field (dataclasses.replace is 2.5x slower, per token on the
    serving path): a field added later and left out of it fails here."""
    import dataclasses

    from engine.outputs import RequestOutput, TokenLogprobs

    values = {"request_id": "r#1", "new_token_ids": (1, 2), "new_logprobs": (TokenLogprobs(1, -0.1, (1,), (-0.1,)),) * 2,
              "finish_reason": "stop", "num_prompt_tokens": 7, "num_output_tokens": 9, "num_cached_tokens": 3}
    assert set(values) == {f.name for f in dataclasses.fields(RequestOutput)}
    original = RequestOutput(**values)
    assert original.renamed("r") == dataclasses.replace(original, request_id="r")
