"""Expert placement: which rank of an EP group holds which experts, and where each rank sends a token.

A placement is a table, not arithmetic: rank r holds `rank_expert_ids[r]` (global ids, in the order of its
local ids), and an expert may be held by several ranks (a replica of a hot expert, placed later from
measured load: parallel/eplb.py). The dispatcher only ever reads `routing_table(source_rank)`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertPlacement:
    """Experts per rank for one EP group (the same for every MoE layer).

    Attributes:
        num_experts: experts in the model (`num_local_experts` of the config).
        rank_expert_ids: for each rank, the global ids it holds; position i is local expert i there.
            Every expert is held at least once, at most once per rank; every rank holds at least one.
    """

    num_experts: int
    rank_expert_ids: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank_expert_ids", tuple(tuple(int(e) for e in ids) for ids in self.rank_expert_ids))
        if self.num_experts <= 0:
            raise ValueError(f"num_experts must be > 0, got {self.num_experts}")
        if not self.rank_expert_ids:
            raise ValueError("rank_expert_ids must list the experts of at least one rank, got none")
        held = set()
        for rank, ids in enumerate(self.rank_expert_ids):
            if not ids:
                raise ValueError(f"rank_expert_ids[{rank}] must hold at least one expert, got none")
            bad = [e for e in ids if not 0 <= e < self.num_experts]
            if bad:
                raise ValueError(f"rank_expert_ids[{rank}] must be ids in [0, {self.num_experts}), got {bad}")
            if len(set(ids)) != len(ids):
                raise ValueError(f"rank_expert_ids[{rank}] must not repeat an expert, got {list(ids)}")
            held.update(ids)
        missing = sorted(set(range(self.num_experts)) - held)
        if missing:
            raise ValueError(f"every expert must be held by some rank; experts {missing} are held by none")

    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> ExpertPlacement:
        """Rank r holds experts [r * E/G, (r + 1) * E/G): the default, one owner per expert.

        Raises:
            ValueError: world_size does not divide num_experts (an uneven split would leave some ranks
                with more expert work than others in every layer: pass an explicit placement for that).
        """
        if world_size <= 0:
            raise ValueError(f"world_size must be > 0, got {world_size}")
        if num_experts % world_size:
            divisors = [g for g in range(1, num_experts + 1) if num_experts % g == 0]
            raise ValueError(f"world_size must divide num_experts ({num_experts}) for a contiguous placement, "
                             f"got {world_size}; possible world sizes: {divisors}")
        per_rank = num_experts // world_size
        return cls(num_experts, tuple(tuple(range(r * per_rank, (r + 1) * per_rank)) for r in range(world_size)))

    @property
    def world_size(self) -> int:
        return len(self.rank_expert_ids)

    @property
    def max_experts_per_rank(self) -> int:
        return max(len(ids) for ids in self.rank_expert_ids)

    def expert_ids(self, rank: int) -> list[int]:
        """The global ids rank `rank` holds (what it passes to `gptoss.load_model(experts=...)`)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        return list(self.rank_expert_ids[rank])

    def replicas(self, expert: int) -> list[tuple[int, int]]:
        """The (rank, local id) pairs that hold global expert `expert`, by rank."""
        return [(rank, ids.index(expert)) for rank, ids in enumerate(self.rank_expert_ids) if expert in ids]

    def routing_table(self, source_rank: int) -> list[list[tuple[int, int]]]:
        """Where tokens routed on `source_rank` may go: per expert, the (rank, local id) copies to spread
        its tokens over. A source that holds a copy keeps its tokens there (no traffic); the others
        spread them over every copy (the dispatcher picks by token position), so that each copy gets an
        even share, as the EPLB planner's loads assume (parallel/eplb.py).
        """
        table = []
        for expert in range(self.num_experts):
            copies = self.replicas(expert)
            own = [c for c in copies if c[0] == source_rank]
            table.append(own[:1] or copies)
        return table
