"""`GroupConfig`: what one EP group is made of (validated here; the serving layer's YAML converts into it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.config import EngineConfig
from gptoss.load import TORCH_DTYPES

DEVICES = ("auto", "cpu", "cuda")
COMMUNICATORS = ("auto", "torch_dist", "cupy_nccl")


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
        for name in ("placement_timeout_s", "start_timeout_s", "join_timeout_s", "collective_timeout_s",
                     "load_timeout_s", "step_timeout_s"):
            need(getattr(self, name) > 0, name, "> 0")

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]
