"""The one place that maps exceptions to what a client sees: HTTP status + OpenAI's JSON error, or a
gRPC status code + details. The client's message and the log's are kept apart: a server fault is
logged in full and answered with a short message (no internals, no prompt text)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from gptoss.errors import ClientError, GptossError, OverloadedError, UnavailableError

logger = logging.getLogger("ray.serve")


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


class ContextLengthError(ClientError):
    """Prompt (+ max_tokens) longer than the model's context: OpenAI's `context_length_exceeded`."""


class ReplicaUnavailableError(UnavailableError):
    """A model server replica's group cannot serve (failed or draining). `replica_id` names the replica,
    so the gateway routes around it and may send a request that got no token yet elsewhere."""

    def __init__(self, message: str, replica_id: str = ""):
        super().__init__(message)
        self.replica_id = replica_id

    def __reduce__(self):  # crosses Ray: rebuild with both fields
        return type(self), (str(self), self.replica_id)


def unwrap(exc: BaseException) -> BaseException:
    """The exception a deployment raised, out of Ray's wrapper (RayTaskError keeps it as `cause`)."""
    while isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None and exc.cause is not exc:
        exc = exc.cause
    return exc


def error_reply(exc: BaseException) -> ErrorReply:
    exc = unwrap(exc)
    if isinstance(exc, ClientError):
        code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else None
        return ErrorReply(exc.http_status, exc.grpc_code, exc.openai_type, str(exc), exc.param, code)
    if isinstance(exc, OverloadedError):
        return ErrorReply(429, "RESOURCE_EXHAUSTED", "rate_limit_error", str(exc), retry_after_s=exc.retry_after_s)
    if isinstance(exc, BackPressureError):
        return ErrorReply(429, "RESOURCE_EXHAUSTED", "rate_limit_error",
                          "the model servers' queues are full; retry later", retry_after_s=1.0)
    if isinstance(exc, UnavailableError):
        logger.warning("request failed: %s", exc)
        return ErrorReply(exc.http_status, exc.grpc_code, exc.openai_type, str(exc), retry_after_s=1.0)
    if isinstance(exc, GptossError) and exc.http_status == 504:
        return ErrorReply(504, exc.grpc_code, exc.openai_type, str(exc))
    if isinstance(exc, DeploymentUnavailableError | ray.exceptions.RayActorError | ray.exceptions.ActorUnavailableError):
        logger.warning("request failed: a model server replica is unavailable: %s", exc)
        return ErrorReply(503, "UNAVAILABLE", "server_error", "the model server replica serving this request "
                          "went away; retry", retry_after_s=1.0)
    if isinstance(exc, TimeoutError):
        return ErrorReply(504, "DEADLINE_EXCEEDED", "timeout_error", "the request timed out")
    logger.error("request failed with an internal error", exc_info=exc)
    return ErrorReply(500, "INTERNAL", "server_error", f"internal server error ({type(exc).__name__})")
