"""Errors the engine raises to its callers.

A request the engine will never run raises `InvalidRequestError` (a ValueError) at `add_request`,
naming the offending parameter; the serving layer maps it to HTTP 400 / gRPC INVALID_ARGUMENT. An
expected shortage (no free KV blocks) is never an error: the scheduler waits or preempts.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's errors."""


class InvalidRequestError(EngineError, ValueError):
    """A client error: `param` names the request field that is wrong (e.g. "temperature")."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def invalid(param: str, rule: str, value: object) -> InvalidRequestError:
    """`InvalidRequestError` with the message "<param> must be <rule>, got <value>"."""
    return InvalidRequestError(param, f"{param} must be {rule}, got {value!r}")
