"""The expert-parallel MoE layer and the pass that applies it to a loaded model.

The model (`gptoss.Transformer`) knows nothing of parallelism; `apply_expert_parallel` swaps each block's
`mlp` for an `ExpertParallelMoE` with the same call (x [T, H] -> [T, H]), built from the block's router,
the rank's experts and a dispatcher. Everything else (attention, norms, embedding) stays replicated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gptoss.config import ModelConfig
from gptoss.model import Experts, Router, Transformer
from parallel.comm import Communicator
from parallel.dispatcher import ExpertTokenCounts, TokenDispatcher
from parallel.placement import ExpertPlacement


class ExpertParallelMoE(nn.Module):
    """Router + this rank's experts + a dispatcher: on G ranks together, exactly the single-rank MoE.

    Every rank must call it in every layer of every step, with T = 0 on a rank that has no tokens.
    """

    def __init__(self, router: Router, experts: Experts, dispatcher: TokenDispatcher):
        super().__init__()
        if len(experts.expert_ids) != dispatcher.num_local_experts:
            raise ValueError(f"experts must hold the dispatcher's {dispatcher.num_local_experts} local experts, "
                             f"got {len(experts.expert_ids)}")
        self.router, self.experts, self.dispatcher = router, experts, dispatcher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] (this rank's tokens) -> [T, H]."""
        topk_ids, topk_weights = self.router(x)
        expert_in, expert_counts, handle = self.dispatcher.dispatch(x, topk_ids, topk_weights)
        return self.dispatcher.combine(self.experts.run_grouped(expert_in, expert_counts), handle)


def apply_expert_parallel(model: Transformer, communicator: Communicator,
                          placement: ExpertPlacement | Sequence[ExpertPlacement], *,
                          expert_token_counts: ExpertTokenCounts | None = None) -> ExpertTokenCounts:
    """Makes `model` one rank of an EP group, in place.

    Args:
        model: loaded with this rank's experts (`gptoss.load_model(..., experts=placement.expert_ids(rank))`),
            or with a superset of them (all experts, say), which is then cut down to each layer's share.
        communicator: the rank's end of the group; its device is where the model lives.
        placement: the same on every rank; one for every layer, or one per layer (EPLB's, which may
            differ between layers: parallel/eplb.py).
        expert_token_counts: counters for the routed tokens (default: new ones on the model's device).
    Returns:
        the per-layer per-expert token counters the layers count into.
    Raises:
        ValueError: the placement does not fit the model or the communicator, or the model lacks some of
            the rank's experts.
    """
    config = model.config
    placements = [placement] * config.num_hidden_layers if isinstance(placement, ExpertPlacement) else list(placement)
    if len(placements) != config.num_hidden_layers:
        raise ValueError(f"placement must be one ExpertPlacement or one per layer ({config.num_hidden_layers}), "
                         f"got {len(placements)}")
    for placement in placements:
        if placement.num_experts != config.num_local_experts:
            raise ValueError(f"placement.num_experts must equal the model's num_local_experts "
                             f"({config.num_local_experts}), got {placement.num_experts}")
        if placement.world_size != communicator.world_size:
            raise ValueError(f"placement.world_size must equal the communicator's world_size "
                             f"({communicator.world_size}), got {placement.world_size}")
    if model.device != communicator.device:
        raise ValueError(f"the model must be on the communicator's device {communicator.device}, got {model.device} "
                         "(move the model first: the dispatchers' tables live on that device)")
    if expert_token_counts is None:
        expert_token_counts = ExpertTokenCounts(config.num_hidden_layers, config.num_local_experts, model.device)
    for layer, (block, placement) in enumerate(zip(model.layers, placements, strict=True)):
        mlp = block.mlp
        if isinstance(mlp, ExpertParallelMoE):
            raise ValueError(f"layer {layer} is expert-parallel already")
        expert_ids = placement.expert_ids(communicator.rank)
        experts = mlp.experts if mlp.experts.expert_ids == expert_ids else assemble_experts(mlp.experts, expert_ids,
                                                                                             config)
        dispatcher = TokenDispatcher(communicator, placement, layer=layer, expert_token_counts=expert_token_counts)
        block.mlp = ExpertParallelMoE(mlp.router, experts, dispatcher)
    return expert_token_counts


def count_expert_tokens(model: Transformer,
                        expert_token_counts: ExpertTokenCounts | None = None) -> ExpertTokenCounts:
    """Counts the tokens each layer routes to each expert of a model that is not expert-parallel
    (an EP group of one rank), as the dispatchers of an expert-parallel one do; in place.

    Returns:
        the per-layer per-expert token counters (on the model's device).
    """
    config = model.config
    if expert_token_counts is None:
        expert_token_counts = ExpertTokenCounts(config.num_hidden_layers, config.num_local_experts, model.device)
    for layer, block in enumerate(model.layers):
        if isinstance(block.mlp, ExpertParallelMoE):
            raise ValueError(f"layer {layer} is expert-parallel: its dispatcher counts already")

        def count(router, args, output, layer=layer):
            expert_token_counts.add(layer, output[0])  # the router returns (topk_ids [T, k], topk_weights [T, k])

        block.mlp.router.register_forward_hook(count)
    return expert_token_counts


def assemble_experts(experts: Experts, expert_ids: list[int], config: ModelConfig,
                     fetched: dict[int, dict[str, torch.Tensor]] | None = None) -> Experts:
    """A new `Experts` holding `expert_ids` (in that order): each taken from `experts` where it holds
    it, else from `fetched` (expert id -> its weights by `Experts` buffer name, as `gptoss.load.read_experts`
    or another rank gives them)."""
    fetched = fetched or {}
    missing = sorted(set(expert_ids) - set(experts.expert_ids) - set(fetched))
    if missing:
        raise ValueError(f"the model holds experts {experts.expert_ids} but this rank needs {expert_ids} "
                         f"(missing {missing}); load it with gptoss.load_model(..., experts={expert_ids})")
    device = experts.global_to_local.device
    with torch.device("meta"):
        subset = Experts(config, expert_ids, packed=experts.packed, dtype=experts.dtype, device="meta")
    kept = [e for e in expert_ids if e not in fetched]
    kept_at = torch.tensor([expert_ids.index(e) for e in kept], dtype=torch.long, device=device)
    from_old = experts.global_to_local[torch.tensor(kept, dtype=torch.long, device=device)]
    for name, buffer in experts.named_buffers(recurse=False):
        if name == "global_to_local":
            continue
        if not fetched:  # a plain subset: one gather
            subset._buffers[name] = buffer.index_select(0, from_old)
            continue
        out = buffer.new_empty(len(expert_ids), *buffer.shape[1:])
        out.index_copy_(0, kept_at, buffer.index_select(0, from_old))
        for expert, weights in fetched.items():
            if expert in expert_ids:
                out[expert_ids.index(expert)] = weights[name]
        subset._buffers[name] = out
    subset.global_to_local = subset.global_to_local_table(config).to(device)
    return subset
