"""What the engine hands back: small frozen dataclasses of plain values (they cross actor boundaries)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprobs at one generated position, from the model's distribution (before sampling rules)."""

    token_id: int  # the sampled token
    logprob: float  # its logprob
    top_token_ids: tuple[int, ...]  # the n most likely tokens, best first (n = SamplingParams.logprobs)
    top_logprobs: tuple[float, ...]


@dataclass(frozen=True)
class RequestOutput:
    """One request's news from one step: its newly sampled tokens, and whether it has finished."""

    request_id: str
    new_token_ids: tuple[int, ...]  # sampled this step (a stop token included); empty on abort
    new_logprobs: tuple[TokenLogprobs, ...] | None  # one per new token when logprobs were asked for
    finish_reason: FinishReason | None  # None while the request runs on
    num_prompt_tokens: int
    num_output_tokens: int  # generated so far, the new ones included
    num_cached_tokens: int  # prompt tokens served from the prefix cache at admission

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def renamed(self, request_id: str) -> RequestOutput:
        """The same output under another request id (per token on the serving path: dataclasses.replace
        costs 2.5x this)."""
        return RequestOutput(request_id, self.new_token_ids, self.new_logprobs, self.finish_reason,
                             self.num_prompt_tokens, self.num_output_tokens, self.num_cached_tokens)


@dataclass(frozen=True)
class Completion:
    """A finished request, as `Engine.generate` returns it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...] | None
    finish_reason: FinishReason
    num_cached_tokens: int


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's queues, KV pool and counters (counters run since start)."""

    num_running: int
    num_waiting: int
    num_kv_blocks: int  # usable blocks in the pool (the null block not counted)
    num_kv_blocks_used: int  # held by requests
    num_kv_blocks_free: int  # not held by any request (cached-but-evictable blocks included)
    num_kv_blocks_cached: int  # free blocks that still hold a reusable prefix
    kv_block_bytes: int  # bytes of one block, all the layers it covers included
    max_model_len: int  # prompt + output tokens one request may use (the context, capped by the pool)
    prefix_cache_query_tokens: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hit_tokens: int  # of those, tokens found (not recomputed)
    num_steps: int
    num_preemptions: int
    num_scheduled_tokens: int  # tokens run through the model, all steps
    last_step_num_tokens: int
    step_time_s: float  # wall time inside step(), all steps
    forward_time_s: float  # of which the model forward (input preparation excluded)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hit_tokens / self.prefix_cache_query_tokens if self.prefix_cache_query_tokens else 0.0

    @property
    def mean_tokens_per_step(self) -> float:
        return self.num_scheduled_tokens / self.num_steps if self.num_steps else 0.0

    @property
    def overhead_fraction(self) -> float:
        """Share of step time spent outside the model forward (scheduling, inputs, sampling, outputs)."""
        return 1.0 - self.forward_time_s / self.step_time_s if self.step_time_s else 0.0
