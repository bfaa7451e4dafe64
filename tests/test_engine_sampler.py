"""engine/sampler.py and the gptoss.sampling primitives it builds on (no model)."""

from __future__ import annotations

import pytest
import torch

from engine.request import Request
from engine.sampler import Sampler, argmax_rows
from engine.sampling_params import SamplingParams
from gptoss.sampling import _draw, filter_logits, sample


def make_request(params: SamplingParams, output_token_ids=(), seed_generator: bool = True) -> Request:
    request = Request("r", [1, 2], params, 10, 0,
                      torch.Generator().manual_seed(params.seed) if params.seed is not None and seed_generator else None)
    for t in output_token_ids:
        request.append_output_token(t)
    return request


def reference_filter(row: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Which tokens survive, one row at a time, straight from the definitions."""
    keep = torch.ones_like(row, dtype=torch.bool)
    if top_k:
        keep &= row >= row.sort(descending=True).values[min(top_k, len(row)) - 1]
    masked = row.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(masked, -1)
    if min_p:
        keep &= probs >= min_p * probs.max()
    masked = row.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(masked, -1)
    if top_p < 1:
        order = probs.argsort(descending=True)
        before = probs[order].cumsum(0) - probs[order]
        keep[order[before >= top_p]] = False
    return keep


@pytest.mark.parametrize("vocab", [40, 5000], ids=["narrow", "wider-than-top-p-candidates"])
def test_filters_keep_exactly_the_tokens_their_definitions_keep(vocab):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, vocab, generator=gen) * torch.tensor([0.3, 1.0, 3.0, 0.1, 2.0, 1.0])[:, None]
    top_k = torch.tensor([0, 5, 0, 1, 30, vocab + 7])
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.8, 0.95, 0.7])
    min_p = torch.tensor([0.0, 0.0, 0.2, 0.0, 0.01, 0.05])
    out = filter_logits(logits, top_k, top_p, min_p)
    for i in range(6):
        expected = reference_filter(logits[i], int(top_k[i]), float(top_p[i]), float(min_p[i]))
        assert torch.equal(out[i].isfinite(), expected), f"row {i}"
    untouched = filter_logits(logits, None, torch.ones(6), None)
    assert torch.equal(untouched, logits)  # top_p = 1 drops nothing, whatever the rounding of the sums


def test_sampling_follows_the_tempered_distribution():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 12, generator=gen)
    probs = torch.softmax(logits / 0.7, dim=-1)[0]
    counts = torch.zeros(12)
    row_gen = torch.Generator().manual_seed(2)
    n = 6000
    for _ in range(n):
        counts[sample(logits, torch.tensor([0.7]), [row_gen])[0]] += 1
    assert (counts / n - probs).abs().max() < 4 * (probs * (1 - probs) / n).sqrt().max()


def test_a_seeded_row_samples_the_same_token_alone_or_in_a_batch():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 1000, generator=gen)

    def draw(rows: list[int]) -> list[int]:
        gens = [torch.Generator().manual_seed(100 + r) for r in rows]
        temps = torch.tensor([1.0 if r != 2 else 0.0 for r in rows])
        return sample(logits[rows], temps, gens, top_p=torch.full((len(rows),), 0.9)).tolist()

    together = draw([0, 1, 2, 3])
    assert [draw([r])[0] for r in range(4)] == together
    assert together[2] == int(logits[2].argmax())


def test_inverse_cdf_draw_never_picks_a_token_without_mass():
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.2, 0.8, 0.0], [0.0, 0.0, 0.0, 1.0]])
    for u in (0.0, 0.3, 0.9999999, 1.0):
        picked = _draw(probs, torch.full((3,), u))
        assert all(probs[i, t] > 0 for i, t in enumerate(picked.tolist())), u


def test_penalties_subtract_presence_once_and_frequency_per_occurrence():
    logits = torch.zeros(2, 6)
    logits[:, 3] = 2.0
    logits[:, 4] = 1.9
    penalised = make_request(SamplingParams.greedy(presence_penalty=0.05, frequency_penalty=0.1), [3, 3, 5])
    plain = make_request(SamplingParams.greedy(), [3, 3, 5])
    out = Sampler(seed=0)(logits, [penalised, plain])
    assert out.token_ids == [4, 3]  # 2.0 - 0.05 - 2 * 0.1 = 1.75 < 1.9
    assert logits[0, 3] == 2.0  # the caller's logits are left alone
    adjusted = Sampler._apply_penalties(logits.clone(), [penalised, plain])
    assert adjusted[0].tolist() == pytest.approx([0, 0, 0, 1.75, 1.9, -0.15])
    assert torch.equal(adjusted[1], logits[1])


def test_logprobs_come_from_the_unpenalised_distribution_with_the_top_n_first():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    request = make_request(SamplingParams.greedy(logprobs=2, frequency_penalty=2.0), [1])
    out = Sampler(seed=0)(logits, [request])
    [lp] = out.logprobs
    expected = torch.log_softmax(logits[0], -1)
    assert out.token_ids == [3] and lp.token_id == 3  # the penalty moves the choice from 1 to 3 ...
    assert lp.logprob == pytest.approx(expected[3].item())  # ... but logprobs describe the model
    assert lp.top_token_ids == (1, 3) and lp.top_logprobs == pytest.approx(expected[[1, 3]].tolist())


def test_numpy_argmax_matches_torch_including_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [float("-inf"), -1.0, -1.0, -2.0]])
    assert argmax_rows(logits).tolist() == logits.argmax(-1).tolist() == [1, 1]
