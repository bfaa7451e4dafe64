"""`GatewayService`: what one gateway replica does for both APIs (OpenAI HTTP and gRPC), behind their
wire formats: authenticate, admit (in admission workers, never on the event loop), send the
generation's token ids to a model server replica through its DeploymentHandle, and turn the streamed
token ids back into choice events (serve/choices.py). It also answers health from Serve's view of the
model server replicas, without calling one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve
from ray.serve.exceptions import DeploymentUnavailableError, RequestCancelledError

from engine.routing import prefix_routing_keys
from gptoss.errors import AuthenticationError, InvalidRequestError, ServerError
from serve.admission import AdmissionContext, Generation, ModelLimits, RequestLimits
from serve.admission_workers import AdmissionWorkers
from serve.auth import ApiKeys
from serve.choices import ChoiceAssembler, ChoiceEvent, ChoiceUsage
from serve.config import AppConfig
from serve.errors import ReplicaUnavailableError, unwrap
from serve.metrics import GatewayMetrics
from serve.model_protocol import ModelInfo, ModelRequest

logger = logging.getLogger("ray.serve")


def allow_everyone(credential: str | None) -> str:
    """The authenticator when no API keys are configured: everyone is the one tenant ""."""
    return ""


def build_authenticator(config: AppConfig) -> Callable[[str | None], str]:
    auth = config.auth
    if not auth.enabled:
        return allow_everyone
    return ApiKeys(auth.api_keys_file, auth.api_keys_env, auth.reload_period_s).check


class RecentFailures:
    """Model server replicas whose group this gateway replica saw fail, for a while: new requests ask
    the router to avoid them until Serve's health check has replaced them (new replicas, new ids)."""

    def __init__(self, remember_s: float = 60.0):
        self.remember_s = remember_s
        self._until: dict[str, float] = {}

    def note(self, replica_id: str) -> None:
        if replica_id:
            self._until[replica_id] = time.monotonic() + self.remember_s

    def current(self) -> tuple[str, ...]:
        if not self._until:
            return ()
        now = time.monotonic()
        self._until = {rid: until for rid, until in self._until.items() if until > now}
        return tuple(self._until)


@dataclass(frozen=True)
class FleetHealth:
    """The model server deployment as Serve's controller last reported it."""

    healthy: bool
    status: str  # Serve's deployment status: HEALTHY, UPSCALING, UNHEALTHY, ...
    num_running: int  # replicas (EP groups) serving, less those this gateway saw fail just now
    num_starting: int
    checked_at: float  # time.monotonic()

    def body(self) -> dict[str, Any]:
        return {"status": "ok" if self.healthy else "unavailable",
                "model_servers": {"state": self.status, "running": self.num_running, "starting": self.num_starting}}


class FleetView:
    """Health from Serve's controller (which health-checks every replica on its own period), asked at
    most every `period_s` however many probes arrive: a probe never sends a request to a model server,
    so with `min_replicas: 0` it does not start a group."""

    def __init__(self, app_name: str, deployment_name: str, failures: RecentFailures, period_s: float = 2.0):
        self.app_name, self.deployment_name, self.period_s = app_name, deployment_name, period_s
        self.failures = failures
        self._last: FleetHealth | None = None
        self._refresh: asyncio.Task | None = None

    async def health(self) -> FleetHealth:
        last = self._last
        if last is not None and time.monotonic() - last.checked_at < self.period_s:
            return last
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._read())
        if last is not None:
            return last  # a stale answer now beats a probe that waits on the controller
        return await asyncio.shield(self._refresh)

    async def _read(self) -> FleetHealth:
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), timeout=10.0)
            deployment = status.applications[self.app_name].deployments[self.deployment_name]
            states = {str(getattr(state, "value", state)): count for state, count in deployment.replica_states.items()}
            verdict = str(getattr(deployment.status, "value", deployment.status))
        except Exception as e:  # noqa: BLE001 - no view of the fleet is "not healthy", never a failed probe
            logger.warning("health: Serve's status could not be read (%s: %s)", type(e).__name__, e)
            states, verdict = {}, "UNKNOWN"
        running = max(0, states.get("RUNNING", 0) - len(self.failures.current()))
        starting = states.get("STARTING", 0) + states.get("UPDATING", 0) + states.get("RECOVERING", 0)
        # No replica and none wanted: scaled to zero (min_replicas 0); the next request starts one.
        scaled_to_zero = verdict == "HEALTHY" and not any(states.values())
        healthy = verdict not in ("UNHEALTHY", "DEPLOY_FAILED", "UNKNOWN") and (running > 0 or scaled_to_zero)
        self._last = FleetHealth(healthy, verdict, running, starting, time.monotonic())
        return self._last


