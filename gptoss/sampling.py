"""Batched sampling primitives on float32 logits [B, V], one set of parameters per row.

Each row draws its noise from its own generator, so a seeded request samples the same tokens whatever
else shares its batch.
"""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
                  min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Masks to -inf what top-k (0 = off), top-p (1.0 = off) and min-p (0.0 = off) exclude.

    logits [B, V] (already divided by the temperature); each parameter [B].
    """
    if top_k is not None and bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k, logits.shape[-1]).clamp(max=logits.shape[-1])
        kth = torch.sort(logits, dim=-1, descending=True).values.gather(-1, (k - 1).long()[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p is not None and bool((min_p > 0).any()):
        probs = torch.softmax(logits, dim=-1)
        limit = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
        logits = logits.masked_fill(probs < limit, float("-inf"))
    if top_p is not None and bool((top_p < 1).any()):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already cover top_p; the first always stays.
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, temperature: torch.Tensor, generators: list[torch.Generator | None],
           top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
           min_p: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B]. temperature 0 is greedy (argmax) for that row."""
    greedy = logits.argmax(dim=-1)
    random_rows = (temperature > 0).nonzero().flatten().tolist()
    if not random_rows:
        return greedy
    rows = torch.tensor(random_rows, device=logits.device)
    scaled = logits[rows] / temperature[rows, None]
    scaled = filter_logits(scaled, *(p[rows] if p is not None else None for p in (top_k, top_p, min_p)))
    probs = torch.softmax(scaled, dim=-1)
    # Gumbel-style race with exponential noise: argmax(p / E) is a sample from p.
    noise = torch.stack([
        torch.empty(logits.shape[-1], device="cpu").exponential_(generator=generators[r]) for r in random_rows
    ]).to(logits.device)
    picked = (probs / noise).argmax(dim=-1)
    out = greedy.clone()
    out[rows] = picked
    return out
