"""The screened greedy argmax (gptoss/greedy_unembedding.py, csrc/greedy_screen.c): exact tokens
against the full product, on random and adversarial weights, on each C path the CPU runs; undecided
rows (degenerate or non-finite) are reported as such; the engine's greedy tokens do not change."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

import gptoss
from engine import Engine, EngineConfig, SamplingParams
from gptoss import greedy_unembedding, native
from gptoss.greedy_unembedding import GreedyUnembedding
from tests.test_mxfp4_linear import cpu_has

pytestmark = pytest.mark.skipif(greedy_unembedding.library() is None, reason="no C compiler: no greedy screen")


def exact_argmax(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (hidden.double() @ weight.double().T).argmax(dim=-1)


# Each path a machine can run: plain C (no -march), AVX2.
@pytest.fixture(params=[((), 0), (("-mavx2", "-mfma"), 256)], ids=["plain-c", "avx2"])
def lib(request, tmp_path, monkeypatch):
    flags, simd = request.param
    if simd and not (cpu_has("avx2") and cpu_has("fma")):
        pytest.skip("this CPU has no AVX2 + FMA")
    monkeypatch.setenv("GPTOSS_CACHE_DIR", str(tmp_path))
    built = native.build(greedy_unembedding.SOURCE, ("-O3", *flags, "-fPIC", "-shared", "-fopenmp"))
    greedy_unembedding.declare(built)
    assert built.greedy_screen_simd() == simd
    return built


@pytest.mark.parametrize("hidden_size", [64, 100])  # 100: columns padded to the kernel's 64
def test_tokens_are_the_exact_argmax_and_few_rows_are_scored(lib, hidden_size):
    gen = torch.Generator().manual_seed(hidden_size)
    weight = torch.randn(20_011, hidden_size, generator=gen) * 0.02  # an odd count: tails beside the tiles
    screen = GreedyUnembedding(weight, lib=lib)
    for rows in (1, 3, 4, 9):
        hidden = torch.randn(rows, hidden_size, generator=gen) * 3
        tokens, candidates = screen(hidden)
        assert torch.equal(tokens, exact_argmax(hidden, weight))
        assert bool((candidates >= 1).all()) and int(candidates.max()) < 20_011 // 10  # it does screen


def test_near_ties_below_the_screens_resolution_are_decided_exactly(lib):
    # Every row's logit is its tiny delta: the rest of each row is orthogonal to h and large, so the
    # 7-bit screen's errors dwarf the differences. Only the exact rescoring can find the argmax.
    gen = torch.Generator().manual_seed(1)
    k, vocab = 128, 1500
    h = torch.randn(k, generator=gen, dtype=torch.float64)
    direction = h / h.dot(h)
    noise = torch.randn(vocab, k, generator=gen, dtype=torch.float64)
    noise -= torch.outer(noise @ h, direction)  # orthogonal to h
    delta = torch.randn(vocab, generator=gen, dtype=torch.float64) * 1e-3
    weight = (noise + torch.outer(delta, direction)).float()
    hidden = h.float()[None]
    screen = GreedyUnembedding(weight, lib=lib)
    tokens, candidates = screen(hidden)
    assert tokens.item() == exact_argmax(hidden, weight).item()
    approx = screen.quantized[:, :k].double() @ torch.round(hidden[0].double() / (hidden.abs().max() / 63))
    assert approx.argmax().item() != tokens.item()  # the screen alone would have picked another row
    assert candidates.item() > 1
    # Equal logits: the lowest index, like argmax.
    tied = torch.cat([weight[:7], weight[tokens.item()][None], weight[7:]])
    assert GreedyUnembedding(tied, lib=lib)(hidden)[0].item() == 7


def test_rows_the_screen_cannot_decide_are_left_to_the_caller(lib):
    weight = torch.randn(10_000, 64)
    screen = GreedyUnembedding(weight, lib=lib)
    hidden = torch.randn(4, 64)
    hidden[1] = 0  # every row ties: nothing can be screened out
    hidden[2, 5] = float("nan")
    tokens, _ = screen(hidden)
    assert tokens[1].item() == -1 and tokens[2].item() == -1
    assert tokens[[0, 3]].tolist() == exact_argmax(hidden[[0, 3]], weight).tolist()


def bf16_argmax(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What a bfloat16 unembedding's greedy token is: the first largest of the logits in bfloat16."""
    return (hidden.double() @ weight.double().T).float().bfloat16().float().argmax(dim=-1)


