"""Checkpoint layouts: the HF release layout and OpenAI's `original/` layout, read memory-mapped.

Both are mapped onto the model's own tensor names (the HF names without `model.`). Only safetensors
are ever read; nothing is unpickled. Expert tensors are read per contiguous run of the requested
experts, so a rank that owns a share of the experts never touches the bytes of the others.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from safetensors import safe_open

from gptoss import mxfp4
from gptoss.config import ModelConfig
from gptoss.errors import CheckpointError, InsufficientMemoryError
from gptoss.memory import is_out_of_memory

HF_INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = ("BF16", "F16", "F32")
_LAYER_NUMBER = re.compile(r"[0-9]+")  # ASCII only: int() would also take "\u0663" or " 3"


@dataclass(frozen=True)
class Source:
    """Where one of our tensors lives: a checkpoint tensor, optionally a row range of it (fused qkv)."""

    file: Path
    name: str
    rows: tuple[int, int] | None = None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Our tensor name -> (full shape, dtype kind: "float" or "U8")."""
    h, i, e, v = config.hidden_size, config.intermediate_size, config.num_local_experts, config.vocab_size
    g_h, g_i = h // mxfp4.BLOCK_SIZE, i // mxfp4.BLOCK_SIZE
    out: dict[str, tuple[tuple[int, ...], str]] = {
        "embed_tokens.weight": ((v, h), "float"),
        "norm.weight": ((h,), "float"),
        "lm_head.weight": ((v, h), "float"),
    }
    for n in range(config.num_hidden_layers):
        p = f"layers.{n}."
        out.update({
            p + "input_layernorm.weight": ((h,), "float"),
            p + "post_attention_layernorm.weight": ((h,), "float"),
            p + "self_attn.q_proj.weight": ((config.q_size, h), "float"),
            p + "self_attn.q_proj.bias": ((config.q_size,), "float"),
            p + "self_attn.k_proj.weight": ((config.kv_size, h), "float"),
            p + "self_attn.k_proj.bias": ((config.kv_size,), "float"),
            p + "self_attn.v_proj.weight": ((config.kv_size, h), "float"),
            p + "self_attn.v_proj.bias": ((config.kv_size,), "float"),
            p + "self_attn.o_proj.weight": ((h, config.q_size), "float"),
            p + "self_attn.o_proj.bias": ((h,), "float"),
            p + "self_attn.sinks": ((config.num_attention_heads,), "float"),
            p + "mlp.router.weight": ((e, h), "float"),
            p + "mlp.router.bias": ((e,), "float"),
            p + "mlp.experts.gate_up_proj_blocks": ((e, 2 * i, g_h, 16), "U8"),
            p + "mlp.experts.gate_up_proj_scales": ((e, 2 * i, g_h), "U8"),
            p + "mlp.experts.gate_up_proj_bias": ((e, 2 * i), "float"),
            p + "mlp.experts.down_proj_blocks": ((e, h, g_i, 16), "U8"),
            p + "mlp.experts.down_proj_scales": ((e, h, g_i), "U8"),
            p + "mlp.experts.down_proj_bias": ((e, h), "float"),
        })
    return out


# --- name maps --------------------------------------------------------------------------------

def hf_name(ours: str) -> str:
    return ours if ours.startswith("lm_head.") else "model." + ours


_ORIGINAL_LAYER = {
    "input_layernorm.weight": "attn.norm.scale",
    "self_attn.sinks": "attn.sinks",
    "self_attn.o_proj.weight": "attn.out.weight",
    "self_attn.o_proj.bias": "attn.out.bias",
    "post_attention_layernorm.weight": "mlp.norm.scale",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.router.bias": "mlp.gate.bias",
    "mlp.experts.gate_up_proj_blocks": "mlp.mlp1_weight.blocks",
    "mlp.experts.gate_up_proj_scales": "mlp.mlp1_weight.scales",
    "mlp.experts.gate_up_proj_bias": "mlp.mlp1_bias",
    "mlp.experts.down_proj_blocks": "mlp.mlp2_weight.blocks",
    "mlp.experts.down_proj_scales": "mlp.mlp2_weight.scales",
    "mlp.experts.down_proj_bias": "mlp.mlp2_bias",
}
_ORIGINAL_TOP = {"embed_tokens.weight": "embedding.weight", "norm.weight": "norm.scale",
                 "lm_head.weight": "unembedding.weight"}


