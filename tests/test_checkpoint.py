"""Checkpoint layouts, expert-subset loading and the errors of broken checkpoints."""

import contextlib
import json
import os
import shutil
import struct
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import gptoss
from gptoss.checkpoint import CheckpointError, CheckpointReader

IDS = torch.randint(0, 201088, (24,), generator=torch.Generator().manual_seed(0))


def tensor_file(path, name):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path / index["weight_map"][name]


def tensor_byte_range(file, name):
    """Absolute byte range of tensor `name` in a safetensors file."""
    header_len = struct.unpack("<Q", file.read_bytes()[:8])[0]
    header = json.loads(file.read_bytes()[8:8 + header_len])
    start, stop = header[name]["data_offsets"]
    return 8 + header_len + start, 8 + header_len + stop, header[name]["shape"]


@pytest.fixture
def ckpt_copy(tiny_checkpoint, tmp_path):
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


def rewrite_shard(path, name, change):
    """Rewrites the shard holding `name` with change(tensors) applied (a dict edit)."""
    file = tensor_file(path, name)
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def test_hf_and_original_layouts_load_to_the_same_logits(tmp_path, tiny_model):
    original = gptoss.write_random_checkpoint(tmp_path / "repo" / "original", "tiny", seed=0, layout="original")
    assert (original / "dtypes.json").exists()
    names = json.loads((original / "dtypes.json").read_text())
    assert names["block.0.attn.qkv.weight"] == "BF16" and names["block.1.mlp.mlp1_weight.blocks"] == "FP4"
    for path in (original, tmp_path / "repo"):  # the original/ folder itself, or a repo root holding it
        model = gptoss.load_model(path, dtype=torch.float32)
        assert torch.equal(model(IDS), tiny_model(IDS))


def test_expert_subset_load_reads_none_of_the_other_experts_bytes(ckpt_copy, tiny_model, monkeypatch):
    keep = [1, 2, 5]
    # Overwrite every other expert's bytes with garbage: a load that read them would differ or fail.
    for n in range(2):
        for part in ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias",
                     "down_proj_blocks", "down_proj_scales", "down_proj_bias"):
            name = f"model.layers.{n}.mlp.experts.{part}"
            file = tensor_file(ckpt_copy, name)
            start, stop, shape = tensor_byte_range(file, name)
            per_expert = (stop - start) // shape[0]
            data = bytearray(file.read_bytes())
            for e in set(range(shape[0])) - set(keep):
                data[start + e * per_expert:start + (e + 1) * per_expert] = b"\xff" * per_expert
            file.write_bytes(bytes(data))
    reads = []
    original_read = CheckpointReader.read_range

    def recording_read(self, src, sl, a, b):
        reads.append((src.name, a, b))
        return original_read(self, src, sl, a, b)

    monkeypatch.setattr(CheckpointReader, "read_range", recording_read)
    subset = gptoss.load_model(ckpt_copy, dtype=torch.float32, experts=keep)
    expert_reads = [(a, b) for name, a, b in reads if ".experts." in name]
    assert expert_reads and all(set(range(a, b)) <= set(keep) for a, b in expert_reads)
    for n in range(2):
        mine, full = subset.layers[n].mlp.experts, tiny_model.layers[n].mlp.experts
        assert mine.expert_ids == keep
        for e_local, e in enumerate(keep):
            for proj in ("gate_up_proj", "down_proj"):
                assert torch.equal(mine.weight(proj, e_local), full.weight(proj, e))
                assert torch.equal(getattr(mine, proj + "_bias")[e_local], getattr(full, proj + "_bias")[e])


def test_a_model_missing_routed_experts_says_so(tiny_checkpoint):
    model = gptoss.load_model(tiny_checkpoint, dtype=torch.float32, experts=[0])
    with pytest.raises(RuntimeError, match="not held by this model"):
        model(IDS)


@pytest.mark.parametrize("experts", [[], [0, 0], [8], [-1]], ids=["empty", "repeated", "too-big", "negative"])
def test_bad_expert_ids_are_rejected(tiny_checkpoint, experts):
    with pytest.raises(ValueError, match="experts must be distinct ids"):
        gptoss.load_model(tiny_checkpoint, experts=experts)


def test_missing_tensor_names_file_and_tensor(ckpt_copy):
    name = "model.layers.1.self_attn.sinks"
    file = rewrite_shard(ckpt_copy, name, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"{file}: {name}: missing tensor"):
        gptoss.load_model(ckpt_copy)


