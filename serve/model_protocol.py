"""What crosses between the gateway and the model server replicas (Serve handles pickle it): small
frozen dataclasses of plain values. Token ids only: tokenization and harmony stay in the gateway."""

from __future__ import annotations

from dataclasses import dataclass

from engine.outputs import FinishReason, RequestOutput, TokenLogprobs
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class ChannelAddress:
    """Where a gateway replica's token channel listens (serve/token_channel.py), and the secret a
    connection must open with."""

    host: str
    port: int
    secret: bytes


@dataclass(frozen=True)
class ModelRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    cache_salt: str = ""  # the tenant: prefix-cache blocks are shared only within one salt
    prefix_keys: tuple[bytes, ...] = ()  # engine.routing.prefix_routing_keys, for the request router
    avoid_replica_ids: tuple[str, ...] = ()  # replicas whose group the gateway saw fail: route elsewhere
    # What another group generated before the stream moved here (a migration): prefilled after the
    # prompt and counted as outputs; the stream goes on from there (engine.Engine.add_request).
    resumed_token_ids: tuple[int, ...] = ()
    # The gateway's token channel and this call's key on it (None: every chunk comes in the call).
    reply_to: ChannelAddress | None = None
    channel_key: str = ""


@dataclass(frozen=True)
class ModelChunk:
    """New tokens of one request, possibly several steps' worth merged; the last has the finish reason."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...] | None  # one per token when logprobs were asked for
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int  # generated so far
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    replica_id: str = ""  # the model server replica (EP group) that produced it
    channel_tokens_before: int = 0  # in the call: tokens of this call sent over the token channel before it


def chunk_of(output: RequestOutput) -> ModelChunk:
    return ModelChunk(output.new_token_ids, output.new_logprobs, output.finish_reason, output.num_prompt_tokens,
                      output.num_output_tokens, output.num_cached_tokens)


def merge_chunks(chunks: list[ModelChunk]) -> ModelChunk:
    """Consecutive chunks of one call as one: their tokens in order, the last one's counts and finish."""
    if len(chunks) == 1:
        return chunks[0]
    last = chunks[-1]
    logprobs = None
    if any(c.logprobs is not None for c in chunks):
        logprobs = tuple(lp for c in chunks for lp in (c.logprobs or ()))
    return ModelChunk(tuple(t for c in chunks for t in c.token_ids), logprobs, last.finish_reason,
                      last.num_prompt_tokens, last.num_output_tokens, last.num_cached_tokens, last.replica_id,
                      last.channel_tokens_before)


@dataclass(frozen=True)
class ModelInfo:
    """What the gateway needs to know of the model its replicas serve (the same for every replica)."""

    max_model_len: int  # prompt + output tokens one request may use
    vocab_size: int
    num_hidden_layers: int
    num_local_experts: int
    num_experts_per_tok: int
    num_ranks: int  # G, ranks per EP group
    dtype: str
    device: str
    max_logprobs: int
    block_size: int  # of the KV cache: the unit of prefix routing keys
    kernels: tuple[tuple[str, str], ...] = ()  # compiled CPU kernel -> how it runs on the ranks ("avx2", ...)


@dataclass(frozen=True)
class ReplicaHealth:
    healthy: bool
    state: str  # the EP group's state
    error: str
