"""Reference generation: one prompt at a time with a contiguous KV cache.

This is the yardstick the batched engine is checked against, not the serving path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from gptoss.model import Transformer
from gptoss.sampling import sample
from gptoss.tokenizer import STOP_TOKEN_IDS


def generate_tokens(model: Transformer, prompt_ids: Sequence[int], max_tokens: int,
                    stop_token_ids: Sequence[int] = STOP_TOKEN_IDS, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int | None = None) -> Iterator[int]:
    """Yields sampled token ids (the stop token included) until a stop token or `max_tokens`."""
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    vocab = model.config.vocab_size
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt_ids must be in [0, {vocab}), got {bad[:5]}")
    temp, top_p_t = torch.tensor([temperature]), torch.tensor([top_p])
    cache = model.new_cache()
    logits = model(torch.tensor(list(prompt_ids)), cache)[-1:]
    for position in range(max_tokens):
        token = int(sample(logits, temp, torch.rand(1), top_p=top_p_t,
                           seeds=[(seed, position)] if seed is not None else ())[0])
        yield token
        if token in stop_token_ids:
            return
        logits = model(torch.tensor([token]), cache)


def generate_greedy_uncached(model: Transformer, prompt_ids: Sequence[int], max_tokens: int,
                             stop_token_ids: Sequence[int] = STOP_TOKEN_IDS) -> list[int]:
    """Greedy decoding by re-running the whole sequence every step: slow, and the ground truth."""
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_tokens):
        token = int(model(torch.tensor(ids))[-1].argmax())
        out.append(token)
        ids.append(token)
        if token in stop_token_ids:
            break
    return out
