"""parallel: how experts are split across the ranks of an EP group and tokens exchanged between them.

Pieces (bottom up):
- `ExpertPlacement`: which rank holds which experts (contiguous by default; a table, so experts may be
  replicated later) and where each rank routes each expert.
- `Communicator` and its backends: `cupy_nccl` (NCCL through CuPy, GPU), `torch_dist` (gloo on CPU, or
  torch's nccl), `loopback` (all ranks as threads of one process, for tests). Variable all-to-all, small
  integer all-gather / all-reduce, barrier; every collective has a timeout and fails with
  `CommunicatorTimeout` / `CommunicatorError` (the group is then broken: restart it).
- `TokenDispatcher`: dispatch / combine of one MoE layer; `ExpertTokenCounts`: per-layer per-expert token
  counters.
- `ExpertParallelMoE` and `apply_expert_parallel(model, communicator, placement)`: the pass that turns a
  loaded single-rank model into one rank of an EP group.

What the cluster layer does to start a group of G ranks (one process per rank, e.g. Ray actors):
1. Pick the placement, `ExpertPlacement.contiguous(config.num_local_experts, G)`, and send it to every rank.
2. Make a `CommunicatorSpec` (a frozen dataclass of plain values) and send it to every rank:
   - cupy_nccl: `nccl_unique_id` = `make_nccl_unique_id()` called IN RANK 0's PROCESS (NCCL's bootstrap
     root listens in the process that made it; that process must live until all ranks have joined);
   - torch_dist: `master_addr` / `master_port` of a free TCP port on rank 0's node (rank 0 hosts the store),
     or `store_on_rank0=False` with a `torch.distributed.TCPStore(..., is_master=True)` kept alive elsewhere;
   - `timeout_s`: deadline of every collective: a missing peer makes every other rank raise
     `CommunicatorTimeout` within it (torch_dist names the missing ranks; NCCL can only name the peers the
     stalled operation waits on);
   - `join_timeout_s`: deadline of init, for every rank to join (None: `timeout_s`); the cluster layer
     passes its own (`GroupConfig.join_timeout_s`), as joining may take longer than a collective may.
3. On every rank, concurrently (init blocks until all have joined):
       comm = create_communicator(spec, rank, device)          # device: "cuda:i" for GPU backends
       model = gptoss.load_model(path, dtype, device, experts=placement.expert_ids(rank))
       counts = apply_expert_parallel(model, comm, placement)  # counts.take_counts() -> [layers, experts]
4. Step all ranks in lockstep: every rank runs every layer each step, with zero tokens when idle
   (`comm.all_reduce_ints` / `all_gather_ints` serve the "does anyone have work" decision).
5. On any `CommunicatorError`, tear the whole group down (`comm.close()`) and start a new one.
"""

from parallel.comm import (
    Communicator,
    CommunicatorError,
    CommunicatorSpec,
    CommunicatorTimeout,
    create_communicator,
)
from parallel.cupy_nccl import CupyNcclCommunicator, make_nccl_unique_id
from parallel.dispatcher import DispatchHandle, ExpertTokenCounts, TokenDispatcher
from parallel.loopback import LoopbackCommunicator, LoopbackGroup
from parallel.moe import ExpertParallelMoE, apply_expert_parallel, assemble_experts, count_expert_tokens
from parallel.placement import ExpertPlacement
from parallel.torch_dist import TorchDistCommunicator

__all__ = ["Communicator", "CommunicatorError", "CommunicatorSpec", "CommunicatorTimeout", "CupyNcclCommunicator",
           "DispatchHandle", "ExpertParallelMoE", "ExpertPlacement", "ExpertTokenCounts", "LoopbackCommunicator",
           "LoopbackGroup", "TokenDispatcher", "TorchDistCommunicator", "apply_expert_parallel", "count_expert_tokens",
           "create_communicator", "make_nccl_unique_id", "assemble_experts"]
