"""Reserving the G rank bundles of an EP group as a Ray placement group."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import ray
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)

from cluster.errors import PlacementError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reservation:
    """The bundles the group's ranks run in; `owned` when this group created (and must free) it."""

    placement_group: PlacementGroup
    bundle_indices: tuple[int, ...]
    owned: bool

    def release(self) -> None:
        if self.owned:
            remove_placement_group(self.placement_group)


def rank_bundle(device: str, num_cpus_per_rank: float) -> dict[str, float]:
    """One rank's bundle: a GPU on GPU clusters, CPUs only on CPU machines."""
    bundle = {"CPU": num_cpus_per_rank}
    if device == "cuda":
        bundle["GPU"] = 1.0
    return bundle


def reserve(num_ranks: int, bundle: dict[str, float], name: str = "") -> Reservation:
    """Asks for `num_ranks` bundles, PACKed so a group fills a node before it spans the next; returns
    at once (the caller holds the reservation before waiting, so a cancelled start can release it).

    Inside a caller's placement group (a Serve replica that declared the bundles) that group is
    reused: its last `num_ranks` bundles are the ranks'.

    Raises:
        PlacementError: the caller's placement group has too few bundles.
    """
    current = get_current_placement_group()
    if current is not None:
        if current.bundle_count < num_ranks:
            raise PlacementError(f"the caller's placement group has {current.bundle_count} bundles; "
                                 f"an EP group of {num_ranks} ranks needs {num_ranks}")
        first = current.bundle_count - num_ranks
        return Reservation(current, tuple(range(first, current.bundle_count)), owned=False)
    pg = placement_group([dict(bundle) for _ in range(num_ranks)], strategy="PACK", name=name)
    return Reservation(pg, tuple(range(num_ranks)), owned=True)


async def wait_placed(reservation: Reservation, bundle: dict[str, float], timeout_s: float) -> None:
    """Waits until the reservation's bundles are placed.

    Raises:
        PlacementError: not placed within `timeout_s`, naming the resources that are missing.
    """
    try:
        # Not asyncio.wait_for: on Python 3.11 it drops a cancel that comes as the bundles are placed,
        # and a start cancelled then would go on to bring the group up.
        async with asyncio.timeout(timeout_s):
            await reservation.placement_group.ready()
    except TimeoutError:
        num_ranks = len(reservation.bundle_indices)
        raise PlacementError(f"could not place {num_ranks} ranks of {bundle} within {timeout_s:.0f} s: "
                             f"{describe_shortage(bundle, num_ranks)}") from None


def describe_shortage(bundle: dict[str, float], num_ranks: int) -> str:
    """Names what is missing: cluster totals first, then what free capacity each node has."""
    total = ray.cluster_resources()
    need = {k: v * num_ranks for k, v in bundle.items()}
    missing = {k: need[k] - total.get(k, 0.0) for k in need if total.get(k, 0.0) < need[k]}
    if missing:
        have = {k: total.get(k, 0.0) for k in need}
        return f"the cluster has {have} in all, the group needs {need}; missing {missing}"
    free = ray.available_resources()
    free_now = {k: free.get(k, 0.0) for k in need}
    return (f"the cluster has enough {sorted(need)} in all but only {free_now} free now "
            f"(others hold the rest); needed {need}")
