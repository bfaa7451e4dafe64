"""`load_model`: a checkpoint folder -> a ready `Transformer` (all experts or an EP rank's share)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from gptoss import mxfp4
from gptoss.checkpoint import CheckpointError, CheckpointReader, detect_layout
from gptoss.config import ModelConfig
from gptoss.model import Transformer

# Experts dequantized at load go through float32 this many at a time, to bound peak memory.
_DEQUANT_EXPERTS_PER_CHUNK = 4


def load_config(path: str | Path) -> ModelConfig:
    return detect_layout(path).config


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               experts: list[int] | None = None, packed_experts: bool = False,
               progress: Callable[[int, int], None] | None = None) -> Transformer:
    """Loads a gpt-oss checkpoint (HF release layout or OpenAI `original/` layout).

    Args:
        path: the checkpoint folder (a repo root with only `original/` also works).
        dtype: float32 or bfloat16 for everything but packed expert weights.
        device: where the weights go ("cpu", "cuda", "cuda:1", ...).
        experts: global ids of the experts to load (an EP rank's share); None loads all. The other
            experts' bytes are never read.
        packed_experts: keep expert weights MXFP4-packed (4.25 bits/weight, dequantized per use)
            instead of dequantizing them at load.
        progress: called as progress(tensors_done, tensors_total) while loading (long loads show it).
    Returns:
        the model in eval mode; `model(token_ids [T])` -> float32 logits [T, vocab].
    Raises:
        CheckpointError (a ServerError) naming the file, the tensor and what is wrong.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    layout = detect_layout(path)
    config = layout.config
    expert_ids = _check_expert_ids(experts, config)
    reader = CheckpointReader(layout)
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(config, expert_ids, packed=packed_experts, dtype=dtype, device="meta")
    total = len(reader.expected)
    for done, name in enumerate(reader.expected, start=1):
        if progress is not None:
            progress(done - 1, total)
        is_expert = ".mlp.experts." in name
        if is_expert and name.endswith("_scales") and not packed_experts:
            continue  # read and consumed with its blocks
        tensor = reader.get(name, expert_ids if is_expert else None)
        if is_expert and name.endswith("_blocks") and not packed_experts:
            scales = reader.get(name.removesuffix("_blocks") + "_scales", expert_ids)
            _assign(model, name.removesuffix("_blocks"), _dequantize_chunked(tensor, scales, dtype, device))
            continue
        if tensor.dtype != torch.uint8:
            tensor = tensor.to(dtype)
        _assign(model, name, tensor.to(device))
    if progress is not None:
        progress(total, total)
    model.finish_load(device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not leftover, f"tensors never loaded: {leftover[:5]}"
    return model.eval()


def _check_expert_ids(experts: list[int] | None, config: ModelConfig) -> list[int] | None:
    if experts is None:
        return None
    ids = [int(e) for e in experts]
    bad = [e for e in ids if not 0 <= e < config.num_local_experts]
    if bad or not ids or len(set(ids)) != len(ids):
        raise ValueError(f"experts must be distinct ids in [0, {config.num_local_experts}), got {list(experts)}")
    return ids


def _dequantize_chunked(blocks, scales, dtype, device) -> torch.Tensor:
    out = torch.empty(*blocks.shape[:-2], blocks.shape[-2] * mxfp4.BLOCK_SIZE, dtype=dtype, device=device)
    for start in range(0, blocks.shape[0], _DEQUANT_EXPERTS_PER_CHUNK):
        stop = start + _DEQUANT_EXPERTS_PER_CHUNK
        out[start:stop] = mxfp4.dequantize(blocks[start:stop].to(device), scales[start:stop].to(device), dtype)
    return out


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Puts a loaded tensor in place of the meta placeholder of the same name."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise CheckpointError(f"internal: no model tensor named {name}")


