"""`write_random_checkpoint`: random-weight checkpoints in the released layouts, for tests,
benchmarks and the embedded default model (no model hub is reachable from CI)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from gptoss import env, mxfp4
from gptoss.checkpoint import HF_INDEX, expected_shapes, hf_name, original_name
from gptoss.config import ModelConfig, get_preset

logger = logging.getLogger(__name__)

_SHARD_BYTES = 2 << 30


def write_random_checkpoint(path: str | Path, preset: str | ModelConfig, seed: int = 0,
                            layout: str = "hf", num_shards: int | None = None,
                            router_bias_boost: dict[int, float] | None = None) -> Path:
    """Writes a deterministic random-weight checkpoint.

    Args:
        path: output folder (created).
        preset: a preset name ("tiny", "small", "gpt-oss-20b", ...) or a ModelConfig.
        seed: every tensor is drawn from its own generator seeded by (seed, tensor name), so the
            weights do not depend on the layout or the sharding.
        layout: "hf" (the release layout: sharded safetensors + index + config.json with
            quantization_config) or "original" (OpenAI's `original/` layout: fused qkv, dtypes.json).
        num_shards: shard count; by default at least 2 (so sharding is always exercised) and at most
            ~2 GiB each.
        router_bias_boost: expert id -> added to its router bias in every layer: a skewed checkpoint
            whose routers favor a few experts, as real routing does (for expert load balancing).
    Returns:
        the folder written.
    """
    config = get_preset(preset) if isinstance(preset, str) else preset
    if layout not in ("hf", "original"):
        raise ValueError(f"layout must be 'hf' or 'original', got {layout!r}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    names = list(expected_shapes(config))
    total = sum(_nbytes(config, n) for n in names)
    num_shards = num_shards or max(2, math.ceil(total / _SHARD_BYTES))
    groups = _split(names, num_shards, config)
    weight_map: dict[str, str] = {}
    dtypes: dict[str, str] = {}
    for k, group in enumerate(groups, start=1):
        fname = (f"model-{k:05d}-of-{len(groups):05d}.safetensors" if layout == "hf"
                 else f"model--{k:05d}-of-{len(groups):05d}.safetensors")
        tensors = dict(_named_tensors(group, config, seed, layout, router_bias_boost or {}))
        save_file(tensors, out / fname, metadata={"format": "pt"})
        for name in tensors:
            weight_map[name] = fname
            dtypes[name] = "FP4" if name.endswith(".blocks") else "UE8" if name.endswith(".scales") else "BF16"
        logger.info("wrote shard %d/%d (%s)", k, len(groups), fname)  # a 120b checkpoint takes a while
    if layout == "hf":
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / HF_INDEX).write_text(json.dumps(index, indent=2))
        (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
        (out / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 199998, "eos_token_id": [200002, 199999, 200012], "pad_token_id": 199999}, indent=2))
    else:
        (out / "config.json").write_text(json.dumps(config.to_original_dict(), indent=2))
        (out / "dtypes.json").write_text(json.dumps(dict(sorted(dtypes.items())), indent=2))
    return out


def cached_random_checkpoint(preset: str, seed: int = 0) -> Path:
    """A random checkpoint of `preset` under $GPTOSS_CACHE_DIR/models, written once (atomically, so
    concurrent first users do not see half a checkpoint): the embedded default model and the
    benchmarks' default."""
    path = env.cache_root() / "models" / f"{preset}-seed{seed}"
    if not (path / "config.json").exists():
        logger.info("writing a random %s checkpoint (seed %d) to %s", preset, seed, path)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        write_random_checkpoint(tmp, preset, seed=seed)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _nbytes(config: ModelConfig, name: str) -> int:
    shape, kind = expected_shapes(config)[name]
    return math.prod(shape) * (1 if kind == "U8" else 2)


def _split(names: list[str], num_shards: int, config: ModelConfig) -> list[list[str]]:
    """Consecutive groups of roughly equal bytes, never splitting a layer's fused qkv."""
    target = sum(_nbytes(config, n) for n in names) / num_shards
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        fused_with_previous = ".self_attn.k_proj" in name or ".self_attn.v_proj" in name
        if size >= target and len(groups) < num_shards and not fused_with_previous:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += _nbytes(config, name)
    return [g for g in groups if g]


def random_tensor(name: str, config: ModelConfig, seed: int) -> torch.Tensor:
    """Our tensor `name` in float32 (expert `*_blocks` as the dense [E, out, in] weight), scaled so
    activations stay in a realistic range: unit-ish pre-norm activations, logits of std ~2."""
    shape, _ = expected_shapes(config)[name]
    if name.endswith("_blocks"):
        shape = (*shape[:-2], shape[-2] * mxfp4.BLOCK_SIZE)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    x = torch.randn(shape, generator=gen)
    if name.endswith("layernorm.weight") or name == "norm.weight":
        return 1.0 + 0.1 * x
    if name.endswith(("sinks", "embed_tokens.weight")):
        return 0.5 * x
    if name.endswith(".bias"):
        return 0.05 * x
    if name.endswith("_bias"):
        return 0.1 * x
    if "gate_up_proj" in name:
        gain = 1.5  # large enough that the swiglu clamp at 7 is sometimes reached
    elif "o_proj" in name or "down_proj" in name:
        gain = 0.7  # residual branches: keep the residual stream from growing fast
    else:
        gain = 2.0 if name == "lm_head.weight" else 1.0
    return gain * x / math.sqrt(shape[-1])


def _named_tensors(group: list[str], config: ModelConfig, seed: int, layout: str,
                   router_bias_boost: dict[int, float]) -> Iterator[tuple[str, torch.Tensor]]:
    fused: dict[str, list[torch.Tensor]] = {}
    for name in group:
        if name.endswith("_scales"):
            continue  # written with its blocks
        if name.endswith("_blocks"):
            stem = name.removesuffix("_blocks")
            blocks, scales = mxfp4.quantize(random_tensor(name, config, seed))
            for ours, t in ((name, blocks), (stem + "_scales", scales)):
                yield _checkpoint_name(ours, config, layout), t
            continue
        t = random_tensor(name, config, seed)
        if name.endswith("mlp.router.bias"):
            for expert, boost in router_bias_boost.items():
                t[expert] += boost
        t = t.to(torch.bfloat16)
        if layout == "original" and ".self_attn." in name and name.split(".")[-2] in ("q_proj", "k_proj", "v_proj"):
            key, _ = original_name(name, config)
            fused.setdefault(key, []).append(t)
            if len(fused[key]) == 3:  # q, k, v arrive in this order
                yield key, torch.cat(fused.pop(key)).contiguous()
            continue
        yield _checkpoint_name(name, config, layout), t.contiguous()
    assert not fused, f"qkv split across shards: {list(fused)}"


def _checkpoint_name(ours: str, config: ModelConfig, layout: str) -> str:
    return hf_name(ours) if layout == "hf" else original_name(ours, config)[0]
