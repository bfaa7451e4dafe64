"""cluster: where and when ranks run. An `EPGroup` reserves G bundles in a Ray placement group, starts
one `RankActor` per bundle (each hosting an engine), connects them with a communicator, and steps them in
lockstep; the group is the unit of failure and restart."""

from cluster.config import EplbConfig, GroupConfig
from cluster.errors import (
           ClusterError,
           GroupDrainingError,
           GroupFailedError,
           PlacementError,
           SuspectRequestError,
)
from cluster.group import EPGroup, GroupHealth, GroupStats
from cluster.rank import EplbStats, LoadProgress, RankStats

__all__ = ["ClusterError", "EPGroup", "EplbConfig", "EplbStats", "GroupConfig", "GroupDrainingError", "GroupFailedError", "GroupHealth",
           "GroupStats", "LoadProgress", "PlacementError", "RankStats", "SuspectRequestError"]
