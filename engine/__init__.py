"""engine: how one rank turns requests into tokens, step by step.

- `Engine` (engine.py): `add_request`, `step`, `abort`, `has_work`, `get_stats`, `generate`.
- `Scheduler` (scheduler.py): continuous batching, chunked prefill, FCFS admission, preemption.
- `KVCacheManager` / `BlockPool` (kv_cache_manager.py, block_pool.py): paged KV with prefix caching;
  sliding-window layers keep only the blocks their window sees.
- `paged_attention` (attention.py): attention over the paged cache (sinks, window, GQA), one call per layer.
- `ModelRunner` (model_runner.py): the model's layers over one step's flat batch of tokens.
- `Sampler` (sampler.py) and `SamplingParams` (sampling_params.py).
Everything a caller gets back (outputs.py) is a frozen dataclass of plain values.
"""

from engine.config import EngineConfig
from engine.engine import Engine
from engine.outputs import Completion, EngineStats, FinishReason, RequestOutput, TokenLogprobs
from engine.sampling_params import DEFAULT_STOP_TOKEN_IDS, SamplingParams
from gptoss.errors import InvalidRequestError

__all__ = ["DEFAULT_STOP_TOKEN_IDS", "Completion", "Engine", "EngineConfig", "EngineStats",
           "FinishReason", "InvalidRequestError", "RequestOutput", "SamplingParams", "TokenLogprobs"]