@dataclass
class _OpenRequest:
    streams: list  # the request's DeploymentResponseGenerators
    aborted: bool = False


class GatewayService:
    """One per gateway replica."""

    def __init__(self, model_server, config: AppConfig, authenticate: Callable[[str | None], str] | None = None):
        self.model_server = model_server  # DeploymentHandle of the ModelServer deployment
        self._streaming = model_server.options(stream=True)
        self.model_name = config.served_model_name()
        self.config = config
        self.limits: RequestLimits = config.request_limits()
        self.block_size = config.engine.block_size
        self.prefix_blocks = config.model_server.router.prefix_blocks
        self._authenticate = authenticate or build_authenticator(config)
        self.metrics = GatewayMetrics(self.model_name)
        self.workers = AdmissionWorkers(config.gateway.admission_workers, config.gateway.admission_timeout_s)
        self._failed_replicas = RecentFailures()
        self.fleet = FleetView(model_server.app_name, model_server.deployment_name, self._failed_replicas)
        self._info: ModelInfo | None = None
        self._open: dict[str, _OpenRequest] = {}  # by the client's request id (gRPC's Abort names it)
        self._run_numbers = itertools.count()

    # --- admission ------------------------------------------------------------------------------

    def authenticate(self, credential: str | None) -> str:
        """The caller's tenant.

        Raises:
            AuthenticationError (401) unless the credential is accepted; ServerError (500) when the
            authenticator itself failed (a fault of ours must not read as a wrong key).
        """
        try:
            return self._authenticate(credential)
        except AuthenticationError:
            raise
        except Exception as e:
            logger.error("the authenticator failed", exc_info=e)
            raise ServerError("the credential could not be checked") from e

    def authenticate_health(self, credential: str | None) -> None:
        """Health and metrics endpoints answer without a key unless `auth.public_health` is off."""
        if not self.config.auth.public_health:
            self.authenticate(credential)

    async def admit(self, admit_function: Callable, body: bytes, request_id: str, tenant: str) -> Any:
        """`admit_function(body, context)` in an admission worker (serve/admission_workers.py)."""
        info = await self.info()
        context = AdmissionContext(self.limits, self.model_name, request_id, tenant,
                                   ModelLimits(info.max_model_len, info.vocab_size),
                                   time.strftime("%Y-%m-%d", time.gmtime()))
        return await self.workers.run(admit_function, body, context)

    async def info(self) -> ModelInfo:
        """The served model's facts, asked of a model server replica once (it waits for one to be up)."""
        if self._info is None:
            self._info = await self.model_server.get_info.remote()
        return self._info

    async def health(self) -> FleetHealth:
        return await self.fleet.health()

    # --- running -------------------------------------------------------------------------------

    async def run(self, generation: Generation, abortable: bool = False) -> AsyncIterator[ChoiceEvent]:
        """The generation's events, choices interleaved as they arrive; leaving early cancels it all.
        `abortable`: `abort(generation.request_id)` may end it (its id must then be unique among the
        replica's running requests).

        Raises:
            ClientError, UnavailableError, and what the model server raised.
        """
        if abortable and generation.request_id in self._open:
            raise InvalidRequestError("request_id", f"request_id {generation.request_id!r} is already running")
        request = _OpenRequest([])
        if abortable:
            self._open[generation.request_id] = request
        run_id = f"{generation.request_id}/{next(self._run_numbers)}"
        try:
            choices = [self._run_choice(generation, i, request, run_id) for i in range(generation.n)]
            async for _, event in interleave(choices):
                yield event
        finally:
            if abortable:
                del self._open[generation.request_id]
            for stream in request.streams:
                stream.cancel()  # no-op for streams that ended; aborts the rest in their engines

    def abort(self, request_id: str) -> bool:
        """Ends a running abortable generation: each open choice's last event has finish_reason "abort"."""
        request = self._open.get(request_id)
        if request is None:
            return False
        request.aborted = True
        for stream in request.streams:
            stream.cancel()
        return True

    def _model_request(self, generation: Generation, index: int, run_id: str) -> ModelRequest:
        sampling = generation.sampling
        if index and sampling.seed is not None:
            sampling = dataclasses.replace(sampling, seed=(sampling.seed + index) % 2**63)
        keys = prefix_routing_keys(generation.prompt_token_ids, self.block_size, generation.cache_salt,
                                   self.prefix_blocks)
        return ModelRequest(f"{run_id}-{index}", generation.prompt_token_ids, sampling, generation.cache_salt, keys,
                            self._failed_replicas.current())

    async def _run_choice(self, generation: Generation, index: int, request: _OpenRequest, run_id: str
                          ) -> AsyncIterator[ChoiceEvent]:
        model_request = self._model_request(generation, index, run_id)
        assembler = ChoiceAssembler(index, generation)
        max_retries = self.config.gateway.max_retries
        for attempt in range(max_retries + 1):
            stream = self._streaming.generate.remote(model_request)
            request.streams.append(stream)
            started = False
            try:
                async for chunk in stream:
                    started = True
                    event = assembler.add(chunk)
                    yield event
                    if event.finish_reason is not None:
                        return
            except (RequestCancelledError, asyncio.CancelledError):
                if not request.aborted:
                    raise
                break
            except Exception as e:
                cause = unwrap(e)
                if isinstance(cause, ReplicaUnavailableError):
                    self._failed_replicas.note(cause.replica_id)  # route around it until Serve replaces it
                if started or request.aborted or attempt == max_retries or not _retryable(e):
                    raise
                if isinstance(cause, ReplicaUnavailableError):
                    model_request = dataclasses.replace(
                        model_request, avoid_replica_ids=(*model_request.avoid_replica_ids, cause.replica_id))
                logger.warning("request %s: a model server replica failed before the first token (%s); retrying "
                               "elsewhere (%d of %d)", generation.request_id, type(cause).__name__, attempt + 1,
                               max_retries)
                continue
            break
        # Aborted: the model server's stream ended early.
        yield ChoiceEvent(index, (), (), (), "abort", ChoiceUsage(len(generation.prompt_token_ids), 0, 0, 0))

    def close(self) -> None:
        self.workers.close()


def _retryable(exc: BaseException) -> bool:
    """A failure of the replica, not of the request: another group may serve it."""
    cause = unwrap(exc)
    return isinstance(cause, ReplicaUnavailableError | DeploymentUnavailableError | ray.exceptions.RayActorError
                      | ray.exceptions.ActorUnavailableError)


async def interleave(iterators: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """(source index, item) from several async iterators as items arrive; the first error ends it all,
    and leaving early closes every source."""
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def drain(source: int, iterator: AsyncIterator) -> None:
        try:
            async for item in iterator:
                queue.put_nowait((source, item))
            queue.put_nowait((source, done))
        except Exception as e:  # noqa: BLE001 - re-raised by the reader below
            queue.put_nowait((source, e))

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            source, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield source, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
