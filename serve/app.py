"""`build_app`: validate the config -> build the two deployments -> bind them into one application.

    model server (one EP group per replica)  <--DeploymentHandle--  gateway (ingress: OpenAI HTTP + gRPC)
                                        response store (one replica)  <--'

`build_app(args)` is the `import_path` target of Ray's own tooling (`serve run serve.app:build_app`,
`serve deploy`, KubeRay's serveConfigV2), with `args` the app config's mapping; `gptoss-serve serve`
calls `build_app_from_config`. gRPC needs the servicers of `GRPC_SERVICER_FUNCTIONS` in the Serve
instance's `grpc_options` (which `gptoss-serve serve` sets).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, BackpressureConfig, RequestRouterConfig

from serve.config import AppConfig, parse_config
from serve.gateway import GatewayService
from serve.grpc_api import GrpcApi
from serve.model_server import ModelServer, replica_bundles
from serve.openai_api import make_openai_app
from serve.response_store import ResponseStore

# Requests reach the gateway as raw bytes, checked for size and parsed there (serve/grpc_registration.py).
GRPC_SERVICER_FUNCTIONS = [
    "serve.grpc_registration.add_gptoss_service",
    "serve.grpc_registration.add_health_service",
]
MODEL_SERVER_NAME = "ModelServer"
GATEWAY_NAME = "Gateway"
RESPONSE_STORE_NAME = "ResponseStore"

logger = logging.getLogger("ray.serve")


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The application for `serve run serve.app:build_app` / a Serve config's `import_path`."""
    return build_app_from_config(parse_config(args, "args"))


def build_app_from_config(config: AppConfig) -> Application:
    device = resolve_device(config.group.device)
    if config.gateway.direct_ingress is True and os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1":
        logger.warning("gateway.direct_ingress is true, but this Ray was not started with "
                       "RAY_SERVE_ENABLE_DIRECT_INGRESS=1: requests come through Serve's proxies")
    ms = config.model_server
    model_server = serve.deployment(ModelServer).options(
        name=MODEL_SERVER_NAME,
        **replica_count_options(config),
        request_router_config=request_router_config(config),
        ray_actor_options={"num_cpus": ms.num_cpus},
        placement_group_bundles=replica_bundles(config, device),
        placement_group_strategy="PACK",
        max_ongoing_requests=config.max_ongoing_requests_per_replica(),
        max_queued_requests=ms.max_queued_requests,
        health_check_period_s=ms.health_check_period_s,
        health_check_timeout_s=ms.health_check_timeout_s,
        graceful_shutdown_timeout_s=ms.graceful_shutdown_timeout_s,
    ).bind(config, device)
    gw = config.gateway
    store = serve.deployment(ResponseStore).options(
        name=RESPONSE_STORE_NAME, num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
    ).bind(gw.response_store_entries, gw.response_store_bytes)
    return serve.deployment(Gateway).options(
        name=GATEWAY_NAME,
        num_replicas=gw.num_replicas,
        ray_actor_options={"num_cpus": gw.num_cpus},
        max_ongoing_requests=gw.max_ongoing_requests,
        # Overload waits in the proxies up to this, then gets 429 with Retry-After (RESOURCE_EXHAUSTED).
        max_queued_requests=gw.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
    ).bind(model_server, config, store)


def replica_count_options(config: AppConfig) -> dict:
    """`num_replicas`, or Serve's `autoscaling_config` in whole EP groups (one replica = one group)."""
    a = config.model_server.autoscaling
    if a is None:
        return {"num_replicas": config.model_server.num_replicas or 1}
    return {"autoscaling_config": AutoscalingConfig(
        min_replicas=a.min_replicas, max_replicas=a.max_replicas, initial_replicas=a.initial_replicas,
        target_ongoing_requests=a.target_ongoing_requests, upscale_delay_s=a.upscale_delay_s,
        downscale_delay_s=a.downscale_delay_s, look_back_period_s=a.look_back_period_s)}


def request_router_config(config: AppConfig) -> RequestRouterConfig:
    """Our prefix-affinity router (or Serve's default), fed by the replicas' `record_routing_stats`."""
    r, ms = config.model_server.router, config.model_server
    period = {"request_routing_stats_period_s": ms.stats_period_s,
              "request_routing_stats_timeout_s": max(ms.stats_period_s, 5.0)}
    if r.policy == "power_of_two":  # Serve's default router, which also tells the gateway of replicas leaving
        return RequestRouterConfig(request_router_class="serve.router.PowerOfTwoRouter", **period)
    return RequestRouterConfig(
        request_router_class="serve.router.PrefixAffinityRouter",
        request_router_kwargs={"max_extra_requests": r.max_extra_requests, "max_keys": r.max_keys,
                               "stats_max_age_s": 5 * ms.stats_period_s + 5.0},
        **period)


def resolve_device(device: str) -> str:
    """"auto" becomes "cuda" when the cluster has GPUs, else "cpu" (decided once, at build time, so a
    replica's bundles and its ranks agree; set it explicitly where GPU nodes join later by autoscaling)."""
    if device != "auto":
        return device
    has_gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1
    return "cuda" if has_gpus else "cpu"


@serve.ingress()
class Gateway(GrpcApi):
    """The ingress: the OpenAI HTTP API (FastAPI) and the gRPC methods in one deployment, sharing one
    gateway service; it scales apart from the model servers."""

    def __init__(self, model_server, config: AppConfig, response_store=None):
        self.gateway = GatewayService(model_server, config, response_store=response_store)

    def __serve_build_asgi_app__(self):
        """Called by Serve after the constructor: the FastAPI app, bound to this replica's service."""
        return make_openai_app(self.gateway)

    def __del__(self) -> None:
        self.gateway.close()  # the admission workers
