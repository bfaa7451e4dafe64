"""Batched sampling primitives on float32 logits [B, V], one set of parameters per row.

A row samples with noise of its own: an unseeded row by the inverse CDF at one uniform number it brings;
a seeded row by the Gumbel-max trick with noise drawn from (seed, output position) alone, so it samples
the same tokens whatever else shares its batch, and a request resumed elsewhere (another engine, after
its group failed) draws what it would have drawn where it started. Gumbel-max, not the inverse CDF, for
seeded rows: its token changes only when the two best noisy scores are within the logits' rounding of
each other (about one step in a million), while the inverse CDF's changes when any of the ~200k partial
sums before the draw moves by that much, which the last bits of a differently batched or chunked
forward do every few hundred tokens.

At vocabulary width (201088) a full sort costs ~7 ms per row on a CPU core, so top-k and top-p only
sort the largest candidates (falling back to a full sort for a row whose nucleus is wider), and a row
draws one uniform number (inverse CDF) rather than one exponential per vocabulary entry.

Every accepted parameter gives a valid token: the most likely token survives every filter, and a row
whose logits hold no distribution (NaN, +inf, all -inf: a broken model) takes its largest number, with
a warning, rather than whatever an inverse CDF of NaNs lands on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from gptoss.greedy_threshold import MIN_TEMPERATURE

logger = logging.getLogger(__name__)

# Largest-probability candidates that top-p sorts first; rows whose nucleus is wider sort everything.
TOP_P_CANDIDATES = 1024


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> [B], the first maximum of each row, NaN ignored (an all-NaN row gives 0).

    On the CPU through NumPy, whose argmax is several times faster than torch's at vocabulary width
    (~1.5 vs ~5 ms for 32 x 201088).
    """
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        out = torch.from_numpy(logits.numpy().argmax(axis=-1))
    else:
        out = logits.argmax(dim=-1)
    # Both argmaxes take NaN for the maximum: checking the B chosen values costs nothing next to a
    # NaN scan of the whole row.
    nan_rows = logits.gather(-1, out[:, None])[:, 0].isnan().nonzero().flatten()
    if len(nan_rows):
        logger.warning("logits of %d row(s) hold NaN (a broken model?): taking their largest number", len(nan_rows))
        sub = logits[nan_rows]
        out[nan_rows] = sub.masked_fill(sub.isnan(), float("-inf")).argmax(dim=-1)
    return out


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
                  min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Masks to -inf what top-k (0 = off), top-p (1.0 = off) and min-p (0.0 = off) exclude.

    logits [B, V] (already divided by the temperature); each parameter [B].
    """
    if top_k is not None and bool((top_k > 0).any()):
        logits = _filter_top_k(logits, top_k)
    if min_p is not None and bool((min_p > 0).any()):
        probs = torch.softmax(logits, dim=-1)
        limit = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
        logits = logits.masked_fill(probs < limit, float("-inf"))
    if top_p is not None and bool((top_p < 1).any()):
        logits = _filter_top_p(logits, top_p)
    return logits


def _filter_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    rows = (top_k > 0).nonzero().flatten()
    k = top_k[rows].clamp(max=logits.shape[-1]).long()
    # The k-th largest value per row, from a partial sort of the largest max(k).
    kth = logits[rows].topk(int(k.max()), dim=-1).values.gather(-1, (k - 1)[:, None])
    logits = logits.clone()
    logits[rows] = logits[rows].masked_fill(logits[rows] < kth, float("-inf"))
    return logits


def _filter_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    rows = (top_p < 1).nonzero().flatten()
    sub, p = logits[rows], top_p[rows][:, None]
    probs = torch.softmax(sub, dim=-1)
    num_candidates = min(TOP_P_CANDIDATES, sub.shape[-1])
    top_probs, top_ids = probs.topk(num_candidates, dim=-1)  # sorted, descending
    wide = top_probs.sum(dim=-1) < p[:, 0]  # the nucleus reaches past the candidates: sort the row
    if bool(wide.any()):
        top_probs, top_ids = probs.sort(dim=-1, descending=True)
    # Drop a token when the tokens before it already cover top_p; the first always stays (top_p
    # below float32's smallest number arrives as 0).
    cum = top_probs.cumsum(dim=-1)
    keep_sorted = (cum - top_probs) < p
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top_ids, keep_sorted)
    # A row without a distribution (its probabilities all NaN) stays as it is: masking it could leave
    # finite logits that look like one, and `sample` must see it to fall back to the argmax.
    no_mass = top_probs[:, 0].isnan()
    if bool(no_mass.any()):
        keep[no_mass] = True
    logits = logits.clone()
    logits[rows] = sub.masked_fill(~keep, float("-inf"))
    return logits


_MASK64 = (1 << 64) - 1


def _mix(seed: int, position: int) -> int:
    """SplitMix64 of (seed, position): the seed of one token's noise, as a non-negative int64."""
    z = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def seeded_gumbel(seed: int, position: int, vocab_size: int) -> torch.Tensor:
    """[vocab_size] float32 standard Gumbel noise that depends only on (seed, position): the noise of a
    seeded request's token at output position `position` (~0.7 ms at gpt-oss's vocabulary, on CPU)."""
    uniform = torch.rand(vocab_size, generator=torch.Generator().manual_seed(_mix(seed, position)))
    return uniform.clamp_(min=1e-38).log_().neg_().log_().neg_()


