"""engine/sampler.py and the gptoss.sampling primitives it builds on (no model)."""

from __future__ import annotations

import pytest
import torch

from engine.request import Request
from engine.sampler import Sampler, argmax_rows
from engine.sampling_params import SamplingParams
from gptoss.sampling import _draw, filter_logits, sample


def make_request(params: SamplingParams, output_token_ids=()) -> Request:
    request = Request("r", [1, 2], params, 10, 0)
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
        counts[sample(logits, torch.tensor([0.7]), torch.rand(1, generator=row_gen))[0]] += 1
    assert (counts / n - probs).abs().max() < 4 * (probs * (1 - probs) / n).sqrt().max()


def test_seeded_rows_follow_the_tempered_distribution_too():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 12, generator=gen)
    probs = torch.softmax(logits / 0.7, dim=-1)[0]
    counts = torch.zeros(12)
    n = 6000
    for position in range(n):  # the Gumbel-max trick, one position (noise) after another
        counts[sample(logits, torch.tensor([0.7]), torch.zeros(1), seeds=[(9, position)])[0]] += 1
    assert (counts / n - probs).abs().max() < 4 * (probs * (1 - probs) / n).sqrt().max()


def test_a_seeded_row_keeps_its_token_when_the_logits_move_by_their_rounding():
    """The point of Gumbel-max for seeded rows: a float32 rounding of every logit (as a differently batched
    forward gives) leaves the token alone at nearly every position of a flat 200k-token distribution."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 201088, generator=gen) * 0.1
    nudged = logits * (1 + 1e-7 * torch.randn(1, 201088, generator=gen))
    same = sum(int(sample(logits, torch.ones(1), torch.zeros(1), seeds=[(3, p)])[0]) ==
               int(sample(nudged, torch.ones(1), torch.zeros(1), seeds=[(3, p)])[0]) for p in range(200))
    assert same == 200


def test_a_seeded_row_samples_the_same_token_alone_or_in_a_batch():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 1000, generator=gen)

    def draw(rows: list[int]) -> list[int]:
        temps = torch.tensor([1.0 if r != 2 else 0.0 for r in rows])
        return sample(logits[rows], temps, torch.rand(len(rows)), top_p=torch.full((len(rows),), 0.9),
                      seeds=[(100 + r, 0) for r in rows]).tolist()

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


def peaked_logits(num_rows: int, vocab: int = 300, seed: int = 5) -> tuple[torch.Tensor, list[int]]:
    """Logits of a model's size (|logit| up to ~30) whose argmax is neither the first nor the last token."""
    logits = torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(seed)) * 10
    logits[:, 0] = logits[:, -1] = -40.0
    return logits, logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [1e-39, 1e-30, 9e-6], ids=["1e-39", "1e-30", "just-below-floor"])
def test_a_temperature_below_the_floor_samples_the_argmax(temperature):
    logits, argmax = peaked_logits(3)
    assert sample(logits, torch.full((3,), temperature), torch.rand(3)).tolist() == argmax
    requests = [make_request(SamplingParams(temperature=temperature, seed=i)) for i in range(3)]
    assert requests[0].sampling.is_greedy
    assert Sampler(seed=0)(logits, requests).token_ids == argmax


FILTERS_THAT_LEAVE_ONE_TOKEN = [
    dict(top_p=1e-50), dict(top_p=1e-8), dict(min_p=1.0), dict(top_k=1, top_p=1e-50),
    dict(top_k=1, min_p=1.0, top_p=1e-50), dict(temperature=1e-4, top_p=1e-50),
]


@pytest.mark.parametrize("rules", FILTERS_THAT_LEAVE_ONE_TOKEN, ids=lambda r: ",".join(f"{k}={v}" for k, v in r.items()))
def test_filters_never_drop_the_most_likely_token(rules):
    logits, argmax = peaked_logits(4)
    params = SamplingParams(**({"temperature": 1.0} | rules))
    requests = [make_request(params) for _ in range(4)]
    for seed in range(5):
        assert Sampler(seed=seed)(logits, requests).token_ids == argmax
    column = {k: torch.full((4,), v) for k, v in rules.items() if k != "temperature"}
    kept = filter_logits(logits, **column).isfinite()
    assert kept.sum(-1).tolist() == [1] * 4 and kept[range(4), argmax].all()


def test_a_batch_mixing_greedy_and_sampled_rows_gives_each_point_mass_row_its_argmax():
    logits, argmax = peaked_logits(6)
    params = [SamplingParams.greedy(), SamplingParams(temperature=1e-39), SamplingParams(top_p=1e-50, seed=3),
              SamplingParams(temperature=0.7, top_k=1), SamplingParams(temperature=1.0, seed=4),
              SamplingParams(temperature=2e-6, seed=5)]
    out = Sampler(seed=0)(logits, [make_request(p) for p in params]).token_ids
    assert [out[i] for i in (0, 1, 2, 3, 5)] == [argmax[i] for i in (0, 1, 2, 3, 5)]
    assert 0 < out[4] < logits.shape[1] - 1 and logits[4, out[4]] > -40  # a real draw from the full row


def test_a_top_k_beyond_any_vocabulary_keeps_every_token():
    logits, _ = peaked_logits(1)
    out = Sampler(seed=0)(logits, [make_request(SamplingParams(top_k=2**70, seed=1))]).token_ids
    assert 0 < out[0] < logits.shape[1] - 1


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
@pytest.mark.parametrize("vocab", [5, 3000], ids=["narrow", "wider-than-top-p-candidates"])
@pytest.mark.parametrize("top_k", [0, 2], ids=["all", "top-2"])
def test_rows_with_nan_or_infinite_logits_give_their_largest_number_not_the_last_token(temperature, vocab, top_k):
    nan, inf = float("nan"), float("inf")
    logits = torch.full((5, vocab), -inf)
    logits[:, :5] = torch.tensor([[0.0, 2.0, nan, 1.0, 0.5],  # NaN is not a number, let alone the largest
                                  [nan, nan, nan, nan, nan],
                                  [-inf, -inf, -inf, -inf, -inf],
                                  [0.0, inf, 1.0, -inf, 3.0],
                                  [-inf, 1.0, -inf, 0.0, -inf]])
    logits[[0, 3, 4], 5:] = -50.0
    out = sample(logits, torch.full((5,), temperature), torch.rand(5),
                 top_k=torch.full((5,), top_k), top_p=torch.full((5,), 1e-9))
    assert out.tolist() == [1, 0, 0, 1, 1]
