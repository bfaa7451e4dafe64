"""`ModelServer`: the Ray Serve deployment behind the gateway. One replica = one EP group.

The replica declares its placement group itself: its own small CPU bundle first, then one bundle per
rank (`{"GPU": 1}` on GPU clusters, CPUs only on CPU machines), PACKed. Its group starts inside that
placement group (using the last G bundles), so Serve owns the bundles and frees them with the replica.
Serve's health check is the group's health: a failed group makes Serve replace the whole replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from ray import serve

from cluster import EPGroup, GroupStats, LoadProgress
from cluster.placement import rank_bundle
from gptoss.errors import UnavailableError
from serve.config import AppConfig
from serve.errors import ReplicaUnavailableError, TokenChannelError
from serve.metrics import ModelServerMetrics
from serve.model_protocol import ModelChunk, ModelInfo, ModelRequest, ReplicaHealth, chunk_of
from serve.router import ReplicaLoad
from serve.stream_merge import MergePolicy, merge_stream
from serve.token_channel import TokenOutbox

logger = logging.getLogger("ray.serve")  # what Serve writes to the replica's log

_DRAIN_MARGIN_S = 5.0  # of the graceful shutdown timeout, kept for stopping the ranks


def replica_bundles(config: AppConfig, device: str) -> list[dict[str, float]]:
    """The replica's placement group: its own bundle, then one per rank (the group uses the last G)."""
    rank = rank_bundle(device, config.group.num_cpus_per_rank)
    return [{"CPU": config.model_server.num_cpus}] + [dict(rank) for _ in range(config.group.num_ranks)]


