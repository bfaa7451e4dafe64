"""gpt-oss: what the network computes (config, layers, MXFP4, checkpoints, tokenizer + harmony)."""

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
from gptoss.model import Transformer
from gptoss.writer import write_random_checkpoint

__all__ = ["CheckpointError", "ClientError", "GptossError", "InvalidRequestError", "ModelConfig", "PRESETS",
           "ServerError", "Transformer", "UnavailableError", "get_preset", "load_config", "load_model",
           "write_random_checkpoint"]
