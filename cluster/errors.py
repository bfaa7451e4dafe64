"""Errors of the cluster layer. Request-level client errors come from the engine (ValueError subclasses
naming the parameter); these are server-side and map to UNAVAILABLE / 503 in the serving layer."""


class ClusterError(RuntimeError):
    """Base of the cluster layer's errors."""


class PlacementError(ClusterError):
    """The group's bundles could not be reserved in time; the message names the missing resources."""


class GroupFailedError(ClusterError):
    """The EP group lost a rank or a collective timed out: every in-flight request of the group ends
    with this error; the group must be restarted."""


class GroupDrainingError(ClusterError):
    """The group is draining or stopped and admits no new requests."""