def sample(logits: torch.Tensor, temperature: torch.Tensor, uniform: torch.Tensor,
           top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
           min_p: torch.Tensor | None = None, seeds: Sequence[tuple[int, int] | None] = ()) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B]. A temperature below `MIN_TEMPERATURE` (0 among them) is
    greedy (argmax) for that row. A sampled row with a (seed, output position) in `seeds` takes the argmax
    of its filtered, tempered logits plus `seeded_gumbel` noise; any other sampled row the token where its
    `uniform` [B] number (in [0, 1)) falls in its distribution's CDF. Both draw from the same distribution."""
    random_rows = (temperature >= MIN_TEMPERATURE).nonzero().flatten().tolist()
    if len(random_rows) < logits.shape[0]:
        out = argmax_rows(logits)
    else:
        out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    if not random_rows:
        return out
    rows = torch.tensor(random_rows, device=logits.device)
    scaled = logits[rows] / temperature[rows, None]
    scaled = filter_logits(scaled, *(p[rows] if p is not None else None for p in (top_k, top_p, min_p)))
    picked = torch.empty(len(random_rows), dtype=torch.long, device=logits.device)
    gumbel = [j for j, r in enumerate(random_rows) if r < len(seeds) and seeds[r] is not None]
    inverse = [j for j in range(len(random_rows)) if j not in set(gumbel)]
    if gumbel:
        noise = torch.stack([seeded_gumbel(*seeds[random_rows[j]], logits.shape[-1]) for j in gumbel])
        scores = scaled[gumbel] + noise.to(logits.device)
        best = scores.argmax(dim=-1)
        # A row without a distribution (NaN, or nothing finite) has no best score to give.
        has_mass = torch.isfinite(scaled[gumbel]).any(dim=-1) & ~scaled[gumbel].isnan().any(dim=-1)
        picked[gumbel] = torch.where(has_mass, best, torch.full_like(best, -1))
    if inverse:
        probs = torch.softmax(scaled[inverse], dim=-1)
        picked[inverse] = _draw(probs, uniform[rows[inverse].cpu()].to(device=logits.device, dtype=probs.dtype))
    no_mass = (picked < 0).nonzero().flatten()
    if len(no_mass):
        logger.warning("logits of %d sampled row(s) hold no distribution (NaN or infinite): taking their "
                       "largest number", len(no_mass))
        picked[no_mass] = argmax_rows(logits[rows[no_mass]])
    out[rows] = picked
    return out


def _draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """probs [R, V], uniform [R] in [0, 1) -> [R]: the first token whose cumulative probability
    exceeds uniform * total (a token with no mass is never picked); -1 for a row without mass (all
    zero or NaN), which has no token to give."""
    cdf = probs.cumsum(dim=-1)  # accumulated in double on CPU
    total = cdf[:, -1:]
    picked = torch.searchsorted(cdf, uniform[:, None] * total, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)
    # Rounding can put the target at the very end: step back to the last token with mass.
    stray = (probs.gather(-1, picked[:, None])[:, 0] == 0).nonzero().flatten()
    if len(stray):
        last = probs.shape[-1] - 1 - (probs[stray] > 0).flip(-1).to(torch.uint8).argmax(dim=-1)
        picked[stray] = last
    picked[~(total[:, 0] > 0)] = -1  # NaN fails the comparison too
    return picked
