"""`Engine`: one rank's inference engine. Requests in, tokens out, one `step()` at a time."""

from __future__ import annotations

import itertools
import operator
import os
import time
from collections.abc import Sequence

import torch

from engine.config import EngineConfig
from engine.kv_cache_manager import KVCacheManager, kv_cache_groups
from engine.model_runner import ModelRunner, kv_block_bytes
from engine.outputs import Completion, EngineStats, RequestOutput, TokenLogprobs
from engine.request import Request
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from gptoss.errors import InvalidRequestError, invalid
from gptoss.model import Transformer


class Engine:
    """Continuous batching over a paged KV cache for one loaded model (which may hold an
    expert-parallel MoE). One caller drives it: `add_request` / `abort` between `step` calls.

    Greedy outputs equal the reference path's (`model(token_ids)`) for each prompt alone, whatever
    the batching, chunking, preemption or prefix reuse.
    """

    def __init__(self, model: Transformer, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.model = model
        self.model_config = mc = model.config
        groups = kv_cache_groups(mc)
        self.kv_block_bytes = kv_block_bytes(mc, groups, config.block_size, model.dtype)
        num_blocks = config.num_kv_blocks or config.kv_cache_bytes // self.kv_block_bytes
        if num_blocks < 2:
            raise ValueError(f"engine config: kv_cache_bytes must hold at least 2 blocks of {self.kv_block_bytes} "
                             f"bytes, got {config.kv_cache_bytes}")
        self.kv = KVCacheManager(groups, num_blocks, config.block_size, config.enable_prefix_caching,
                                 config.max_num_batched_tokens)
        self.max_model_len = self._derive_max_model_len()
        self.scheduler = Scheduler(config, self.kv, self.max_model_len)
        self.runner = ModelRunner(model, groups, num_blocks, config.block_size, config.greedy_screen)
        self.sampler = Sampler(config.seed)
        self._arrivals = itertools.count()
        self._pending: list[RequestOutput] = []  # abort notices, handed out by the next step
        self._num_steps = self._num_scheduled_tokens = self._last_step_num_tokens = 0
        self.last_scheduled_request_ids: tuple[str, ...] = ()  # of the latest step (a failed one's too)
        self._stepped: set[str] = set()  # unfinished requests that have been through a step
        # Fault injection for tests of a request that breaks its step: $GPTOSS_INJECT_STEP_FAULT_TOKEN set
        # to a token id makes every step with a request whose prompt holds that token raise.
        fault = os.environ.get("GPTOSS_INJECT_STEP_FAULT_TOKEN")
        self._fault_token = int(fault) if fault else None
        self._faulty: set[str] = set()
        self._step_time_s = self._forward_time_s = 0.0

    def _derive_max_model_len(self) -> int:
        config, context = self.config, self.model_config.max_position_embeddings
        limit = context if config.enable_chunked_prefill else min(context, config.max_num_batched_tokens)
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"engine config: max_model_len must be <= {limit} (the model context"
                             f"{'' if config.enable_chunked_prefill else ', and the step budget without chunked prefill'})"
                             f", got {config.max_model_len}")
        wanted = config.max_model_len or limit
        fits = self.kv.get_max_num_tokens(wanted)
        if config.max_model_len is not None and fits < config.max_model_len:
            raise ValueError(f"engine config: max_model_len must be <= {fits} (what the KV pool of "
                             f"{self.kv.pool.num_usable_blocks} blocks holds for one request), got {config.max_model_len}")
        if fits < 2:
            raise ValueError(f"engine config: the KV pool ({self.kv.pool.num_usable_blocks} blocks) cannot hold a request")
        # Said in the errors of requests that do not fit.
        self._max_model_len_reason = ("the engine's max_model_len" if config.max_model_len is not None
                                      else "the model context" if fits == wanted
                                      else f"what the KV cache ({self.kv.pool.num_usable_blocks} blocks) holds")
        return fits

    # --- requests ------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int],
                    sampling: SamplingParams | None = None, cache_salt: str = "",
                    resumed_token_ids: Sequence[int] = ()) -> None:
        """Queues a request; it runs from the next `step`.

        Args:
            request_id: unique among this engine's unfinished requests.
            prompt_token_ids: the rendered prompt, token ids in [0, vocab_size).
            sampling: sampling and stop rules; default `SamplingParams()`.
            cache_salt: requests reuse each other's cached prefix blocks only under the same salt
                (the serving layer passes the tenant of the API key).
            resumed_token_ids: outputs another engine already generated for this request (its stream
                moved here): prefilled after the prompt, counted as outputs (max_tokens, penalties, a
                seeded request's noise position), never sent again. Greedy and seeded requests then go on
                with the tokens they would have produced where they started.
        Raises:
            InvalidRequestError (a ValueError) naming the field, for a request that can never run:
            empty or out-of-vocabulary prompt, prompt + max_tokens beyond `max_model_len` (the model
            context capped by what the KV pool holds), a duplicate id, bad sampling parameters.
            Nothing else in the engine changes.
        """
        if not isinstance(request_id, str) or not request_id:
            raise invalid("request_id", "a non-empty string", request_id)
        if request_id in self.scheduler.requests:
            raise InvalidRequestError("request_id", f"request_id {request_id!r} is already queued or running")
        sampling = SamplingParams() if sampling is None else sampling
        if not isinstance(sampling, SamplingParams):
            raise invalid("sampling", "a SamplingParams", type(sampling).__name__)
        prompt = self._check_prompt(prompt_token_ids)
        resumed = self._check_prompt(resumed_token_ids, "resumed_token_ids", allow_empty=True)
        vocab = self.model_config.vocab_size
        bad = [t for t in sampling.stop_token_ids if t >= vocab]
        if bad:
            raise invalid("stop_token_ids", f"token ids in [0, {vocab})", bad)
        if sampling.logprobs is not None and sampling.logprobs > self.config.max_logprobs:
            raise invalid("logprobs", f"<= {self.config.max_logprobs}", sampling.logprobs)
        room = self.max_model_len - len(prompt)
        if room < 1:
            raise InvalidRequestError("prompt_token_ids", (
                f"prompt_token_ids has {len(prompt)} tokens; at most {self.max_model_len - 1} fit (the "
                f"{self.max_model_len} tokens of {self._max_model_len_reason} include one generated token)"))
        max_tokens = room if sampling.max_tokens is None else sampling.max_tokens
        if max_tokens > room:
            raise invalid("max_tokens", f"<= {room} ({self.max_model_len} tokens of {self._max_model_len_reason} "
                                        f"- {len(prompt)} prompt tokens)", max_tokens)
        if len(resumed) >= max_tokens:
            raise invalid("resumed_token_ids", f"fewer than max_tokens ({max_tokens}) tokens", len(resumed))
        if not isinstance(cache_salt, str):
            raise invalid("cache_salt", "a string", type(cache_salt).__name__)
        if self._fault_token is not None and self._fault_token in prompt:
            self._faulty.add(request_id)
        self.scheduler.add_request(Request(request_id, prompt, sampling, max_tokens, next(self._arrivals), cache_salt,
                                           resumed))

    def _check_prompt(self, token_ids: Sequence[int], name: str = "prompt_token_ids",
                      allow_empty: bool = False) -> list[int]:
        try:
            prompt = [operator.index(t) for t in token_ids]
        except TypeError:
            raise invalid(name, "a sequence of ints", type(token_ids).__name__) from None
        if not prompt:
            if allow_empty:
                return prompt
            raise InvalidRequestError(name, f"{name} must not be empty")
        vocab = self.model_config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise invalid(name, f"token ids in [0, {vocab})", [t for t in prompt if not 0 <= t < vocab][:5])
        return prompt

    def abort(self, request_id: str) -> bool:
        """Stops a request and frees its KV blocks; the next `step` reports it with finish_reason
        "abort". Returns False if the request is unknown or already finished."""
        request = self.scheduler.abort(request_id)
        if request is None:
            return False
        self._stepped.discard(request_id)
        self._pending.append(RequestOutput(request_id, (), None, "abort", request.num_prompt_tokens,
                                           request.num_output_tokens, request.num_cached_tokens))
        return True

    def suspect_request_ids(self) -> tuple[str, ...]:
        """After a step raised: the requests that may have caused it. Those in their first step when there
        are any (new content is what breaks a step that ran fine before), else all of the step's."""
        new = tuple(rid for rid in self.last_scheduled_request_ids if rid not in self._stepped)
        return new or self.last_scheduled_request_ids

    def has_work(self) -> bool:
        return bool(self.scheduler.requests or self._pending)

    # --- stepping ------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Schedules, runs the model once over all scheduled tokens, samples, and reports.

        With nothing to do it still runs every layer on zero tokens (the lockstep of an EP group).
        Returns:
            one output per request that got a token or finished this step (aborts included).
        Raises:
            whatever the model raises (e.g. a CommunicatorError inside an EP group): the step's
            requests are then in an undefined state and the engine (its group) must be rebuilt.
        """
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        self.last_scheduled_request_ids = tuple(item.request_id for item in batch.requests)
        if self._faulty.intersection(self.last_scheduled_request_ids):
            raise RuntimeError("a fault injected for tests ($GPTOSS_INJECT_STEP_FAULT_TOKEN) in this step")
        hidden = self.runner.execute(batch)
        to_sample = [self.scheduler.requests[item.request_id] for item in batch.requests if item.sample]
        argmax_of = self.runner.greedy_tokens if self.runner.model.screens_greedy_rows else None
        sampled = self.sampler.sample_hidden(hidden, to_sample, self.runner.logits, argmax_of)
        outputs = self.scheduler.update(batch, sampled.token_ids, sampled.logprobs)
        self._stepped.update(self.last_scheduled_request_ids)
        self._stepped.difference_update(o.request_id for o in outputs if o.finished)
        if self._pending:
            outputs, self._pending = self._pending + outputs, []
        self._num_steps += 1
        self._num_scheduled_tokens += batch.num_scheduled_tokens
        self._last_step_num_tokens = batch.num_scheduled_tokens
        self._forward_time_s += self.runner.last_forward_s
        self._step_time_s += time.perf_counter() - start
        return outputs

    def generate(self, prompts: Sequence[Sequence[int]],
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Runs the prompts concurrently to completion (a convenience for an engine nobody else feeds).

        Returns:
            one Completion per prompt, in order.
        Raises:
            InvalidRequestError for a bad prompt or sampling (no request is left queued);
            RuntimeError if the engine already has work.
        """
        if self.has_work():
            raise RuntimeError("generate needs an idle engine (it steps until its own requests finish)")
        params = list(sampling) if isinstance(sampling, Sequence) else [sampling] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling must be one SamplingParams or one per prompt ({len(prompts)}), got {len(params)}")
        ids = [f"generate-{i}" for i in range(len(prompts))]
        try:
            for rid, prompt, p in zip(ids, prompts, params, strict=True):
                self.add_request(rid, prompt, p)
        except InvalidRequestError:
            for rid in ids:
                self.abort(rid)
            self._pending.clear()
            raise
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        logprobs: dict[str, list[TokenLogprobs]] = {rid: [] for rid in ids}
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.step():
                tokens[out.request_id].extend(out.new_token_ids)
                logprobs[out.request_id].extend(out.new_logprobs or ())
                if out.finished:
                    done[out.request_id] = out
        return [Completion(rid, tuple(prompt), tuple(tokens[rid]),
                           tuple(logprobs[rid]) if p is not None and p.logprobs is not None else None,
                           done[rid].finish_reason, done[rid].num_cached_tokens)
                for rid, prompt, p in zip(ids, prompts, params, strict=True)]

    # --- stats ---------------------------------------------------------------------------------

    def get_stats(self) -> EngineStats:
        pool = self.kv.pool
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_kv_blocks=pool.num_usable_blocks,
            num_kv_blocks_used=self.kv.num_used_blocks,
            num_kv_blocks_free=pool.num_free_blocks,
            num_kv_blocks_cached=pool.get_num_cached_free_blocks(),
            kv_block_bytes=self.kv_block_bytes,
            max_model_len=self.max_model_len,
            prefix_cache_query_tokens=self.scheduler.prefix_cache_query_tokens,
            prefix_cache_hit_tokens=self.scheduler.prefix_cache_hit_tokens,
            num_steps=self._num_steps,
            num_preemptions=self.scheduler.num_preemptions,
            num_scheduled_tokens=self._num_scheduled_tokens,
            last_step_num_tokens=self._last_step_num_tokens,
            step_time_s=self._step_time_s,
            forward_time_s=self._forward_time_s,
        )