def original_name(ours: str, config: ModelConfig) -> tuple[str, tuple[int, int] | None]:
    """Our name -> (original name, row range within the fused qkv tensor or None)."""
    if ours in _ORIGINAL_TOP:
        return _ORIGINAL_TOP[ours], None
    _, n, rest = ours.split(".", 2)
    prefix = f"block.{n}."
    if rest in _ORIGINAL_LAYER:
        return prefix + _ORIGINAL_LAYER[rest], None
    proj, kind = rest.removeprefix("self_attn.").split(".")  # q_proj.weight -> attn.qkv.weight rows
    q, kv = config.q_size, config.kv_size
    rows = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}[proj]
    return f"{prefix}attn.qkv.{kind}", rows


# --- layout detection -------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    kind: str  # "hf" or "original"
    root: Path  # the folder holding config.json and the shards
    config: ModelConfig
    name_to_file: dict[str, Path]  # checkpoint tensor name -> shard


def _check_regular_file(file: Path) -> None:
    """Refuses what is not a regular file (after symlinks) before anything opens it: a FIFO would block
    the load, a device would be read forever."""
    try:
        mode = os.stat(file).st_mode
    except FileNotFoundError:
        return  # the caller names the missing file in its own words
    except OSError as e:
        raise CheckpointError(f"{file}: cannot stat ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{file}: not a regular file")


def _open_error(file: Path, error: Exception) -> CheckpointError | InsufficientMemoryError:
    """A shard that safetensors could not open: broken, or no memory left to map it (not its fault)."""
    if is_out_of_memory(error):
        return InsufficientMemoryError(f"{file}: out of memory while opening it ({error}); the file is not at fault")
    return CheckpointError(f"{file}: not a readable safetensors file ({error})")


def _scan_shards(files: list[Path]) -> dict[str, Path]:
    name_to_file: dict[str, Path] = {}
    for f in files:
        _check_regular_file(f)
        try:
            with safe_open(f, framework="pt") as handle:
                for name in handle.keys():
                    name_to_file[name] = f
        except Exception as e:  # safetensors raises its own error types for a broken header
            raise _open_error(f, e) from None
    return name_to_file


def _read_index(root: Path, index: Path) -> dict[str, Path]:
    """The index's weight_map as tensor name -> shard path, every shard inside `root`. A shard may be a
    symlink that leads elsewhere (the HF cache links snapshots/ to ../../blobs/), but the name in the
    index may not: no absolute paths, no `..`."""
    _check_regular_file(index)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: weight_map must be an object of tensor name -> shard file name, "
                              f"got a {type(weight_map).__name__}")
    name_to_file: dict[str, Path] = {}
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or not fname:
            raise CheckpointError(f"{index}: weight_map[{name!r}] must be a shard file name, got {fname!r}")
        relative = PurePosixPath(fname)
        if relative.is_absolute() or ".." in relative.parts:
            raise CheckpointError(f"{index}: weight_map[{name!r}] = {fname}: shard path leaves the checkpoint "
                                  f"folder (absolute, or through ..)")
        name_to_file[name] = root / relative
    for f in sorted(set(name_to_file.values())):
        if not f.exists():
            raise CheckpointError(f"{f}: shard named in {HF_INDEX} is missing")
        _check_regular_file(f)
    return name_to_file


