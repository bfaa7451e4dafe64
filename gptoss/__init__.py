"""gpt-oss: what the network computes (config, layers, MXFP4, checkpoints, tokenizer + harmony)."""

from gptoss.checkpoint import CheckpointError
from gptoss.config import PRESETS, ModelConfig, get_preset
from gptoss.load import load_config, load_model
from gptoss.model import Transformer
from gptoss.writer import write_random_checkpoint

__all__ = ["CheckpointError", "ModelConfig", "PRESETS", "Transformer", "get_preset", "load_config",
           "load_model", "write_random_checkpoint"]
