"""gpt-oss: what the network computes (config, layers, MXFP4, checkpoints, tokenizer + harmony).

The names below are imported on first use: the tokenizer and harmony modules are imported without torch
(the gateway's admission workers render prompts and never load a model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gptoss.lazy_exports import lazy_exports

_MODULE_OF = {
    "PRESETS": "gptoss.config", "ModelConfig": "gptoss.config", "get_preset": "gptoss.config",
    "CheckpointError": "gptoss.errors", "ClientError": "gptoss.errors", "GptossError": "gptoss.errors",
    "InvalidRequestError": "gptoss.errors", "ServerError": "gptoss.errors", "UnavailableError": "gptoss.errors",
    "load_config": "gptoss.load", "load_model": "gptoss.load",
    "Transformer": "gptoss.model", "unembedding_copy_bytes": "gptoss.model",
    "write_random_checkpoint": "gptoss.writer",
}

__all__ = ["CheckpointError", "ClientError", "GptossError", "InvalidRequestError", "ModelConfig",
           "PRESETS", "ServerError", "Transformer", "UnavailableError", "get_preset", "load_config",
           "load_model", "unembedding_copy_bytes", "write_random_checkpoint"]

if TYPE_CHECKING:
    from gptoss.config import PRESETS, ModelConfig, get_preset
    from gptoss.errors import (
        CheckpointError,
        ClientError,
        GptossError,
        InvalidRequestError,
        ServerError,
        UnavailableError,
    )
    from gptoss.load import load_config, load_model
    from gptoss.model import Transformer, unembedding_copy_bytes
    from gptoss.writer import write_random_checkpoint


__getattr__ = lazy_exports("gptoss", _MODULE_OF)