def test_tensor_absent_from_the_index_is_missing(ckpt_copy):
    index_file = ckpt_copy / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"]["lm_head.weight"]
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lm_head.weight: missing tensor"):
        gptoss.load_model(ckpt_copy)


def test_wrong_shape_names_the_tensor_and_both_shapes(ckpt_copy):
    name = "model.layers.0.self_attn.q_proj.weight"
    file = rewrite_shard(ckpt_copy, name, lambda t: t.update({name: t[name][:-1].clone()}))
    with pytest.raises(CheckpointError, match=rf"{file}: {name}: shape \[127, 64\] .*expected \[128, 64\]"):
        gptoss.load_model(ckpt_copy)


def test_wrong_dtype_names_the_tensor(ckpt_copy):
    name = "model.layers.0.mlp.experts.down_proj_scales"
    rewrite_shard(ckpt_copy, name, lambda t: t.update({name: t[name].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=rf"{name}: dtype I32, expected U8"):
        gptoss.load_model(ckpt_copy)


def test_config_that_disagrees_with_the_tensors(ckpt_copy):
    config_file = ckpt_copy / "config.json"
    config = json.loads(config_file.read_text())
    config.update(num_hidden_layers=1, layer_types=config["layer_types"][:1])
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config mismatch: tensor for layer 1 but config.json says "
                                              "num_hidden_layers=1"):
        gptoss.load_model(ckpt_copy)


def test_inconsistent_config_json_names_the_field(ckpt_copy):
    config_file = ckpt_copy / "config.json"
    config = json.loads(config_file.read_text())
    config["num_experts_per_tok"] = 99
    config_file.write_text(json.dumps(config))
    # A broken checkpoint is the server's fault: a CheckpointError, never a client's ValueError.
    with pytest.raises(CheckpointError, match="config.json: model config: num_experts_per_tok must be <=") as info:
        gptoss.load_model(ckpt_copy)
    assert not isinstance(info.value, ValueError) and info.value.http_status == 500


def test_missing_shard_is_named(ckpt_copy):
    (ckpt_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: shard named in .* is missing"):
        gptoss.load_model(ckpt_copy)


def test_pickle_checkpoints_are_refused(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="unknown checkpoint layout.*pickles and are never loaded"):
        gptoss.load_model(tmp_path)


def test_unknown_tensor_names_are_an_unknown_layout(tmp_path, tiny_checkpoint):
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "config.json")
    save_file({"transformer.h.0.attn.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        gptoss.load_model(tmp_path)


def test_corrupt_safetensors_file_is_named(tmp_path, tiny_checkpoint):
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        gptoss.load_model(tmp_path)


def test_release_layout_on_disk(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    blocks = load_file(tensor_file(tiny_checkpoint, "model.layers.0.mlp.experts.gate_up_proj_blocks"))
    assert blocks["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (8, 128, 2, 16)
    assert blocks["model.layers.0.mlp.experts.gate_up_proj_blocks"].dtype == torch.uint8


def test_writer_is_deterministic_from_the_seed(tmp_path):
    a = gptoss.write_random_checkpoint(tmp_path / "a", "tiny", seed=7)
    b = gptoss.write_random_checkpoint(tmp_path / "b", "tiny", seed=7)
    c = gptoss.write_random_checkpoint(tmp_path / "c", "tiny", seed=8)
    for f in sorted(a.glob("*.safetensors")):
        assert f.read_bytes() == (b / f.name).read_bytes()
        assert f.read_bytes() != (c / f.name).read_bytes()


def test_config_reads_both_json_forms():
    for preset in ("gpt-oss-120b", "gpt-oss-20b", "small"):
        config = gptoss.get_preset(preset)
        assert gptoss.ModelConfig.from_dict(config.to_hf_dict()) == config
        assert gptoss.ModelConfig.from_dict(config.to_original_dict()).replace(
            max_position_embeddings=config.max_position_embeddings) == config
    big = gptoss.get_preset("gpt-oss-120b")
    assert 116e9 < big.num_params < 118e9
    assert 20.5e9 < gptoss.get_preset("gpt-oss-20b").num_params < 21.5e9


def test_newer_rope_parameters_key_is_read():
    raw = gptoss.get_preset("tiny").to_hf_dict()
    raw["rope_parameters"] = dict(raw.pop("rope_scaling"), rope_theta=150000.0)
    assert gptoss.ModelConfig.from_dict(raw) == gptoss.get_preset("tiny")


def edit_index(path, change):
    """Rewrites the checkpoint's index with change(index) applied (a dict edit)."""
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    change(index)
    index_file.write_text(json.dumps(index))


@pytest.mark.parametrize("change", [
    lambda i: i.update(weight_map=list(i["weight_map"].items())),
    lambda i: i["weight_map"].update({"lm_head.weight": 3}),
    lambda i: i["weight_map"].update({"lm_head.weight": None}),
    lambda i: i["weight_map"].update({"lm_head.weight": ["model-00001-of-00002.safetensors"]}),
    lambda i: i["weight_map"].update({"lm_head.weight": ""}),
], ids=["list", "int-file", "null-file", "list-file", "empty-file"])
def test_an_index_that_does_not_map_names_to_file_names_is_a_checkpoint_error(ckpt_copy, change):
    edit_index(ckpt_copy, change)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: .*weight_map"):
        gptoss.load_model(ckpt_copy)


@pytest.mark.parametrize("name", ["model.layers.x.foo", "model.layers..mlp", "model.layers.", "block..",
                                  "block.1e3.attn", "model.layers.\u0663.mlp"],
                         ids=["letter", "empty", "nothing-after", "block-empty", "float-like", "arabic-digit"])
def test_a_tensor_name_with_a_malformed_layer_number_is_a_checkpoint_error(ckpt_copy, name):
    edit_index(ckpt_copy, lambda i: i["weight_map"].update({name: "model-00001-of-00002.safetensors"}))
    with pytest.raises(CheckpointError, match=f"{name}: malformed tensor name"):
        gptoss.load_model(ckpt_copy)


@pytest.mark.parametrize("shard", ["{outside}", "../outside.safetensors", "sub/../../outside.safetensors"],
                         ids=["absolute", "parent", "parent-after-a-folder"])
def test_a_shard_path_in_the_index_that_leaves_the_checkpoint_folder_is_refused(ckpt_copy, tmp_path, shard):
    # A valid shard outside the folder: a load that followed the path would succeed.
    outside = shutil.copy(ckpt_copy / "model-00002-of-00002.safetensors", tmp_path / "outside.safetensors")
    (ckpt_copy / "sub").mkdir()
    shard = shard.format(outside=outside)

    def point_outside(index):
        for name, file in index["weight_map"].items():
            if file == "model-00002-of-00002.safetensors":
                index["weight_map"][name] = shard

    edit_index(ckpt_copy, point_outside)
    with pytest.raises(CheckpointError, match=f"{shard}: shard path leaves the checkpoint folder"):
        gptoss.load_model(ckpt_copy)


def test_a_shard_symlinked_to_a_blob_outside_the_folder_loads_as_in_the_hf_cache(ckpt_copy, tmp_path, tiny_model):
    # The HF hub cache: snapshots/<rev>/model-...safetensors -> ../../blobs/<hash>.
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in ckpt_copy.glob("*.safetensors"):
        blob = blobs / shard.name.replace("model", "blob")
        shard.rename(blob)
        shard.symlink_to(os.path.relpath(blob, ckpt_copy))
    assert torch.equal(gptoss.load_model(ckpt_copy, dtype=torch.float32)(IDS), tiny_model(IDS))


@contextlib.contextmanager
def fifo_with_a_writer(path):
    """A FIFO at `path` whose writer sends junk to whoever opens it (so a reader gets an error, not a
    hang); on exit the test opens it itself if nobody did, releasing the writer."""
    os.mkfifo(path)
    writer = threading.Thread(target=lambda: open(path, "wb").write(b"junk"), daemon=True)
    writer.start()
    try:
        yield path
    finally:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        writer.join(10)
        os.close(fd)


@pytest.mark.parametrize("indexed", [True, False], ids=["named-in-the-index", "found-by-scanning"])
@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_shard_that_is_not_a_regular_file_is_refused_without_opening_it(ckpt_copy, indexed, kind):
    shard = ckpt_copy / "model-00002-of-00002.safetensors"
    shard.unlink()
    if not indexed:
        (ckpt_copy / "model.safetensors.index.json").unlink()
    with contextlib.ExitStack() as stack:
        if kind == "fifo":
            stack.enter_context(fifo_with_a_writer(shard))
        else:
            shard.mkdir()
        with pytest.raises(CheckpointError, match=f"{shard}: not a regular file"):
            gptoss.load_model(ckpt_copy)
