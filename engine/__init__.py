"""engine: how one rank turns requests into tokens, step by step.

- `Engine` (engine.py): `add_request`, `step`, `abort`, `has_work`, `get_stats`, `generate`.
- `Scheduler` (scheduler.py): continuous batching, chunked prefill, FCFS admission, preemption.
- `KVCacheManager` / `BlockPool` (kv_cache_manager.py, block_pool.py): paged KV with prefix caching;
  sliding-window layers keep only the blocks their window sees.
- `paged_attention` (attention.py): attention over the paged cache (sinks, window, GQA), one call per layer.
- `ModelRunner` (model_runner.py): the model's layers over one step's flat batch of tokens.
- `Sampler` (sampler.py) and `SamplingParams` (sampling_params.py).
Everything a caller gets back (outputs.py) is a frozen dataclass of plain values.

The names below are imported on first use, so `engine.sampling_params` and `engine.outputs` come without
torch (the gateway's admission workers build SamplingParams and never run a model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gptoss.lazy_exports import lazy_exports

_MODULE_OF = {
    "EngineConfig": "engine.config", "Engine": "engine.engine",
    "Completion": "engine.outputs", "EngineStats": "engine.outputs", "FinishReason": "engine.outputs",
    "RequestOutput": "engine.outputs", "TokenLogprobs": "engine.outputs",
    "DEFAULT_STOP_TOKEN_IDS": "engine.sampling_params", "SamplingParams": "engine.sampling_params",
    "InvalidRequestError": "gptoss.errors",
}

__all__ = ["Completion", "DEFAULT_STOP_TOKEN_IDS", "Engine", "EngineConfig", "EngineStats", "FinishReason",
           "InvalidRequestError", "RequestOutput", "SamplingParams", "TokenLogprobs"]

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.outputs import Completion, EngineStats, FinishReason, RequestOutput, TokenLogprobs
    from engine.sampling_params import DEFAULT_STOP_TOKEN_IDS, SamplingParams
    from gptoss.errors import InvalidRequestError


__getattr__ = lazy_exports("engine", _MODULE_OF)
