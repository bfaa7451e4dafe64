"""The gRPC service `gptoss.v1.GptossService` (and `grpc.health.v1.Health/Check`) over the gateway
service. Ray Serve's gRPC proxy calls the ingress method named like the RPC with the request's raw bytes
(serve/grpc_registration.py); `Generate` hands them to admission (serve/grpc_protocol.py, in an
admission worker), the others parse their small messages here. A failure sets the status code and
details on the call's context and raises, which the proxy sends as that status; server errors quote
the request id, which a successful call returns in its trailing metadata (`x-request-id`).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
from grpc_health.v1 import health_pb2

from gptoss.errors import NotFoundError
from serve.admission import check_model
from serve.errors import error_reply
from serve.gateway import GatewayService
from serve.grpc_protocol import (
    admit_generate,
    admit_respond,
    admit_respond_turn,
    parse_message,
    response_event_message,
    response_message,
    responses,
)
from serve.grpc_registration import SERVICE_NAME
from serve.proto.gptoss.v1 import gptoss_pb2 as pb
from serve.responses_protocol import ResponseBuilder, failure_code

REPLICA_METADATA = "x-gptoss-replica"  # trailing metadata: the model server replica that served the call
REQUEST_ID_METADATA = "x-request-id"


class GrpcApi:
    """Mixed into the gateway deployment, which sets `gateway`."""

    gateway: GatewayService

    async def Generate(self, raw: bytes, grpc_context) -> AsyncIterator[pb.GenerateResponse]:  # noqa: N802
        gateway = self.gateway
        gateway.metrics.request("grpc")
        request_id = f"grpc-{uuid.uuid4().hex}"  # unless the request names its own
        try:
            tenant = gateway.authenticate(metadata_token(grpc_context))
            generation = await gateway.admit(admit_generate, raw, request_id, tenant)
            request_id = generation.request_id
            trailing = [(REQUEST_ID_METADATA, request_id)]
            grpc_context.set_trailing_metadata(trailing)
            replica_sent = False
            # Closed when left: Serve throws a cancel in at our `yield` when the client goes away.
            async with contextlib.aclosing(gateway.run(generation, abortable=True)) as events:
                async for event in events:
                    if not replica_sent and event.replica_id:
                        grpc_context.set_trailing_metadata(trailing + [(REPLICA_METADATA, event.replica_id)])
                        replica_sent = True
                    for message in responses(event, request_id):
                        yield message
        except Exception as e:  # noqa: BLE001
            raise_status(grpc_context, e, gateway, request_id)

    async def Respond(self, raw: bytes, grpc_context) -> AsyncIterator[pb.ResponseEvent]:  # noqa: N802
        """The Responses API: OpenAI's events as `ResponseEvent`s. A fault before the model's first output
        is the call's status; after it, a `response.failed` event ends the stream."""
        gateway = self.gateway
        gateway.metrics.request("grpc-responses")
        request_id = f"grpc-{uuid.uuid4().hex}"
        builder = None
        try:
            tenant = gateway.authenticate(metadata_token(grpc_context))
            call, generation, conversation = await gateway.admit_response(admit_respond, raw, request_id, tenant,
                                                                          admit_respond_turn)
            grpc_context.set_trailing_metadata([(REQUEST_ID_METADATA, request_id)])
            builder = ResponseBuilder(call, gateway.model_name, gateway.block_size)
            async with contextlib.aclosing(gateway.respond(call, generation, conversation, tenant, builder)) as events:
                async for event in events:
                    yield response_event_message(event)
        except Exception as e:  # noqa: BLE001
            if builder is None or not builder.started_output:
                raise_status(grpc_context, e, gateway, request_id)
            reply = error_reply(e, request_id)
            gateway.metrics.error("grpc-responses", reply.http_status)
            for event in builder.fail(reply.message, failure_code(reply.http_status)):
                yield response_event_message(event)

    async def GetResponse(self, raw: bytes, grpc_context) -> pb.Response:  # noqa: N802
        try:
            tenant = self.gateway.authenticate(metadata_token(grpc_context))
            request = parse_message(raw, pb.GetResponseRequest, self.gateway.limits.max_request_bytes)
            record = await self.gateway.load_response(request.response_id, tenant)
            return response_message(record["response"], record["input_items"])
        except Exception as e:  # noqa: BLE001
            raise_status(grpc_context, e, self.gateway)

    async def DeleteResponse(self, raw: bytes, grpc_context) -> pb.DeleteResponseReply:  # noqa: N802
        try:
            tenant = self.gateway.authenticate(metadata_token(grpc_context))
            request = parse_message(raw, pb.DeleteResponseRequest, self.gateway.limits.max_request_bytes)
            await self.gateway.delete_response(request.response_id, tenant)
            return pb.DeleteResponseReply(response_id=request.response_id, deleted=True)
        except Exception as e:  # noqa: BLE001
            raise_status(grpc_context, e, self.gateway)

    async def Abort(self, raw: bytes, grpc_context) -> pb.AbortResponse:  # noqa: N802
        """Ends the caller's own running Generate of that id, on whichever gateway replica runs it."""
        try:
            tenant = self.gateway.authenticate(metadata_token(grpc_context))
            request = parse_message(raw, pb.AbortRequest, self.gateway.limits.max_request_bytes)
            return pb.AbortResponse(aborted=await self.gateway.abort(request.request_id, tenant))
        except Exception as e:  # noqa: BLE001
            raise_status(grpc_context, e, self.gateway)

    async def GetModelInfo(self, raw: bytes, grpc_context) -> pb.ModelInfo:  # noqa: N802
        try:
            self.gateway.authenticate(metadata_token(grpc_context))
            request = parse_message(raw, pb.GetModelInfoRequest, self.gateway.limits.max_request_bytes)
            check_model(request.model, self.gateway.model_name)
            info = await self.gateway.info()
            return pb.ModelInfo(model=self.gateway.model_name, max_model_len=info.max_model_len,
                                vocab_size=info.vocab_size, num_hidden_layers=info.num_hidden_layers,
                                num_local_experts=info.num_local_experts,
                                num_experts_per_tok=info.num_experts_per_tok, num_ranks_per_group=info.num_ranks,
                                dtype=info.dtype, device=info.device, max_logprobs=info.max_logprobs,
                                kernels=dict(info.kernels))
        except Exception as e:  # noqa: BLE001
            raise_status(grpc_context, e, self.gateway)

    async def Check(self, raw: bytes, grpc_context) -> health_pb2.HealthCheckResponse:  # noqa: N802
        """grpc.health.v1: SERVING while a model server replica serves (Serve's view, no call to one)."""
        try:
            self.gateway.authenticate_health(metadata_token(grpc_context))
            request = parse_message(raw, health_pb2.HealthCheckRequest, self.gateway.limits.max_request_bytes)
            if request.service not in ("", SERVICE_NAME):
                raise NotFoundError(f"unknown service {request.service[:100]!r}; this server has {SERVICE_NAME!r}",
                                    "service")
        except Exception as e:  # noqa: BLE001
            raise_status(grpc_context, e, self.gateway)
        fleet = await self.gateway.health()
        status = health_pb2.HealthCheckResponse.SERVING if fleet.healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


def raise_status(grpc_context, exc: Exception, gateway: GatewayService | None = None,
                 request_id: str = "") -> NoReturn:
    """Sends `exc` as the call's status (the proxy needs the code set, then an exception)."""
    reply = error_reply(exc, request_id)
    if gateway is not None:
        gateway.metrics.error("grpc", reply.http_status)
    grpc_context.set_code(grpc.StatusCode[reply.grpc_code])
    grpc_context.set_details(reply.message)
    raise exc


def metadata_token(grpc_context) -> str | None:
    for key, value in grpc_context.invocation_metadata():
        if key == "authorization":
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None

