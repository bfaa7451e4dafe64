"""How Serve's gRPC proxies register our services (`GRPC_SERVICER_FUNCTIONS` in serve/app.py): requests
pass through the proxy as raw bytes, and the gateway replica parses them.

With the generated `add_GptossServiceServicer_to_server`, the proxy parsed each message itself: a
malformed one failed there with UNKNOWN, and a message of any size (up to Serve's 2 GiB default) was
parsed before authentication. As bytes, a message is checked for size first and a malformed one is
INVALID_ARGUMENT (serve/grpc_protocol.py). This module stays light: the proxies import it.
"""

from __future__ import annotations

import contextvars
import logging

import grpc
from grpc_health.v1 import health_pb2

from serve.proto.gptoss.v1 import gptoss_pb2 as pb

SERVICE_NAME = "gptoss.v1.GptossService"
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"
STREAMING_METHODS = ("Generate", "Respond")

logger = logging.getLogger("ray.serve")


def add_gptoss_service(servicer, server) -> None:
    """`gptoss.v1.GptossService` with undeserialized requests (reflection still describes it)."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, response_serializer=pb.GenerateResponse.SerializeToString),
        "Abort": grpc.unary_unary_rpc_method_handler(
            servicer.Abort, response_serializer=pb.AbortResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, response_serializer=pb.ModelInfo.SerializeToString),
        "Respond": grpc.unary_stream_rpc_method_handler(
            servicer.Respond, response_serializer=pb.ResponseEvent.SerializeToString),
        "GetResponse": grpc.unary_unary_rpc_method_handler(
            servicer.GetResponse, response_serializer=pb.Response.SerializeToString),
        "DeleteResponse": grpc.unary_unary_rpc_method_handler(
            servicer.DeleteResponse, response_serializer=pb.DeleteResponseReply.SerializeToString),
    }
    generic_handler = grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
    server.add_generic_rpc_handlers((generic_handler,))
    _cancels_abandoned_replica_calls(server, generic_handler)


def add_health_service(servicer, server) -> None:
    """`grpc.health.v1.Health/Check` with undeserialized requests."""
    handlers = {"Check": grpc.unary_unary_rpc_method_handler(
        servicer.Check, response_serializer=health_pb2.HealthCheckResponse.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(HEALTH_SERVICE_NAME, handlers),))


def _cancels_abandoned_replica_calls(server, generic_handler) -> None:
    """Make Serve's proxy cancel the replica call of a Generate (or Respond) whose client went away, in
    every case.

    Ray 2.60's gRPC proxy cancels the replica call when a client cancels while the proxy awaits the
    next message; when the cancel lands while a message is being sent, the proxy's generators are
    closed instead (GeneratorExit at a `yield`), the replica call is never cancelled, and the model
    server generates on to max_tokens (seen in 3 of 30 cancels here). So the proxy's response
    generators made for a Generate call are recorded, and cancelled when the call's handler ends.
    """
    from ray.serve._private import proxy

    methods = [f"/{SERVICE_NAME}/{name}" for name in STREAMING_METHODS]
    handlers = getattr(generic_handler, "_method_handlers", {})
    if not hasattr(server, "service_handler_factory") or not all(m in handlers for m in methods):
        return  # not Serve's proxy: nothing to mend
    base = proxy.ProxyResponseGenerator
    if not hasattr(base, "cancelled") or not all(callable(getattr(handlers[m], "unary_stream", None)) for m in methods):
        logger.warning("gptoss: Ray's gRPC proxy changed; a cancelled Generate or Respond may run on to max_tokens")
        return
    if not getattr(base, "registers_with_its_call", False):
        class RegisteringProxyResponseGenerator(base):
            registers_with_its_call = True

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                responses = _CALL_RESPONSES.get()
                if responses is not None:
                    responses.append(self)

        proxy.ProxyResponseGenerator = RegisteringProxyResponseGenerator
    for method in methods:
        handlers[method] = handlers[method]._replace(unary_stream=_cancel_on_end(handlers[method].unary_stream))


# The proxy's response generators made while serving the current streaming call (one call per task).
_CALL_RESPONSES: contextvars.ContextVar[list | None] = contextvars.ContextVar("gptoss_call_responses", default=None)


def _cancel_on_end(unary_stream):
    async def handler(request, context):
        responses: list = []
        _CALL_RESPONSES.set(responses)
        try:
            async for message in unary_stream(request, context):
                yield message
        finally:
            for response in responses:
                if not getattr(response, "_done", True) and not response.cancelled():
                    response._response.cancel()

    return handler
