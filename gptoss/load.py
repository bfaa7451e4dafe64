"""`load_model`: a checkpoint folder -> a ready `Transformer` (all experts or an EP rank's share).

Before a byte is read, the memory the load needs (`estimate_load`, from the config alone) is set
against what the device has free: a load that cannot fit is refused with `InsufficientMemoryError`
naming the options, rather than dying halfway in (or blaming a file for the kernel's ENOMEM).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gptoss import memory, mxfp4, mxfp4_linear
from gptoss.checkpoint import CheckpointError, CheckpointReader, detect_layout, expected_shapes
from gptoss.config import ModelConfig
from gptoss.errors import GptossError, InsufficientMemoryError
from gptoss.memory import gib
from gptoss.model import Transformer

logger = logging.getLogger(__name__)

# Experts dequantized at load go through float32 this many at a time, to bound peak memory.
_DEQUANT_EXPERTS_PER_CHUNK = 4
# Bytes per weight held while a chunk dequantizes (mxfp4.dequantize): float32 values and their scaled
# copy (8), the int32 index of each byte (2), the cast to the model dtype (up to 4).
_DEQUANT_TRANSIENT_BYTES_PER_WEIGHT = 14
# Released checkpoints hold their float tensors in bf16: a tensor is read at that size, then converted.
_CHECKPOINT_FLOAT_BYTES = 2
# packed_experts=None dequantizes only if the load then takes at most this share of the free memory:
# the KV cache, activations and the rest of the process need the remainder.
AUTO_DEQUANTIZE_MAX_SHARE = 0.8


@dataclass(frozen=True)
class LoadEstimate:
    """Bytes a load holds on its device (see `estimate_load`)."""

    replicated_bytes: int  # attention, norms, router, embedding, unembedding, in the model dtype
    expert_bytes: int  # the loaded experts: MXFP4 blocks + scales or dequantized weights, and biases
    transient_bytes: int  # held besides, at most, while one tensor is read and converted

    @property
    def resident_bytes(self) -> int:
        return self.replicated_bytes + self.expert_bytes

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + self.transient_bytes


def estimate_load(config: ModelConfig, dtype: torch.dtype, packed_experts: bool,
                  experts: list[int] | None = None) -> LoadEstimate:
    """What `load_model` with these arguments holds, from the config alone (no file is read).

    Experts packed take 4.25 bits per weight (16 bytes of codes + 1 scale byte per 32 weights);
    dequantized, the model dtype's size. The transient is the larger of a float tensor read in bf16
    before its conversion and one projection's packed bytes (read whole, then dequantized chunk by
    chunk, or concatenated from the runs of an expert subset) with a dequantizing chunk's scratch.
    """
    num_experts = config.num_local_experts if experts is None else len(experts)
    size = dtype.itemsize
    replicated = expert = largest_float = largest_packed = largest_projection = 0
    for name, (shape, kind) in expected_shapes(config).items():
        numel = math.prod(shape)
        if ".mlp.experts." not in name:
            replicated += numel * size
            largest_float = max(largest_float, numel)
            continue
        numel = numel // config.num_local_experts * num_experts
        if kind == "float":  # biases
            expert += numel * size
        elif packed_experts:
            expert += numel
        elif name.endswith("_blocks"):
            expert += 2 * numel * size  # two weights a byte
        if name.endswith("_blocks"):
            num_weights = 2 * numel
            largest_packed = max(largest_packed, mxfp4.packed_nbytes(num_weights))
            largest_projection = max(largest_projection, num_weights // num_experts)
    transient = largest_packed
    if not packed_experts:
        chunk = min(_DEQUANT_EXPERTS_PER_CHUNK, num_experts) * largest_projection
        transient += chunk * _DEQUANT_TRANSIENT_BYTES_PER_WEIGHT
    transient = max(transient, largest_float * _CHECKPOINT_FLOAT_BYTES)
    return LoadEstimate(replicated, expert, transient)


def estimate_load_bytes(config: ModelConfig, dtype: torch.dtype, packed_experts: bool,
                        experts: list[int] | None = None) -> int:
    """The bytes a load needs at its peak on its device: `estimate_load(...).total_bytes`."""
    return estimate_load(config, dtype, packed_experts, experts).total_bytes


# dtype names as configs and the CLI spell them.
TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_config(path: str | Path) -> ModelConfig:
    return detect_layout(path).config


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               experts: list[int] | None = None, packed_experts: bool | None = None,
               progress: Callable[[int, int], None] | None = None,
               progress_bytes: Callable[[int, int], None] | None = None,
               check_memory: bool = True, reserve_bytes: int = 0) -> Transformer:
    """Loads a gpt-oss checkpoint (HF release layout or OpenAI `original/` layout).

    Args:
        path: the checkpoint folder (a repo root with only `original/` also works).
        dtype: float32 or bfloat16 for everything but packed expert weights.
        device: where the weights go ("cpu", "cuda", "cuda:1", ...).
        experts: global ids of the experts to load (an EP rank's share); None loads all. The other
            experts' bytes are never read.
        packed_experts: True keeps expert weights MXFP4-packed (4.25 bits/weight; on CPU multiplied
            from the codes by the MXFP4 kernel, elsewhere dequantized per use); False dequantizes
            them at load (~3.8x the bytes in bf16; faster per token on GPU); None (auto, logged):
            packed on CPU where the MXFP4 kernel is available (float32/bfloat16), else dequantized
            only if that fits the device's free memory with room to spare.
        progress: called as progress(tensors_done, tensors_total) while loading (long loads show it).
        progress_bytes: called as progress_bytes(bytes_done, bytes_total) after each tensor lands.
        check_memory: refuse a load that `estimate_load` says does not fit the free memory.
        reserve_bytes: what the caller allocates on the device right after the load, counted in that
            check (serving's unembedding copies: `gptoss.model.unembedding_copy_bytes`).
    Returns:
        the model in eval mode; `model(token_ids [T])` -> float32 logits [T, vocab].
    Raises:
        CheckpointError (a ServerError) naming the file, the tensor and what is wrong.
        InsufficientMemoryError (a ServerError) saying need, free and the options, before loading
        or when an allocation fails during it.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    layout = detect_layout(path)
    config = layout.config
    expert_ids = _check_expert_ids(experts, config)
    reader = CheckpointReader(layout)
    device = torch.device(device)
    packed = _plan_memory(layout.root, config, dtype, device, expert_ids, packed_experts, check_memory,
                          reserve_bytes)
    with torch.device("meta"):
        model = Transformer(config, expert_ids, packed=packed, dtype=dtype, device="meta")
    try:
        _read_weights(model, reader, expert_ids, packed, dtype, device, progress, progress_bytes)
    except Exception as e:
        out_of_memory = not isinstance(e, GptossError) and memory.is_out_of_memory(e)
        if out_of_memory or isinstance(e, InsufficientMemoryError):
            loaded = sum(t.nbytes for t in model.state_dict().values() if not t.is_meta)
            need = estimate_load(config, dtype, packed, expert_ids)
            raise InsufficientMemoryError(
                f"{layout.root}: out of memory on {device} after loading {gib(loaded)} of "
                f"~{gib(need.total_bytes)} ({e}); the checkpoint is not at fault. Options: "
                + "; ".join(_memory_options(config, dtype, expert_ids, packed, free=None))) from e
        raise
    model.finish_load(device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not leftover, f"tensors never loaded: {leftover[:5]}"
    return model.eval()


def _plan_memory(root: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                 expert_ids: list[int] | None, packed_experts: bool | None, check_memory: bool,
                 reserve_bytes: int = 0) -> bool:
    """Settles packed_experts=None (auto) and refuses a load that would not fit (with `reserve_bytes`
    besides); returns `packed`."""
    free = memory.available_bytes(device) if check_memory or packed_experts is None else None
    if packed_experts is None:
        dequantized = estimate_load_bytes(config, dtype, False, expert_ids)
        if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and mxfp4_linear.available():
            # bench_engine, 2 cores of Zen 3 and of Zen 4, float32 and bf16: 1.2-1.6x the tokens/s of
            # dequantized experts at 1-32 concurrent prompts.
            packed_experts, why = True, ("the MXFP4 kernel runs them faster on CPU than dequantized weights, "
                                         f"in ~{gib(estimate_load_bytes(config, dtype, True, expert_ids))} "
                                         f"instead of ~{gib(dequantized)}")
        elif free is None:
            packed_experts, why = False, f"the free memory of {device} is unknown"
        elif dequantized + reserve_bytes <= AUTO_DEQUANTIZE_MAX_SHARE * free:
            packed_experts, why = False, f"they need ~{gib(dequantized)} of {gib(free)} free"
        else:
            packed_experts, why = True, (f"dequantized they would need ~{gib(dequantized)}, more than "
                                         f"{AUTO_DEQUANTIZE_MAX_SHARE:.0%} of {gib(free)} free")
        kept = "packed (MXFP4)" if packed_experts else f"dequantized to {_dtype_name(dtype)}"
        logger.info("%s: experts kept %s on %s: %s", root, kept, device, why)
    if check_memory and free is not None:
        need = estimate_load_bytes(config, dtype, packed_experts, expert_ids) + reserve_bytes
        if need > free:
            num_experts = config.num_local_experts if expert_ids is None else len(expert_ids)
            held = "MXFP4-packed" if packed_experts else f"dequantized to {_dtype_name(dtype)}"
            copies = f", and {gib(reserve_bytes)} of unembedding copies for serving" if reserve_bytes else ""
            raise InsufficientMemoryError(
                f"{root}: loading needs ~{gib(need)} on {device} ({num_experts} experts {held}, the rest in "
                f"{_dtype_name(dtype)}{copies}) but only {gib(free)} is {memory.describe_free(device)}. Options: "
                + "; ".join(_memory_options(config, dtype, expert_ids, packed_experts, free)))
    return packed_experts


def _memory_options(config: ModelConfig, dtype: torch.dtype, expert_ids: list[int] | None, packed: bool,
                    free: int | None) -> list[str]:
    """What would make the load smaller, each with its figure; the EP group is the smallest whose
    ranks fit `free` (any smaller than now when `free` is unknown)."""
    options = []
    if not packed:
        options.append(f"packed_experts=True (~{gib(estimate_load_bytes(config, dtype, True, expert_ids))})")
    if dtype.itemsize > 2:
        bf16 = estimate_load_bytes(config, torch.bfloat16, packed, expert_ids)
        options.append(f"dtype=torch.bfloat16 (~{gib(bf16)})")
    num_experts = config.num_local_experts if expert_ids is None else len(expert_ids)
    ranks = [g for g in range(2, config.num_local_experts + 1)
             if config.num_local_experts % g == 0 and config.num_local_experts // g < num_experts]
    for g in ranks:  # the largest group when none fits
        need = estimate_load_bytes(config, dtype, packed, list(range(config.num_local_experts // g)))
        if free is None or need <= free or g == ranks[-1]:
            options.append(f"fewer experts per rank: an EP group of {g} ranks holds "
                           f"{config.num_local_experts // g} experts a rank (~{gib(need)} each)")
            break
    options.append("check_memory=False to try anyway")
    return options


def _read_weights(model: Transformer, reader: CheckpointReader, expert_ids: list[int] | None, packed: bool,
                  dtype: torch.dtype, device: torch.device, progress: Callable[[int, int], None] | None,
                  progress_bytes: Callable[[int, int], None] | None) -> None:
    """Puts every checkpoint tensor in place of its meta placeholder in `model`."""
    total = len(reader.expected)
    num_bytes_total = estimate_load(reader.config, dtype, packed, expert_ids).resident_bytes
    num_bytes_done = 0
    for done, name in enumerate(reader.expected, start=1):
        if progress is not None:
            progress(done - 1, total)
        is_expert = ".mlp.experts." in name
        if is_expert and name.endswith("_scales") and not packed:
            continue  # read and consumed with its blocks
        name, tensor = _read_as_held(reader, name, expert_ids if is_expert else None, packed, dtype, device)
        _assign(model, name, tensor)
        num_bytes_done += tensor.nbytes
        if progress_bytes is not None:
            progress_bytes(num_bytes_done, num_bytes_total)
    if progress is not None:
        progress(total, total)


def read_experts(reader: CheckpointReader, layer: int, expert_ids: list[int], packed: bool, dtype: torch.dtype,
                 device: str | torch.device) -> dict[str, torch.Tensor]:
    """The weights of experts `expert_ids` (in that order) of MoE layer `layer`, as an `Experts` of that
    layer holds them (packed: MXFP4 blocks and scales; else dequantized to `dtype`), by `Experts` buffer
    name: what an EP rank that newly holds these experts needs (parallel/rebalance.py)."""
    prefix = f"layers.{layer}.mlp.experts."
    out = {}
    for name in reader.expected:
        if name.startswith(prefix) and not (name.endswith("_scales") and not packed):
            held_name, tensor = _read_as_held(reader, name, expert_ids, packed, dtype, torch.device(device))
            out[held_name.removeprefix(prefix)] = tensor
    return out


def _read_as_held(reader: CheckpointReader, name: str, expert_ids: list[int] | None, packed: bool,
                  dtype: torch.dtype, device: torch.device) -> tuple[str, torch.Tensor]:
    """Checkpoint tensor `name` (of experts `expert_ids` only, for expert tensors) as the model holds it
    on `device`, with the model's name for it: floats in `dtype`; experts' MXFP4 blocks kept packed or
    dequantized (then read with their scales, and named without the `_blocks` suffix)."""
    tensor = reader.get(name, expert_ids)
    if ".mlp.experts." in name and name.endswith("_blocks") and not packed:
        scales = reader.get(name.removesuffix("_blocks") + "_scales", expert_ids)
        return name.removesuffix("_blocks"), _dequantize_chunked(tensor, scales, dtype, device)
    if tensor.dtype != torch.uint8:
        tensor = tensor.to(dtype)
    return name, tensor.to(device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
        out[start:stop] = mxfp4_linear.dequantize(blocks[start:stop].to(device), scales[start:stop].to(device),
                                                  dtype)
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


