"""`EngineConfig`: how one rank's engine batches and how much KV cache it keeps."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings (validated here; the serving layer's pydantic config converts into this).

    The KV pool is `num_kv_blocks` blocks when that is set, else as many as fit in `kv_cache_bytes`.
    """

    max_num_seqs: int = 64  # most requests scheduled in one step
    max_num_batched_tokens: int = 2048  # token budget of one step: prefill chunks + decodes
    block_size: int = 16  # tokens per KV block
    kv_cache_bytes: int = 1 << 30  # KV pool budget, all layers together
    num_kv_blocks: int | None = None  # exact pool size (overrides kv_cache_bytes), e.g. in tests
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True  # False: a prompt's prefill runs in one step or waits
    max_model_len: int | None = None  # prompt + output cap; None: the model's context, capped by the pool
    max_logprobs: int = 20  # most top logprobs a request may ask for
    seed: int = 0  # noise source of sampled requests that bring no seed of their own
    # CPU: greedy rows' argmax by the 7-bit screen (gptoss/greedy_unembedding.py), exact, with a copy of
    # the unembedding; off by default: at gpt-oss's width (2880) on random weights it decides too few rows
    greedy_screen: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"engine config: {name} must be {rule}, got {getattr(self, name)!r}")

        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_bytes"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, "an int > 0")
        # Every running request decodes one token per step: the budget must cover them all, or a
        # long prompt could starve decodes.
        need(self.max_num_batched_tokens >= self.max_num_seqs, "max_num_batched_tokens",
             f">= max_num_seqs ({self.max_num_seqs})")
        need(self.num_kv_blocks is None or (isinstance(self.num_kv_blocks, int) and self.num_kv_blocks >= 2),
             "num_kv_blocks", "None or an int >= 2 (one block is the reserved null block)")
        need(self.max_model_len is None or (isinstance(self.max_model_len, int) and self.max_model_len >= 2),
             "max_model_len", "None or an int >= 2")
        need(isinstance(self.max_logprobs, int) and self.max_logprobs >= 0, "max_logprobs", "an int >= 0")
        need(isinstance(self.seed, int) and 0 <= self.seed < 2**63, "seed", "an int in [0, 2**63)")