def detect_layout(path: str | Path) -> Layout:
    """Finds the layout at `path`: a HF release folder, an `original/` folder, or a repo root with
    only `original/`."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such checkpoint folder")
    index = root / HF_INDEX
    shards = sorted(root.glob("*.safetensors"))
    if not shards and (root / "original").is_dir():
        return detect_layout(root / "original")
    if not shards:
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f"; found {pickles}, which are pickles and are never loaded" if pickles else ""
        raise CheckpointError(f"{root}: unknown checkpoint layout: no *.safetensors files{found}")
    _check_regular_file(root / "config.json")
    config = ModelConfig.from_json_file(root / "config.json")
    name_to_file = _read_index(root, index) if index.exists() else _scan_shards(shards)
    if any(n.startswith("model.layers.") for n in name_to_file):
        kind = "hf"
    elif any(n.startswith("block.") for n in name_to_file):
        kind = "original"
    else:
        raise CheckpointError(f"{root}: unknown checkpoint layout: tensor names are neither HF "
                              f"(model.layers.N...) nor OpenAI original (block.N...)")
    return Layout(kind, root, config, name_to_file)


# --- reading ----------------------------------------------------------------------------------

class CheckpointReader:
    """Reads our tensors from either layout, checking shape and dtype against the config."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.config = layout.config
        self.expected = expected_shapes(self.config)
        self._handles: dict[Path, object] = {}
        self._check_no_extra_layers()

    def _check_no_extra_layers(self) -> None:
        n = self.config.num_hidden_layers
        for name, f in self.layout.name_to_file.items():
            prefix = next((p for p in ("model.layers.", "block.") if name.startswith(p)), None)
            if prefix is None:
                continue
            layer = name.removeprefix(prefix).split(".", 1)[0]
            if not _LAYER_NUMBER.fullmatch(layer):
                raise CheckpointError(f"{f}: {name}: malformed tensor name (layer number {layer!r} after "
                                      f"{prefix!r} is not a decimal number)")
            if int(layer) >= n:
                raise CheckpointError(f"{f}: {name}: config mismatch: tensor for layer {layer} "
                                      f"but config.json says num_hidden_layers={n}")

    def source(self, ours: str) -> Source:
        if self.layout.kind == "hf":
            name, rows = hf_name(ours), None
        else:
            name, rows = original_name(ours, self.config)
        file = self.layout.name_to_file.get(name)
        if file is None:
            raise CheckpointError(f"{self.layout.root}: {name}: missing tensor (needed for {ours})")
        return Source(file, name, rows)

    def _slice(self, src: Source):
        handle = self._handles.get(src.file)
        if handle is None:
            try:
                handle = safe_open(src.file, framework="pt")
            except Exception as e:
                raise _open_error(src.file, e) from None
            self._handles[src.file] = handle
        try:
            return handle.get_slice(src.name)
        except Exception:
            raise CheckpointError(f"{src.file}: {src.name}: missing tensor (listed in the index)") from None

    def _check(self, ours: str, src: Source, sl) -> None:
        want_shape, kind = self.expected[ours]
        shape = tuple(sl.get_shape())
        if src.rows is not None:  # the fused qkv holds q, k and v rows one after another
            c = self.config
            want_shape = (c.q_size + 2 * c.kv_size, *want_shape[1:])
        dtype = sl.get_dtype()
        if shape != want_shape:
            raise CheckpointError(f"{src.file}: {src.name}: shape {list(sl.get_shape())} does not match "
                                  f"config.json (expected {list(want_shape)} for {ours})")
        ok = dtype in FLOAT_DTYPES if kind == "float" else dtype == kind
        if not ok:
            want = "a float dtype (BF16/F16/F32)" if kind == "float" else kind
            raise CheckpointError(f"{src.file}: {src.name}: dtype {dtype}, expected {want}")

    def read_range(self, src: Source, sl, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dim 0: the one place bytes come off disk."""
        return sl[start:stop]

    def get(self, ours: str, expert_ids: list[int] | None = None) -> torch.Tensor:
        """Our tensor `ours`; for expert tensors only the experts `expert_ids` (in that order)."""
        src = self.source(ours)
        sl = self._slice(src)
        self._check(ours, src, sl)
        if src.rows is not None:
            return self.read_range(src, sl, *src.rows)
        if expert_ids is None:
            return self.read_range(src, sl, 0, sl.get_shape()[0])
        parts = [self.read_range(src, sl, a, b) for a, b in contiguous_runs(expert_ids)]
        return torch.cat(parts) if len(parts) != 1 else parts[0]


def contiguous_runs(ids: list[int]) -> list[tuple[int, int]]:
    """[0, 1, 2, 5, 6] -> [(0, 3), (5, 7)]: ranges to read in one go each."""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