def test_a_bfloat16_unembedding_takes_the_first_largest_logit_in_bfloat16(lib):
    gen = torch.Generator().manual_seed(2)
    weight = (torch.randn(30_011, 64, generator=gen) * 0.05).bfloat16()
    screen = GreedyUnembedding(weight, lib=lib)
    hidden = (torch.randn(6, 64, generator=gen) * 2).bfloat16()
    tokens, _ = screen(hidden)
    assert torch.equal(tokens, bf16_argmax(hidden, weight))
    # Rows whose logits differ by less than a bfloat16 step tie after rounding: the first one wins,
    # not the largest exact logit (rows 9000 + 1..4 are a little larger than row 9000 but round alike).
    h = hidden[:1]
    best = int(tokens[0])
    nudge = torch.zeros(64, dtype=torch.float64)
    nudge[int(h.abs().argmax())] = 1.0
    rows = [weight[best].double() + nudge * 1e-3 * i * float(h[0].abs().max()) ** -1 for i in range(1, 5)]
    weight2 = weight.clone()
    weight2[9000] = weight[best]
    for i, row in enumerate(rows, start=1):
        weight2[9000 + i] = row.bfloat16()
    weight2[best] = 0  # row 9000 and its near-copies now lead
    logits = (h.double() @ weight2.double().T)[0]
    assert logits[9001:9005].max() > logits[9000]  # exact order: a near-copy leads
    expected = int(bf16_argmax(h, weight2))
    got = int(GreedyUnembedding(weight2, lib=lib)(h)[0])
    assert got == expected and got in range(9000, 9005)


def test_weights_it_cannot_screen_are_refused_by_name():
    with pytest.raises(ValueError, match="float32 or bfloat16 CPU matrix"):
        GreedyUnembedding(torch.zeros(8, 64, dtype=torch.float16))
    assert not GreedyUnembedding.applies(torch.zeros(8, 64, dtype=torch.float16))
    weight = torch.randn(8, 64)
    weight[3, 3] = float("inf")
    assert not GreedyUnembedding.applies(weight)


def test_the_engines_tokens_and_logprobs_are_those_of_the_full_unembedding(tiny_checkpoint, monkeypatch):
    model = gptoss.load_model(tiny_checkpoint, dtype=torch.float32)
    config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=256, kv_cache_bytes=64 << 20)
    prompts = [[(7 * i + 3 * j) % 1000 + 10 for j in range(5 + 3 * i)] for i in range(6)]
    greedy = SamplingParams.greedy(max_tokens=12, stop_token_ids=())
    with_logprobs = SamplingParams.greedy(max_tokens=12, stop_token_ids=(), logprobs=2)
    sampled = SamplingParams(temperature=0.8, seed=5, max_tokens=12, stop_token_ids=())
    params = [greedy, greedy, with_logprobs, sampled, greedy, greedy]

    Engine(model, config)
    assert model.greedy_unembedding is None  # opt-in: off by default
    screened = Engine(model, dataclasses.replace(config, greedy_screen=True))
    assert model.greedy_unembedding is not None or not GreedyUnembedding.applies(model.lm_head.weight)
    calls = []
    screen = model.greedy_unembedding
    screen_call = GreedyUnembedding.__call__
    monkeypatch.setattr(GreedyUnembedding, "__call__", lambda self, h: calls.append(len(h)) or screen_call(self, h))
    got = screened.generate(prompts, params)
    model.greedy_unembedding = None  # the full unembedding for every row
    want = Engine(model, config).generate(prompts, params)
    model.greedy_unembedding = screen
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert got[2].logprobs == want[2].logprobs and got[2].logprobs
    if screen is not None:
        assert calls and max(calls) == 4  # the four plain greedy rows, not the logprob or sampled ones


