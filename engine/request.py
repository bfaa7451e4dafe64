"""`Request`: the mutable state of one request, owned by the scheduler."""

from __future__ import annotations

import enum

from engine.outputs import FinishReason
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """Tokens so far (prompt + output), how many of them have K/V in the cache, and sampling state.

    One rule drives scheduling: `num_computed_tokens` catches up with `num_tokens`. A prefill chunk, a
    decode, a prefix-cache hit and a recompute after preemption are all that rule.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, max_tokens: int,
                 arrival_index: int, cache_salt: str = "", resumed_token_ids: list[int] | None = None):
        self.request_id = request_id
        self.cache_salt = cache_salt  # requests share cached blocks only under the same salt (tenant)
        self.sampling = sampling
        self.max_tokens = max_tokens  # sampling.max_tokens, or what the context leaves
        self.arrival_index = arrival_index  # FCFS order; preemption takes the highest first
        # A resumed request's outputs start with what another engine generated (already delivered):
        # they are prefilled like the prompt but count as outputs (max_tokens, penalties, seed position).
        self.token_ids: list[int] = list(prompt_token_ids) + list(resumed_token_ids or ())
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hit at first admission
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_token_ids = frozenset(sampling.stop_token_ids)
        # token id -> times generated, kept only when penalties need it
        self.output_token_counts: dict[int, int] | None = None
        if sampling.has_penalties:
            self.output_token_counts = {}
            for token_id in resumed_token_ids or ():
                self.output_token_counts[token_id] = self.output_token_counts.get(token_id, 0) + 1
        self.block_hashes: list[bytes] = []  # hash of each full block of token_ids (prefix caching)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    def append_output_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.output_token_counts is not None:
            self.output_token_counts[token_id] = self.output_token_counts.get(token_id, 0) + 1

    def check_stop(self, max_model_len: int) -> FinishReason | None:
        """Why the request is done after its last token, or None."""
        if self.token_ids[-1] in self.stop_token_ids:
            return "stop"
        if self.num_output_tokens >= self.max_tokens or self.num_tokens >= max_model_len:
            return "length"
        return None

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens})")
