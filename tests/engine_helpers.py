"""Factories for the engine tests (tests/test_engine*.py)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

import gptoss
from engine import Engine, SamplingParams
from gptoss.generate import generate_tokens

# Layers: sliding, full, sliding (groups of unequal size) with a window of 8 tokens, so that a few
# dozen tokens cross the window many times.
WINDOW_CONFIG: gptoss.ModelConfig = gptoss.get_preset("tiny").replace(sliding_window=8, num_hidden_layers=3)


def make_prompts(lengths: Sequence[int], seed: int = 0, vocab: int = 199998) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def greedy(max_tokens: int, **changes) -> SamplingParams:
    """Greedy, no stop tokens (a random model would hit them only by chance)."""
    return SamplingParams.greedy(max_tokens=max_tokens, stop_token_ids=(), **changes)


@functools.cache
def _reference(model: gptoss.Transformer, prompt: tuple[int, ...], max_tokens: int) -> tuple[int, ...]:
    return tuple(generate_tokens(model, list(prompt), max_tokens, stop_token_ids=()))


def reference_greedy(model: gptoss.Transformer, prompt: Sequence[int], max_tokens: int) -> list[int]:
    """The reference path's greedy tokens for the prompt alone (contiguous KV cache, one request)."""
    return list(_reference(model, tuple(prompt), max_tokens))


def drive(engine: Engine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]],
          max_steps: int = 10_000) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Steps the engine, adding arrivals[step] before that step, until all work is done.

    Returns:
        tokens by request id, and finish reasons by request id.
    """
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    step = 0
    while step <= max(arrivals, default=0) or engine.has_work():
        for rid, prompt, params in arrivals.get(step, []):
            engine.add_request(rid, prompt, params)
            tokens[rid] = []
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        step += 1
        assert step < max_steps, "the engine did not finish"
    return tokens, reasons


def assert_pool_empty(engine: Engine) -> None:
    """No request holds a block and every block's reference count is back to zero."""
    pool = engine.kv.pool
    assert engine.kv.num_used_blocks == 0
    assert pool.num_free_blocks == pool.num_usable_blocks
    assert all(b.ref_cnt == 0 for b in pool.blocks[1:])
    assert not engine.kv._tables and not engine.scheduler.requests
    assert all(block.cache_key == key for key, block in pool._cached.items())  # the prefix map is consistent
