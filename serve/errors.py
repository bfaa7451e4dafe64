"""The one place that maps exceptions to what a client sees: HTTP status + OpenAI's JSON error, or a
gRPC status code + details.

A client error says what was wrong with the request (naming the field). Anything else is our fault or
our state: the client gets a fixed message for its kind and the request id, the log gets the full
cause under that id. Internal text (a rank's remote traceback with pids, addresses and paths, an
engine's out-of-memory figures) never reaches a client.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from cluster.errors import SuspectRequestError
from gptoss.errors import ClientError, GptossError, OverloadedError, UnavailableError
from serve.admission import ContextLengthError

logger = logging.getLogger("ray.serve")

UNAVAILABLE_MESSAGE = ("the model server is unavailable (its EP group failed, is starting or is shutting down); "
                       "retry")
OVERLOADED_MESSAGE = "the server is overloaded (its queues are full); retry later"
INTERNAL_MESSAGE = "internal server error"
SUSPECT_MESSAGE = ("the model server failed while running this request (it may be the cause), so it was not "
                   "sent to another group")


@dataclass(frozen=True)
class ErrorReply:
    http_status: int
    grpc_code: str  # a grpc.StatusCode member's name
    type: str  # OpenAI's error `type`
    message: str  # safe to show the client
    param: str | None = None  # the request field at fault
    code: str | None = None  # OpenAI's error `code`, e.g. "context_length_exceeded"
    retry_after_s: float | None = None

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ReplicaUnavailableError(UnavailableError):
    """A model server replica's group cannot serve (failed or draining). `replica_id` names the replica,
    so the gateway routes around it and may send a request that got no token yet elsewhere."""

    def __init__(self, message: str, replica_id: str = ""):
        super().__init__(message)
        self.replica_id = replica_id

    def __reduce__(self):  # crosses Ray: rebuild with both fields
        return type(self), (str(self), self.replica_id)


class TokenChannelError(UnavailableError):
    """A stream's tokens were lost on the token channel between a model server and a gateway
    (serve/token_channel.py): the stream goes on in another call, but the model server replica is not
    to blame (it is not avoided)."""


def unwrap(exc: BaseException) -> BaseException:
    """The exception a deployment raised, out of Ray's wrapper (RayTaskError keeps it as `cause`)."""
    while isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None and exc.cause is not exc:
        exc = exc.cause
    return exc


def error_reply(exc: BaseException, request_id: str = "") -> ErrorReply:
    """What the client sees of `exc`; server-side faults are logged here with `request_id`."""
    exc = unwrap(exc)
    ref = f" (request id {request_id})" if request_id else ""
    if isinstance(exc, ClientError):
        code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else None
        return ErrorReply(exc.http_status, exc.grpc_code, exc.openai_type, str(exc), exc.param, code)
    if isinstance(exc, OverloadedError | BackPressureError):
        retry_after_s = getattr(exc, "retry_after_s", None) or 1.0
        return ErrorReply(429, "RESOURCE_EXHAUSTED", "rate_limit_error", OVERLOADED_MESSAGE, retry_after_s=retry_after_s)
    if isinstance(exc, UnavailableError | DeploymentUnavailableError | ray.exceptions.RayActorError
                  | ray.exceptions.ActorUnavailableError):
        logger.warning("request %s failed: %s: %s", request_id or "-", type(exc).__name__, exc)
        return ErrorReply(503, "UNAVAILABLE", "server_error", UNAVAILABLE_MESSAGE + ref, retry_after_s=1.0)
    if isinstance(exc, SuspectRequestError):
        logger.error("request %s failed its EP group: %s", request_id or "-", exc)
        return ErrorReply(500, "INTERNAL", "server_error", SUSPECT_MESSAGE + ref)
    if isinstance(exc, GptossError) and exc.http_status == 504:  # our deadline, with the client's timeout
        return ErrorReply(504, exc.grpc_code, exc.openai_type, str(exc) + ref)
    if isinstance(exc, TimeoutError):
        return ErrorReply(504, "DEADLINE_EXCEEDED", "timeout_error", "the request timed out" + ref)
    logger.error("request %s failed with an internal error", request_id or "-", exc_info=exc)
    return ErrorReply(500, "INTERNAL", "server_error", INTERNAL_MESSAGE + ref)
