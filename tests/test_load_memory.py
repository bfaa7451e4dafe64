"""What a load needs in memory, the refusal of a load that does not fit, the packed/dequantized choice,
and out-of-memory errors reported as such (no big allocation: the free memory is faked)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import gptoss
from gptoss import memory, mxfp4_linear
from gptoss.checkpoint import CheckpointReader
from gptoss.errors import CheckpointError, InsufficientMemoryError
from gptoss.load import _memory_options, _plan_memory, estimate_load, estimate_load_bytes

GIB = 1 << 30


def expert_weights(preset: str) -> int:
    """Hand count: per layer and expert, gate_up [2I, H] and down [H, I]."""
    c = gptoss.get_preset(preset)
    return c.num_hidden_layers * c.num_local_experts * 3 * c.intermediate_size * c.hidden_size


def test_the_released_models_need_what_hand_figures_say():
    # 120b: 114.7e9 expert weights; 4.25 bits each = 60.9e9 bytes, bf16 = 229.3e9 bytes.
    assert expert_weights("gpt-oss-120b") == pytest.approx(114.7e9, rel=1e-3)
    big = gptoss.get_preset("gpt-oss-120b")
    packed = estimate_load(big, torch.bfloat16, packed_experts=True)
    dequantized = estimate_load(big, torch.bfloat16, packed_experts=False)
    assert packed.expert_bytes == pytest.approx(60.9e9, rel=0.01)
    assert dequantized.expert_bytes == pytest.approx(229.3e9, rel=0.01)
    # ~2.2e9 replicated weights (embedding + unembedding 1.16e9, attention + router 1.0e9), bf16.
    assert packed.replicated_bytes == dequantized.replicated_bytes == pytest.approx(4.33e9, rel=0.02)
    assert estimate_load_bytes(big, torch.bfloat16, True) / GIB == pytest.approx(61, rel=0.03)
    assert estimate_load_bytes(big, torch.bfloat16, False) / GIB == pytest.approx(218, rel=0.02)
    # 20b: the experts alone are ~38 GB in bf16, but the model is known to run in 16 GB packed.
    small = gptoss.get_preset("gpt-oss-20b")
    assert estimate_load(small, torch.bfloat16, False).expert_bytes == pytest.approx(38.2e9, rel=0.01)
    assert 12 * GIB < estimate_load_bytes(small, torch.bfloat16, True) < 16 * GIB
    # An EP rank's share: 120b over 8 ranks, ~7.6 GB of experts + ~4.3 GB replicated per rank (DESIGN.md).
    share = estimate_load(big, torch.bfloat16, True, experts=list(range(16)))
    assert share.expert_bytes == pytest.approx(7.6e9, rel=0.01)
    # float32 doubles everything but the packed experts.
    assert estimate_load(big, torch.float32, True).replicated_bytes == 2 * packed.replicated_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "dequantized"])
@pytest.mark.parametrize("experts", [None, [1, 2, 6]], ids=["all-experts", "a-share"])
def test_the_estimate_counts_exactly_the_bytes_a_loaded_model_holds(tiny_checkpoint, dtype, packed, experts):
    seen = []
    model = gptoss.load_model(tiny_checkpoint, dtype=dtype, experts=experts, packed_experts=packed,
                              progress_bytes=lambda done, total: seen.append((done, total)))
    held = sum(t.nbytes for t in model.state_dict().values())
    estimate = estimate_load(model.config, dtype, packed, experts)
    assert estimate.resident_bytes == held
    assert seen[-1] == (held, held) and all(a <= b for (a, _), (b, _) in zip(seen, seen[1:], strict=False))


def fake_free_memory(monkeypatch, free: int | None) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)


def test_a_load_that_does_not_fit_is_refused_before_reading_saying_need_free_and_options(tiny_checkpoint,
                                                                                        monkeypatch):
    config = gptoss.load_config(tiny_checkpoint)
    need = estimate_load_bytes(config, torch.float32, False)
    fake_free_memory(monkeypatch, need - 1)
    reads = []
    monkeypatch.setattr(CheckpointReader, "read_range", lambda *args: reads.append(args))
    with pytest.raises(InsufficientMemoryError) as info:
        gptoss.load_model(tiny_checkpoint, dtype=torch.float32, packed_experts=False)
    message = str(info.value)
    assert f"needs ~{need / GIB:.1f} GiB on cpu (8 experts dequantized to float32" in message
    assert f"only {(need - 1) / GIB:.1f} GiB is available" in message
    for option in ("packed_experts=True (~", "dtype=torch.bfloat16 (~", "an EP group of 2 ranks holds 4 experts",
                   "check_memory=False"):
        assert option in message
    assert not reads and info.value.http_status == 500
    # Skipping the check loads anyway.
    monkeypatch.undo()
    fake_free_memory(monkeypatch, need - 1)
    gptoss.load_model(tiny_checkpoint, dtype=torch.float32, packed_experts=False, check_memory=False)


def test_servings_unembedding_copies_are_counted_and_hold_what_was_counted(tiny_checkpoint, monkeypatch):
    from engine import Engine, EngineConfig
    from gptoss.greedy_unembedding import GreedyUnembedding
    from gptoss.model import PrepackedLinearWeight, unembedding_copy_bytes

    config = gptoss.load_config(tiny_checkpoint)
    vocab, hidden = config.vocab_size, config.hidden_size
    probe = torch.zeros(1, 1)
    prepacked = vocab * hidden * 4 if PrepackedLinearWeight.supports(probe) else 0
    screen = GreedyUnembedding.copy_bytes(vocab, hidden) if GreedyUnembedding.applies(probe) else 0
    assert unembedding_copy_bytes(config, torch.float32, "cpu", greedy_screen=False) == prepacked
    assert unembedding_copy_bytes(config, torch.float32, "cpu", greedy_screen=True) == prepacked + screen
    assert unembedding_copy_bytes(config, torch.float32, "cuda", greedy_screen=True) == 0
    # gpt-oss's width: the screen's copy is 0.59 GB, the prepacked float32 copy 2.3 GB
    real = gptoss.get_preset("gpt-oss-120b")
    assert GreedyUnembedding.copy_bytes(real.vocab_size, real.hidden_size) == pytest.approx(0.584e9, rel=0.01)
    # the engine holds what was counted
    model = gptoss.load_model(tiny_checkpoint, dtype=torch.float32)
    Engine(model, EngineConfig(kv_cache_bytes=16 << 20, greedy_screen=True))
    if screen:
        assert model.greedy_unembedding.nbytes == screen
    # and a load that fits only without them is refused with them, naming them
    need = estimate_load_bytes(config, torch.float32, True)
    fake_free_memory(monkeypatch, need + 1)
    gptoss.load_model(tiny_checkpoint, dtype=torch.float32, packed_experts=True)
    with pytest.raises(InsufficientMemoryError, match="of unembedding copies for serving"):
        gptoss.load_model(tiny_checkpoint, dtype=torch.float32, packed_experts=True, reserve_bytes=2)


def test_the_smallest_ep_group_that_fits_is_offered():
    big = gptoss.get_preset("gpt-oss-120b")
    options = _memory_options(big, torch.bfloat16, None, packed=True, free=20 * GIB)
    # 32 experts a rank: 15.2e9 B of experts + 4.3e9 replicated + 1.2e9 transient = 19.2 GiB (2 ranks: ~33).
    assert options == ["fewer experts per rank: an EP group of 4 ranks holds 32 experts a rank (~19.2 GiB each)",
                       "check_memory=False to try anyway"]


@pytest.fixture
def memory_rule(monkeypatch):
    """auto's rule where the MXFP4 kernel does not apply (a GPU, a CPU without a C compiler): the CPU
    stands in for the device, its kernel switched off."""
    monkeypatch.setattr(mxfp4_linear, "available", lambda: False)


@pytest.mark.skipif(not mxfp4_linear.available(), reason="no C compiler to build the MXFP4 kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_auto_keeps_experts_packed_on_a_cpu_with_the_kernel_even_with_memory_to_spare(
        tiny_checkpoint, monkeypatch, caplog, dtype):
    fake_free_memory(monkeypatch, 64 * GIB)
    with caplog.at_level(logging.INFO, logger="gptoss.load"):
        model = gptoss.load_model(tiny_checkpoint, dtype=dtype)
    assert all(block.mlp.experts.packed for block in model.layers)
    assert "experts kept packed (MXFP4) on cpu: the MXFP4 kernel runs them faster" in caplog.text
    assert not gptoss.load_model(tiny_checkpoint, dtype=dtype, packed_experts=False).layers[0].mlp.experts.packed


@pytest.mark.parametrize("free, packed", [(None, False), (64 * GIB, False), ("between", True)],
                         ids=["unknown-free-memory", "plenty", "only-packed-fits"])
def test_auto_keeps_experts_packed_only_when_dequantized_would_not_fit(tiny_checkpoint, monkeypatch, caplog,
                                                                       memory_rule, free, packed):
    config = gptoss.load_config(tiny_checkpoint)
    if free == "between":
        free = (estimate_load_bytes(config, torch.float32, True) + estimate_load_bytes(config, torch.float32, False)) // 2
    fake_free_memory(monkeypatch, free)
    with caplog.at_level(logging.INFO, logger="gptoss.load"):
        model = gptoss.load_model(tiny_checkpoint, dtype=torch.float32)
    assert all(block.mlp.experts.packed == packed for block in model.layers)
    assert ("experts kept packed (MXFP4)" if packed else "experts kept dequantized to float32") in caplog.text


def plan_preset(monkeypatch, preset: str, free_gib: float, packed_experts: bool | None,
                experts: list[int] | None = None) -> bool:
    """`load_model`'s memory plan for a released model's shapes, from its preset, with `free_gib` free (no
    file is written or read): whether experts stay packed, or InsufficientMemoryError."""
    fake_free_memory(monkeypatch, int(free_gib * GIB))
    return _plan_memory(Path("/models") / preset, gptoss.get_preset(preset), torch.bfloat16, torch.device("cpu"),
                        experts, packed_experts, check_memory=True)


@pytest.mark.parametrize("preset, free_gib, experts, packed", [
    ("gpt-oss-20b", 16, None, True),  # ~13.9 GiB packed: the 16 GB the model is known to run in
    ("gpt-oss-20b", 24, None, True),  # dequantized ~40.1 GiB would not fit
    ("gpt-oss-20b", 64, None, False),  # ~40.1 GiB is under 80% of 64
    ("gpt-oss-120b", 74.5, list(range(16)), False),  # a rank of 8 on an 80 GB GPU: ~31.7 GiB dequantized
], ids=["20b-16GiB-packed", "20b-24GiB-packed", "20b-64GiB-dequantized", "120b-rank-of-8-80GB-dequantized"])
def test_auto_picks_packed_experts_for_the_released_shapes_only_where_dequantized_would_not_fit(
        monkeypatch, caplog, memory_rule, preset, free_gib, experts, packed):
    with caplog.at_level(logging.INFO, logger="gptoss.load"):
        assert plan_preset(monkeypatch, preset, free_gib, None, experts) is packed
    assert ("experts kept packed (MXFP4)" if packed else "experts kept dequantized to bfloat16") in caplog.text


def test_gpt_oss_20b_dequantized_is_refused_on_24_gib_naming_need_free_and_the_packed_option(monkeypatch):
    with pytest.raises(InsufficientMemoryError) as info:
        plan_preset(monkeypatch, "gpt-oss-20b", 24, packed_experts=False)
    message = str(info.value)
    assert "needs ~40.1 GiB on cpu (32 experts dequantized to bfloat16" in message
    assert "only 24.0 GiB is available" in message
    assert "packed_experts=True (~13.9 GiB)" in message and "check_memory=False" in message


def test_gpt_oss_120b_is_refused_on_24_gib_naming_need_free_and_an_ep_group_that_fits(monkeypatch):
    with pytest.raises(InsufficientMemoryError) as info:
        plan_preset(monkeypatch, "gpt-oss-120b", 24, packed_experts=None)  # auto packs, and even packed it does not fit
    message = str(info.value)
    assert "needs ~61.8 GiB on cpu (128 experts MXFP4-packed, the rest in bfloat16)" in message
    assert "only 24.0 GiB is available" in message
    assert ("Options: fewer experts per rank: an EP group of 4 ranks holds 32 experts a rank (~19.2 GiB each); "
            "check_memory=False to try anyway") in message


@pytest.mark.parametrize("error", [
    OSError(12, "Cannot allocate memory"),
    OSError("Cannot allocate memory (os error 12)"),  # how safetensors words it, errno unset
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes."),
    MemoryError(),
], ids=["enomem", "safetensors-enomem", "torch-allocator", "memory-error"])
def test_an_allocation_that_fails_while_reading_is_reported_as_out_of_memory(tiny_checkpoint, monkeypatch, error):
    def fail(*args):
        raise error

    monkeypatch.setattr(CheckpointReader, "read_range", fail)
    with pytest.raises(InsufficientMemoryError, match="out of memory on cpu after loading .* the checkpoint is "
                                                      "not at fault. Options: packed_experts=True"):
        gptoss.load_model(tiny_checkpoint, dtype=torch.float32, packed_experts=False)


def test_a_shard_that_cannot_be_mapped_for_lack_of_memory_is_not_called_unreadable(tiny_checkpoint, monkeypatch):
    def no_memory(*args, **kwargs):
        raise OSError("Cannot allocate memory (os error 12)")

    monkeypatch.setattr("gptoss.checkpoint.safe_open", no_memory)
    with pytest.raises(InsufficientMemoryError, match="out of memory while opening it .* the file is not at fault") \
            as info:
        gptoss.load_model(tiny_checkpoint, dtype=torch.float32)
    assert "not a readable safetensors file" not in str(info.value)


def test_other_read_errors_pass_through_unchanged(tiny_checkpoint, monkeypatch):
    def broken(*args):
        raise CheckpointError("shard.safetensors: broken")

    monkeypatch.setattr(CheckpointReader, "read_range", broken)
    with pytest.raises(CheckpointError, match="^shard.safetensors: broken$"):
        gptoss.load_model(tiny_checkpoint, dtype=torch.float32)


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cpu_free_memory_is_the_smaller_of_meminfo_and_the_tightest_cgroup_headroom(tmp_path, version):
    write(tmp_path / "meminfo", "MemTotal: 64000000 kB\nMemAvailable:   50000000 kB\n")
    mib = 1 << 20
    if version == "v2":
        write(tmp_path / "proc_cgroup", "0::/pod/app\n")
        own, parent = tmp_path / "cg" / "pod" / "app", tmp_path / "cg" / "pod"
        write(own / "memory.max", "max\n")
        write(own / "memory.current", f"{3000 * mib}\n")
        write(parent / "memory.max", f"{8000 * mib}\n")
        write(parent / "memory.current", f"{5000 * mib}\n")
        write(parent / "memory.stat", f"anon 1\ninactive_file {1000 * mib}\n")
    else:
        write(tmp_path / "proc_cgroup", "4:memory:/pod/app\n1:cpu:/\n0::/\n")
        own = tmp_path / "cg" / "memory" / "pod" / "app"
        write(own / "memory.limit_in_bytes", f"{8000 * mib}\n")
        write(own / "memory.usage_in_bytes", f"{5000 * mib}\n")
        write(own / "memory.stat", f"total_inactive_file {1000 * mib}\n")
        write(own.parent / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
        write(own.parent / "memory.usage_in_bytes", f"{5000 * mib}\n")
    free = memory.cpu_available_bytes(tmp_path / "meminfo", tmp_path / "cg", tmp_path / "proc_cgroup")
    assert free == 4000 * mib  # 8000 - (5000 - 1000 inactive page cache) < 50 GB
    assert memory.cpu_available_bytes(tmp_path / "meminfo", tmp_path / "none", tmp_path / "none") == 50000000 * 1024
    assert memory.cpu_available_bytes(tmp_path / "none", tmp_path / "none", tmp_path / "none") is None