class ModelServer:
    """generate / abort / info / stats / health over one EPGroup; Serve calls `check_health`,
    `record_routing_stats` and, on graceful shutdown, `__del__` (which drains the group)."""

    async def __init__(self, config: AppConfig, device: str):
        self.config = config
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        checkpoint = config.checkpoint_path()  # the embedded default model is written here on first use
        self.group = EPGroup(config.group_config(checkpoint, name=f"group-{self.replica_id}", device=device))
        self.metrics = ModelServerMetrics(config.served_model_name(), self.replica_id)
        self._merge_policy = MergePolicy.of(config.model_server)
        self._num_open_streams = 0
        self._outbox = TokenOutbox(self.replica_id)
        self._last_progress_log = 0.0
        start = time.monotonic()
        logger.info("starting an EP group of %d ranks on %s from %s", config.group.num_ranks, device, checkpoint)
        await self.group.start(on_progress=self._log_progress)
        stats = await self.group.stats()
        engine = stats.ranks[0].engine
        model = await asyncio.to_thread(_load_model_config, checkpoint)
        self.info = ModelInfo(
            max_model_len=engine.max_model_len, vocab_size=model.vocab_size,
            num_hidden_layers=model.num_hidden_layers, num_local_experts=model.num_local_experts,
            num_experts_per_tok=model.num_experts_per_tok, num_ranks=config.group.num_ranks,
            dtype=config.model.dtype, device=self.group.device, max_logprobs=config.engine.max_logprobs,
            block_size=config.engine.block_size, kernels=stats.ranks[0].kernels)
        self._stats: GroupStats = stats
        self._was_healthy = True
        self.metrics.group_stats(stats)
        self.metrics.group_state(self.group.health().state, was_healthy=False)
        self._poller = asyncio.create_task(self._poll_stats())
        logger.info("EP group ready in %.1f s: %d ranks on %s, %d KV blocks per rank, max_model_len %d",
                    time.monotonic() - start, config.group.num_ranks, self.group.device, engine.num_kv_blocks,
                    engine.max_model_len)

    def _log_progress(self, progress: list[LoadProgress]) -> None:
        now = time.monotonic()
        done = all(p.stage == "ready" for p in progress)
        if not done and now - self._last_progress_log < 5.0:
            return
        self._last_progress_log = now
        logger.info("loading: %s", ", ".join(
            f"rank {p.rank} {p.stage} {p.tensors_done}/{p.tensors_total} tensors" for p in progress))

    async def _poll_stats(self) -> None:
        """The group's figures every `stats_period_s`: for the router (`record_routing_stats`) and
        the metrics."""
        period_s = self.config.model_server.stats_period_s
        while True:
            await asyncio.sleep(period_s)
            try:
                self._stats = await self.group.stats()
                self.metrics.group_stats(self._stats)
            except Exception:  # noqa: BLE001 - figures are best effort; health is checked apart
                logger.exception("polling the EP group's stats failed")
            state = self.group.health().state
            self.metrics.group_state(state, self._was_healthy)
            self._was_healthy = state in ("healthy", "draining")

    # --- requests --------------------------------------------------------------------------------

    async def generate(self, request: ModelRequest) -> AsyncIterator[ModelChunk]:
        """Streams the request's tokens; a caller that goes away (Serve cancels this generator)
        aborts the request in its engine, freeing its KV blocks. With `request.reply_to` (the gateway's
        token channel, serve/token_channel.py) every chunk but the last goes over the channel, and the
        last one here says how many tokens went before it; without it, or when the channel cannot be
        reached (yet: a first connection is made in the background), every chunk goes here, merged
        as `model_server.stream_merge_*` say.

        Raises:
            ReplicaUnavailableError (naming this replica): the group failed or is draining.
            TokenChannelError: the gateway's token channel broke mid-stream.
            SuspectRequestError: the group failed in a step of this request (it is not to be retried).
        """
        arrival = time.monotonic()
        self._num_open_streams += 1  # what merging adapts to
        last_chunk_at: float | None = None
        ended_as = "abort"  # unless a finish reason or an error comes: the caller went away
        num_prompt = len(request.prompt_token_ids)

        def measure(num_tokens: int) -> None:
            nonlocal last_chunk_at
            if num_tokens:
                now = time.monotonic()
                if last_chunk_at is None:
                    self.metrics.first_tokens(num_tokens, now - arrival)
                else:
                    self.metrics.more_tokens(num_tokens, now - last_chunk_at)
                last_chunk_at = now

        try:
            link = self._outbox.link(request.reply_to) if request.reply_to is not None else None
            if link is not None:
                # Every output but the last over the gateway's token channel, handed on by the group as it
                # arrives; the last in this call. Closed when left: a cancel thrown in by Serve aborts the
                # request in its engine at once.
                sent = 0

                def forward(output) -> None:
                    nonlocal sent
                    measure(len(output.new_token_ids))
                    link.send(request.channel_key, output)  # TokenChannelError once the link broke
                    sent += len(output.new_token_ids)

                last = self.group.generate(request.request_id, request.prompt_token_ids, request.sampling,
                                           request.cache_salt, request.resumed_token_ids, forward)
                async with contextlib.aclosing(last) as last:
                    async for output in last:
                        measure(len(output.new_token_ids))
                        ended_as = output.finish_reason
                        yield dataclasses.replace(chunk_of(output), replica_id=self.replica_id,
                                                  channel_tokens_before=sent)
                return
            outputs = self.group.generate(request.request_id, request.prompt_token_ids, request.sampling,
                                          request.cache_salt, request.resumed_token_ids)
            # Closed when left: Serve throws a cancel in at our `yield` when the caller goes away, and
            # only closing merge_stream aborts the request in its engine at once.
            chunks = merge_stream((chunk_of(o) async for o in outputs), self._merge_policy,
                                   lambda: self._num_open_streams)
            async with contextlib.aclosing(chunks) as chunks:
                async for chunk in chunks:
                    measure(len(chunk.token_ids))
                    if chunk.finish_reason is not None:
                        ended_as = chunk.finish_reason
                    yield dataclasses.replace(chunk, replica_id=self.replica_id)
        except TokenChannelError:
            ended_as = "error"
            raise  # the channel, not this group: the gateway moves the stream without avoiding this replica
        except UnavailableError as e:
            ended_as = "error"
            raise ReplicaUnavailableError(str(e), self.replica_id) from None
        except Exception:
            ended_as = "error"
            raise
        finally:
            self._num_open_streams -= 1
            self.metrics.request_finished(ended_as, num_prompt, time.monotonic() - arrival)

    async def abort(self, request_id: str) -> bool:
        return await self.group.abort(request_id)

    # --- state -----------------------------------------------------------------------------------

    def get_info(self) -> ModelInfo:
        return self.info

    async def stats(self) -> GroupStats:
        return await self.group.stats()

    async def rebalance_experts(self):
        """Admin: rearranges this replica's experts now from the live routing counts (eplb.enabled);
        open requests pause between two steps, none fails. Returns parallel.rebalance.Rearrangement."""
        return await self.group.rebalance_experts()

    def health(self) -> ReplicaHealth:
        health = self.group.health()
        return ReplicaHealth(health.ok, health.state, health.error)

    def check_health(self) -> None:
        """Serve's health check: raising makes Serve replace this replica (the group is the unit of failure)."""
        health = self.group.health()
        if health.state not in ("healthy", "draining"):
            raise RuntimeError(f"EP group is {health.state}: {health.error}")

    def record_routing_stats(self) -> dict:
        """What the request routers weigh (serve/router.py): health and load, as of the last poll."""
        stats = self._stats
        return ReplicaLoad(self.group.health().ok, stats.num_running, stats.num_waiting, stats.num_kv_blocks_free,
                           stats.num_kv_blocks_used + stats.num_kv_blocks_free, time.time()).to_dict()

    async def __del__(self) -> None:
        """Serve's graceful shutdown: open requests had `graceful_shutdown_timeout_s` to finish; what is
        left is aborted, then the ranks stop."""
        self._poller.cancel()
        await self.group.drain(timeout_s=max(1.0, self.config.model_server.graceful_shutdown_timeout_s
                                             - _DRAIN_MARGIN_S))
        self._outbox.close()


def _load_model_config(checkpoint: str):
    import gptoss

    return gptoss.load_config(checkpoint)
