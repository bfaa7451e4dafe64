"""One error hierarchy for every layer; each error knows its HTTP status and gRPC code.

Three roots, so a caller never confuses them:
- `ClientError`: the request is wrong and will fail again unchanged (4xx / INVALID_ARGUMENT and kin).
  It names the request field (`param`) where there is one. A ValueError too, as a broken contract is.
- `ServerError`: our fault or our state (500 / INTERNAL); a broken checkpoint is one, never a 400.
- `UnavailableError` (a ServerError): the serving unit cannot take work now, e.g. its EP group failed
  or is draining (503 / UNAVAILABLE); a retry elsewhere or later may succeed.

The gRPC code is the name of a `grpc.StatusCode` member (this package does not import grpc); the
serving layer maps errors to statuses in one place from these attributes.
"""

from __future__ import annotations

import reprlib


class GptossError(Exception):
    """Base of every error this project raises on purpose."""

    http_status: int = 500
    grpc_code: str = "INTERNAL"
    openai_type: str = "server_error"  # the `type` of OpenAI's JSON error body


class ClientError(GptossError, ValueError):
    """The request is invalid. `param` names the offending field (e.g. "temperature") when known."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    openai_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class InvalidRequestError(ClientError):
    """A request field breaks a rule; the message reads "<param> must be <rule>, got <value>"."""

    def __init__(self, param: str, message: str):
        super().__init__(message, param)

    def __reduce__(self):  # crosses Ray actors: rebuild with (param, message), not Exception's args
        return type(self), (self.param, str(self))


def shorten(value: object, max_chars: int = 80) -> str:
    """repr(value), cut short (strings to `max_chars`, containers to a few items), for error messages:
    a 70 KB field must not come back whole in a 400's body."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = short.maxlong = max_chars
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 8
    short.maxlevel = 3
    return short.repr(value)


def invalid(param: str, rule: str, value: object) -> InvalidRequestError:
    """`InvalidRequestError` with the message "<param> must be <rule>, got <value>" (the value cut short)."""
    return InvalidRequestError(param, f"{param} must be {rule}, got {shorten(value)}")


class NotFoundError(ClientError):
    """The named thing (a model, a request id) does not exist here."""

    http_status = 404
    grpc_code = "NOT_FOUND"
    openai_type = "not_found_error"


class AuthenticationError(ClientError):
    """No API key, or not a valid one."""

    http_status = 401
    grpc_code = "UNAUTHENTICATED"
    openai_type = "authentication_error"


class PayloadTooLargeError(ClientError):
    """The request body is larger than the server accepts."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"  # what gRPC itself answers for a message over the size limit


class ServerError(GptossError):
    """A fault on our side (a broken checkpoint, a bug); the client can do nothing about it."""


class CheckpointError(ServerError):
    """A checkpoint that cannot be loaded; the message names the file, the tensor and the fault."""


class VocabularyError(ServerError):
    """The o200k_base vocabulary file is missing, malformed, or not the expected bytes."""


class InsufficientMemoryError(ServerError):
    """A load would not fit in the memory that is free; the message says need, free and options."""


class UnavailableError(ServerError):
    """The serving unit cannot take this work now (failed, draining, not started); retry later or elsewhere."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class OverloadedError(UnavailableError):
    """Queues are full; retry after `retry_after_s`."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    openai_type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return type(self), (str(self), self.retry_after_s)


class DeadlineExceededError(GptossError):
    """The request ran past its deadline (the client's `timeout` or gRPC deadline) and was aborted."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    openai_type = "timeout_error"
