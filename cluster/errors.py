"""Errors of the cluster layer: server-side states of an EP group (gptoss.errors has the hierarchy).
Request-level client errors come from the engine; these map to UNAVAILABLE / 503 in the serving layer."""

from gptoss.errors import ServerError, UnavailableError


class ClusterError(ServerError):
    """Base of the cluster layer's errors."""


class PlacementError(ClusterError, UnavailableError):
    """The group's bundles could not be reserved in time; the message names the missing resources."""


class GroupFailedError(ClusterError, UnavailableError):
    """The EP group lost a rank, a collective timed out or a step stalled: every in-flight request of
    the group ends with this error; the group must be restarted. Another group may serve the request."""


class SuspectRequestError(ClusterError):
    """The group failed with an error raised inside a step this request was part of: the request may be
    its cause, so it ends here (a server error) rather than being sent to another group, which it could
    fail too."""


class GroupDrainingError(ClusterError, UnavailableError):
    """The group is starting, draining or stopped and admits no new requests."""
