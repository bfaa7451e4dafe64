"""`GroupConfig`: what one EP group is made of (validated here; the serving layer's YAML converts into it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.config import EngineConfig
from gptoss.load import TORCH_DTYPES
from parallel.rebalance import TRANSFERS

DEVICES = ("auto", "cpu", "cuda")
COMMUNICATORS = ("auto", "torch_dist", "cupy_nccl")


@dataclass(frozen=True)
class EplbConfig:
    """Expert load balancing in a running group (parallel/eplb.py, parallel/rebalance.py).

    Attributes:
        enabled: plan and rearrange every `interval_steps` (and on `EPGroup.rebalance_experts`).
        redundant_experts_per_rank: R, expert slots per rank beyond E/G in every layer, held from the
            load on (their memory is counted in the load's check).
        interval_steps: group steps between two rearrangements (0: only when asked).
        window_steps: the routed-token counts a plan reads cover about this many last steps.
        transfer: how a rank gets the experts it newly holds: "checkpoint" (read from the memory-mapped
            checkpoint, which every node reads anyway) or "communicator" (sent by a rank that has them).
        min_gain: a layer moves only if its busiest rank's expected load drops by this share.
    """

    enabled: bool = False
    redundant_experts_per_rank: int = 1
    interval_steps: int = 3000
    window_steps: int = 1000
    transfer: str = "checkpoint"
    min_gain: float = 0.02

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"eplb config: {name} must be {rule}, got {getattr(self, name)!r}")

        need(isinstance(self.enabled, bool), "enabled", "true or false")
        need(isinstance(self.redundant_experts_per_rank, int) and self.redundant_experts_per_rank >= 0,
             "redundant_experts_per_rank", "an int >= 0")
        need(isinstance(self.interval_steps, int) and self.interval_steps >= 0, "interval_steps", "an int >= 0")
        need(isinstance(self.window_steps, int) and self.window_steps >= 1, "window_steps", "an int >= 1")
        need(self.transfer in TRANSFERS, "transfer", f"one of {TRANSFERS}")
        need(0 <= self.min_gain < 1, "min_gain", "in [0, 1)")


@dataclass(frozen=True)
class GroupConfig:
    """One EP group: G ranks that together hold one copy of the model.

    Attributes:
        checkpoint: folder of the checkpoint (HF release or `original/` layout), readable on every node.
        num_ranks: G; must divide the model's expert count.
        dtype: "bfloat16" or "float32".
        packed_experts: keep experts MXFP4 in memory (4.25 bits/weight) instead of dequantizing at load;
            None: packed only where dequantized experts would not fit in the rank's free memory.
        engine: each rank's engine settings (batching limits, KV budget).
        device: "cuda" reserves a GPU per rank; "cpu" CPU bundles only; "auto" GPUs when the cluster
            has any. A rank computes on CUDA when its process sees a GPU, else on the CPU (so a
            simulated cluster with fake GPUs still runs).
        communicator: "auto" (cupy_nccl on CUDA, torch_dist/gloo on CPU) or a backend name.
        num_cpus_per_rank: CPUs reserved per rank (and torch threads on a CPU rank).
        placement_timeout_s: how long to wait for the placement group before naming what is missing.
        start_timeout_s: deadline for every rank actor to start (a cold node may pull images, import
            torch); no rank joins the communicator before all have started.
        join_timeout_s: deadline for every rank to join the communicator once all have started.
        collective_timeout_s: deadline of every collective; a dead peer fails the group within it.
        load_timeout_s: deadline for every rank to load its weights and join the communicator.
        step_timeout_s: a rank that spends longer in one step (or does not answer the group's heartbeat
            for that long) while requests are open is stuck: the group fails (for any G, also G=1,
            where no collective would time out).
        eplb: expert load balancing (off by default); needs num_ranks >= 2.
        name: shows in actor names and logs.
    """

    checkpoint: str
    num_ranks: int = 1
    dtype: str = "bfloat16"
    packed_experts: bool | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    device: str = "auto"
    communicator: str = "auto"
    num_cpus_per_rank: float = 1.0
    placement_timeout_s: float = 60.0
    start_timeout_s: float = 600.0
    join_timeout_s: float = 300.0
    collective_timeout_s: float = 60.0
    load_timeout_s: float = 1800.0
    step_timeout_s: float = 120.0
    affinity_max_extra_requests: int = 8
    eplb: EplbConfig = field(default_factory=EplbConfig)
    name: str = "ep-group"

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"group config: {name} must be {rule}, got {getattr(self, name)!r}")

        need(isinstance(self.checkpoint, str) and bool(self.checkpoint), "checkpoint", "a checkpoint folder")
        need(isinstance(self.num_ranks, int) and self.num_ranks >= 1, "num_ranks", "an int >= 1")
        need(self.dtype in TORCH_DTYPES, "dtype", f"one of {sorted(TORCH_DTYPES)}")
        need(self.packed_experts in (None, True, False), "packed_experts", "True, False or None (auto)")
        need(self.device in DEVICES, "device", f"one of {DEVICES}")
        need(self.communicator in COMMUNICATORS, "communicator", f"one of {COMMUNICATORS}")
        need(self.num_cpus_per_rank > 0, "num_cpus_per_rank", "> 0")
        need(isinstance(self.affinity_max_extra_requests, int) and self.affinity_max_extra_requests >= 0,
             "affinity_max_extra_requests", "an int >= 0")
        need(isinstance(self.eplb, EplbConfig), "eplb", "an EplbConfig")
        if self.eplb.enabled and self.num_ranks < 2:
            raise ValueError("group config: eplb.enabled needs num_ranks >= 2 (one rank holds every expert: "
                             f"there is nothing to balance), got num_ranks={self.num_ranks}")
        for name in ("placement_timeout_s", "start_timeout_s", "join_timeout_s", "collective_timeout_s",
                     "load_timeout_s", "step_timeout_s"):
            need(getattr(self, name) > 0, name, "> 0")

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]