def test_without_a_compiler_greedy_rows_take_the_full_unembedding(tmp_path, monkeypatch, caplog, tiny_model):
    monkeypatch.setenv("GPTOSS_CACHE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(greedy_unembedding.KERNEL, "_library", None)  # built again (and failing) below
    monkeypatch.setattr(greedy_unembedding.KERNEL, "failure", None)
    assert not GreedyUnembedding.applies(tiny_model.lm_head.weight)
    assert not GreedyUnembedding.applies(tiny_model.lm_head.weight)
    warnings = [r for r in caplog.records if "could not build greedy_screen.c" in r.getMessage()]
    assert len(warnings) == 1 and "full unembedding" in warnings[0].getMessage()


def test_the_switch_turns_the_screen_off(monkeypatch, tiny_model):
    monkeypatch.setenv("GPTOSS_GREEDY_SCREEN", "0")
    assert not GreedyUnembedding.applies(tiny_model.lm_head.weight)


def test_a_bfloat16_tie_is_kept_where_the_screen_is_exact(lib):
    # Weights and hidden state on the screen's own integer grid: the screen is exact, its bounds tight,
    # so only the bfloat16 allowance keeps row 5 (logit 1000) beside row 10 (logit 1001): both round
    # to 1000 in bfloat16, and the first one is the token.
    weight = torch.zeros(300, 64)
    weight[:, 2] = 64  # every row's largest entry: quantization step 1, exact
    weight[:, 0] = torch.arange(300) % 10
    weight[5, :2] = torch.tensor([15.0, 55.0])
    weight[10, :2] = torch.tensor([15.0, 56.0])
    hidden = torch.zeros(1, 64)
    hidden[0, :2] = torch.tensor([63.0, 1.0])
    weight, hidden = weight.bfloat16(), hidden.bfloat16()
    assert int(bf16_argmax(hidden, weight)) == 5
    assert int(GreedyUnembedding(weight, lib=lib)(hidden)[0]) == 5
    assert int(GreedyUnembedding(weight.float(), lib=lib)(hidden.float())[0]) == 10  # float32: the exact argmax


def test_the_prepared_copy_is_the_documented_quantization(lib):
    weight = torch.randn(1000, 100) * 0.03
    weight[7] = 0
    for w in (weight, weight.bfloat16()):
        screen = GreedyUnembedding(w, lib=lib)
        w64 = w.double()
        scale = (w64.abs().amax(dim=1) / 64).float()
        scale[7] = 1.0
        q = torch.round(w64 / scale.double()[:, None]).clamp(-64, 64)
        assert torch.equal(screen.scale, scale)
        assert torch.equal(screen.quantized[:, :100], q.to(torch.int8)) and not screen.quantized[:, 100:].any()
        assert torch.equal(screen.rowsum, q.sum(dim=1).int())
        for got, exact in ((screen.norm, w64.norm(dim=1)), (screen.error, (w64 - q * scale.double()[:, None]).norm(dim=1))):
            # summed in double (rounded up; a summation order's last bits are the bounds' margin's)
            assert got.dtype == torch.float64 and bool((got * (1 + 1e-12) >= exact).all())
            assert torch.allclose(got, exact, rtol=1e-12)


def test_a_screen_that_cannot_decide_gives_up_and_stays_out_of_the_way(lib, caplog):
    caplog.set_level(logging.INFO, logger=greedy_unembedding.__name__)
    weight = torch.randn(1, 64).repeat(5000, 1)  # every row the same: every row ties, nothing is ruled out
    screen = GreedyUnembedding(weight, lib=lib)
    hidden = torch.randn(2, 64)
    for _ in range(greedy_unembedding.GIVE_UP_AFTER):
        assert not screen.gave_up
        assert screen(hidden)[0].tolist() == [-1, -1]
    assert screen.gave_up and "full unembedding from now on" in caplog.text
    assert screen.nbytes == 0  # the copy is freed, not kept for nothing
    screen.lib = None  # no more kernel calls
    assert screen(hidden)[0].tolist() == [-1, -1]


def exactly_quantized(rows: list[list[float]], hidden: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [len(rows), 64] and hidden [1, 64] whose screen codes are exact (no quantization error:
    the bounds are as tight as they get), from their leading entries."""
    weight = torch.zeros(len(rows), 64, dtype=torch.float64)
    for i, row in enumerate(rows):
        weight[i, :len(row)] = torch.tensor(row, dtype=torch.float64)
    h = torch.zeros(1, 64, dtype=torch.float64)
    h[0, :len(hidden)] = torch.tensor(hidden, dtype=torch.float64)
    return weight.float(), h.float()


def test_scale_products_below_floats_range_still_give_the_true_argmax(lib):
    """Activation scale 2^-100 times weight scales 11 and 13 x 2^-52: the products lie among float's
    subnormals (multiples of 2^-149), where 11 x 2^-152 rounds down by 27% and 13 x 2^-152 up by 23%.
    Bounds made of those products let row 1 (true logit 63 x 1001 units) rule out row 0 (63 x 1408)."""
    unit = 2.0 ** -52
    weight, hidden = exactly_quantized([[704 * unit, 704 * unit], [832 * unit, 169 * unit]],
                                       [63 * 2.0 ** -100, 63 * 2.0 ** -100])
    assert int((hidden.double() @ weight.double().T).argmax()) == 0
    assert int(GreedyUnembedding(weight, lib=lib)(hidden)[0]) == 0


def test_a_bound_that_is_not_a_number_keeps_its_row(lib):
    """Activation scale 1e30 times row 0's weight scale 1e10 overflows float; row 0's codes (+64, -64)
    against the activation's (63, 63) sum to 0, so its float estimate is 0 x inf, not a number. Row 0
    is the argmax (logit 0, row 1's is -2e33): a row whose bound is not a number must stay."""
    weight, hidden = exactly_quantized([[64e10, -64e10], [-64.0, 32.0]], [63e30, 63e30])
    assert int((hidden.double() @ weight.double().T).argmax()) == 0
    assert int(GreedyUnembedding(weight, lib=lib)(hidden)[0]) == 0
