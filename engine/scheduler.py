"""`Scheduler`: which requests run in the next step, with how many tokens each.

Policy, in the order `schedule` applies it:
1. running requests, oldest first: each takes the tokens it still lacks (a decode: one; a prefill:
   a chunk) within the step's token budget, a budget from which every running decode has a token
   reserved, so a long prompt never starves decodes;
2. when the pool has no room for a running request, the newest running request is preempted (its
   blocks freed; it rejoins the front of the queue and is recomputed later, mostly from the prefix
   cache), until the request fits or is itself the newest;
3. if nobody was preempted, waiting requests are admitted first-come-first-served (reusing their
   longest cached prefix) while there are sequence slots, budget and blocks; the queue head is never
   overtaken.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.kv_cache_manager import KVCacheManager
from engine.outputs import RequestOutput, TokenLogprobs
from engine.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step."""

    request_id: str
    token_ids: tuple[int, ...]  # the tokens whose K/V this step computes
    start_position: int  # position of token_ids[0] (= tokens already in the cache)
    block_offsets: tuple[int, ...]  # per KV group, the table index of block_ids[g][0]
    block_ids: tuple[tuple[int, ...], ...]  # per KV group, the blocks from block_offsets[g] on: all that
    #                                         this step reads or writes (a window skips older ones)
    sample: bool  # the chunk ends at the request's last token: sample the next one from its logits


@dataclass(frozen=True)
class SchedulerOutput:
    """The work of one step. May be empty: an idle rank of an EP group still steps."""

    requests: tuple[ScheduledRequest, ...]  # single-token requests (decodes) first, then prefill chunks
    num_decodes: int  # len of that first part
    num_scheduled_tokens: int


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager, max_model_len: int):
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # sorted by arrival: the last one is preempted first
        self.num_preemptions = 0
        self.prefix_cache_query_tokens = 0
        self.prefix_cache_hit_tokens = 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Drops a request and frees its blocks; None if it is unknown or finished."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
            self.kv.free(request)
        else:
            self.waiting.remove(request)
        request.status, request.finish_reason = RequestStatus.FINISHED, "abort"
        return request

    # --- scheduling ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """The next step's work, by the policy of the module docstring (allocates its KV slots)."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        budget = self._schedule_running(budget, scheduled, preempted)
        if not preempted:
            self._admit_waiting(budget, scheduled)
        return self._build_output(scheduled)

    def _schedule_running(self, budget: int, scheduled: list, preempted: list) -> int:
        """Running requests, oldest first, preempting the newest when blocks run out; returns the budget left."""
        reserved = sum(1 for r in self.running if r.num_tokens - r.num_computed_tokens == 1)
        i = 0
        while i < len(self.running):
            request = self.running[i]
            i += 1
            remaining = request.num_tokens - request.num_computed_tokens
            if remaining == 1:
                reserved -= 1
            n = min(remaining, budget - reserved)
            if n <= 0 or (n < remaining and not self.config.enable_chunked_prefill):
                continue  # a prefill chunk waits for budget; decodes always have theirs
            while not self.kv.allocate_slots(request, n):
                victim = self.running.pop()
                if victim is not request and victim.num_tokens - victim.num_computed_tokens == 1:
                    reserved -= 1
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled.append((request, n))
                budget -= n
        return budget

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)  # newest first popped, so the oldest ends up at the front

    def _admit_waiting(self, budget: int, scheduled: list) -> None:
        """Waiting requests in order, each from its longest cached prefix, until one does not fit."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            computed_blocks, num_hit = self.kv.get_computed_blocks(request)
            remaining = request.num_tokens - num_hit
            n = min(remaining, budget)
            if n < remaining and not self.config.enable_chunked_prefill:
                break
            if not self.kv.allocate_slots(request, n, computed_blocks, num_hit):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_hit
                self.prefix_cache_query_tokens += request.num_tokens
                self.prefix_cache_hit_tokens += num_hit
            bisect.insort(self.running, request, key=lambda r: r.arrival_index)
            scheduled.append((request, n))
            budget -= n

    def _build_output(self, scheduled: list[tuple[Request, int]]) -> SchedulerOutput:
        scheduled.sort(key=lambda item: item[1] > 1)  # stable: decodes first, each part in FCFS order
        bs = self.kv.block_size
        items = []
        for request, n in scheduled:
            start = request.num_computed_tokens
            offsets = tuple(g.first_needed_position(start) // bs for g in self.kv.groups)
            items.append(ScheduledRequest(
                request_id=request.request_id,
                token_ids=tuple(request.token_ids[start:start + n]),
                start_position=start,
                block_offsets=offsets,
                block_ids=tuple(self.kv.get_block_ids(request.request_id, gi, first)
                                for gi, first in enumerate(offsets)),
                sample=start + n == request.num_tokens,
            ))
        return SchedulerOutput(
            requests=tuple(items),
            num_decodes=sum(1 for _, n in scheduled if n == 1),
            num_scheduled_tokens=sum(n for _, n in scheduled),
        )

    # --- after the forward ---------------------------------------------------------------------

    def update(self, output: SchedulerOutput, sampled_token_ids: list[int],
               sampled_logprobs: list[TokenLogprobs | None] | None) -> list[RequestOutput]:
        """Advances every scheduled request by its computed tokens and appends the sampled ones
        (in the order of the requests with `sample` set); finishes those that stop."""
        outputs = []
        k = 0
        for item in output.requests:
            request = self.requests[item.request_id]
            request.num_computed_tokens += len(item.token_ids)
            self.kv.cache_blocks(request)
            if not item.sample:
                continue
            token = sampled_token_ids[k]
            logprobs = sampled_logprobs[k] if sampled_logprobs is not None else None
            k += 1
            request.append_output_token(token)
            reason = request.check_stop(self.max_model_len)
            if reason is not None:
                self._finish(request, reason)
            outputs.append(RequestOutput(
                request_id=request.request_id,
                new_token_ids=(token,),
                new_logprobs=(logprobs,) if logprobs is not None else None,
                finish_reason=reason,
                num_prompt_tokens=request.num_prompt_tokens,
                num_output_tokens=request.num_output_tokens,
                num_cached_tokens=request.num_cached_tokens,
            ))
        return outputs

    def _finish(self, request: Request, reason: str) -> None:
        request.status, request.finish_reason = RequestStatus.FINISHED, reason
        self.running.remove(request)
        self.kv.free(request)
        del self.requests[request.request_id]
