"""`GatewayService`: what one gateway replica does for both APIs (OpenAI HTTP and gRPC), behind their
wire formats: authenticate, admit (in admission workers, never on the event loop), send the
generation's token ids to a model server replica through its DeploymentHandle, and turn the streamed
token ids back into choice events (serve/choices.py). It also answers health from Serve's view of the
model server replicas, without calling one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve
from ray.serve.exceptions import DeploymentUnavailableError, RequestCancelledError

from cluster.ray_calls import submit_outside_current_task
from engine.routing import prefix_routing_keys
from gptoss.errors import AuthenticationError, InvalidRequestError, NotFoundError, ServerError, shorten
from serve.admission import AdmissionContext, Generation, ModelLimits, RequestLimits
from serve.admission_workers import AdmissionWorkers
from serve.auth import ApiKeys
from serve.choices import ChoiceAssembler, ChoiceEvent, ChoiceUsage
from serve.config import AppConfig
from serve.errors import ReplicaUnavailableError, TokenChannelError, unwrap
from serve.metrics import GatewayMetrics
from serve.model_protocol import ModelInfo, ModelRequest
from serve.replica_sets import REPLICA_SETS, deployment_key
from serve.responses_protocol import ResponseBuilder, ResponsesCall, admit_responses_turn, stored_record
from serve.stream_merge import MergePolicy
from serve.token_channel import TokenInbox, call_chunks

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


@dataclass(eq=False)
class _Choice:
    """One choice's current model server call, found by its replica when that replica leaves."""

    stream: Any = None  # the DeploymentResponseGenerator
    replica_id: str = ""  # the replica serving it now ("" before its first chunk)
    last_replica_id: str = ""  # the replica that served it last (kept when it broke)
    moving: bool = False  # cancelled by the gateway to move it


class GatewayService:
    """One per gateway replica."""

    def __init__(self, model_server, config: AppConfig, authenticate: Callable[[str | None], str] | None = None,
                 response_store=None):
        self.model_server = model_server  # DeploymentHandle of the ModelServer deployment
        self.response_store = response_store  # DeploymentHandle of serve/response_store.py (None: no store)
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
        # Abortable requests by (tenant, request id): gRPC's Abort names them, and only their own tenant may.
        self._open: dict[tuple[str, str], _OpenRequest] = {}
        self._registry = None  # serve/abort_registry.py, with several gateway replicas
        self._registry_poll: asyncio.Task | None = None
        self._choices_on: dict[str, set[_Choice]] = {}  # model server replica id -> the choices it serves
        self._listening = False
        self._on_left: Callable | None = None
        self._replica_id = _replica_id()
        # Tokens come from the model servers over this replica's token channel (serve/token_channel.py).
        # Off under Ray's TLS: the channel is plain TCP, and would carry the tokens in the clear.
        channel = config.gateway.token_channel and os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true")
        self._inbox = TokenInbox(ray.util.get_node_ip_address()) if channel else None
        self._inbox_retry_at = 0.0
        self._channel_keys = itertools.count()
        self._num_channel_streams = 0  # open calls whose tokens come over the channel: what merging adapts to
        self._merge_policy = MergePolicy.of(config.model_server)

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

    # --- the Responses API ----------------------------------------------------------------------

    async def admit_response(self, admit_function: Callable, body: bytes, request_id: str, tenant: str,
                             admit_turn: Callable = admit_responses_turn
                             ) -> tuple[ResponsesCall, Generation, tuple[dict, ...]]:
        """(the call, its generation, the stored conversation it continues) from a Responses request in any
        API's wire format: `admit_function(body, context)` -> (call, generation or None when the call
        continues a stored response, which is fetched and rendered with it by `admit_turn`)."""
        call, generation = await self.admit(admit_function, body, request_id, tenant)
        conversation: tuple[dict, ...] = ()
        if generation is None:
            stored = await self.load_response(call.previous_response_id, tenant, "previous_response_id")
            conversation = tuple(stored["conversation"])
            generation = await self.admit(admit_turn, (call, conversation), request_id, tenant)
        return call, generation, conversation

    async def respond(self, call: ResponsesCall, generation: Generation, conversation: tuple[dict, ...],
                      tenant: str, builder: ResponseBuilder) -> AsyncIterator[dict]:
        """The response's events (OpenAI's), from `response.created` to its final event, which comes after
        the response is stored (a client that reads it back at once finds it). A fault raises: the API
        reports it as a status before the first output, in-band (`builder.fail`) after."""
        for event in builder.start():
            yield event
        async with contextlib.aclosing(self.run(generation)) as choice_events:
            async for choice_event in choice_events:
                events = builder.add(choice_event)
                if builder.finished and call.store:
                    await self.save_response(call.response_id, tenant,
                                             stored_record(call, builder.response, conversation, tenant))
                for event in events:
                    yield event


    async def load_response(self, response_id: str, tenant: str, param: str = "response_id") -> dict:
        """The tenant's stored response record (serve/responses_protocol.py's `stored_record`).

        Raises:
            NotFoundError naming the id: unknown, deleted, evicted, or another tenant's.
        """
        record = None
        if self.response_store is not None and len(response_id) <= 200:
            record = await self.response_store.get.remote(response_id, tenant)
        if record is None:
            raise NotFoundError(f"{param} {shorten(response_id)} names no stored response (unknown, deleted, "
                                f"or evicted from the store: gateway.response_store_entries / _bytes)", param)
        return json.loads(record)

    async def save_response(self, response_id: str, tenant: str, record: dict) -> bool:
        """Stores the record; False (logged) where it could not be: the response itself still stands."""
        if self.response_store is None:
            logger.warning("response %s: this application has no response store; not stored", response_id)
            return False
        data = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
        try:
            if await self.response_store.put.remote(response_id, tenant, data):
                return True
            logger.warning("response %s (%d bytes) is larger than the response store "
                           "(gateway.response_store_bytes): not stored", response_id, len(data))
        except Exception as e:  # noqa: BLE001 - the reply is whole; only its later retrieval is lost
            logger.error("response %s could not be stored: %s: %s", response_id, type(e).__name__, e)
        return False

    async def delete_response(self, response_id: str, tenant: str) -> None:
        """Raises NotFoundError as `load_response` does."""
        if self.response_store is None or not await self.response_store.delete.remote(response_id, tenant):
            raise NotFoundError(f"response_id {shorten(response_id)} names no stored response", "response_id")

    # --- running -------------------------------------------------------------------------------

    async def run(self, generation: Generation, abortable: bool = False) -> AsyncIterator[ChoiceEvent]:
        """The generation's events, choices interleaved as they arrive; leaving early cancels it all.
        `abortable`: `abort(generation.request_id, tenant)` may end it; its id must then be unique among
        its tenant's running requests (other tenants' ids are theirs: not refused, not visible).

        Raises:
            ClientError, UnavailableError, and what the model server raised.
        """
        key = (generation.cache_salt, generation.request_id)
        if abortable and key in self._open:
            raise InvalidRequestError("request_id", f"request_id {generation.request_id!r} is already running")
        self._listen_for_replicas_leaving()
        request = _OpenRequest([])
        if abortable:
            self._open[key] = request
            self._register(key)
        run_id = f"{generation.request_id}/{uuid.uuid4().hex[:12]}"  # unique across gateway replicas and tenants
        try:
            choices = [self._run_choice(generation, i, request, run_id) for i in range(generation.n)]
            async with contextlib.aclosing(interleave(choices)) as events:
                async for _, event in events:
                    yield event
        finally:
            if abortable:
                del self._open[key]
                if self._registry is not None:
                    submit_outside_current_task(self._registry.unregister.remote, *key, self._replica_id)
            for stream in request.streams:
                stream.cancel()  # those still open (an ended one was taken out): aborted in their engines

    async def abort(self, request_id: str, tenant: str) -> bool:
        """Ends the tenant's running abortable generation, whichever gateway replica runs it: each open
        choice's last event has finish_reason "abort". False when the tenant has no such request."""
        if self._abort_here(tenant, request_id):
            return True
        if self._registry is None:
            return False
        return await self._registry.abort.remote(tenant, request_id)

    def _abort_here(self, tenant: str, request_id: str) -> bool:
        request = self._open.get((tenant, request_id))
        if request is None:
            return False
        request.aborted = True
        for stream in request.streams:
            stream.cancel()
        return True

    def _register(self, key: tuple[str, str]) -> None:
        """With several gateway replicas, tell the application's abort registry that this replica runs the
        request (fire and forget), and start listening for aborts sent through it."""
        if self.config.gateway.num_replicas < 2:
            return
        if self._registry is None:
            from serve.abort_registry import get_registry

            self._registry = get_registry(self.model_server.app_name)
            self._registry_poll = asyncio.create_task(self._take_aborts())
        self._registry.register.remote(*key, self._replica_id)

    async def _take_aborts(self) -> None:
        while True:
            try:
                for token, tenant, request_id in await self._registry.take.remote(self._replica_id):
                    self._registry.answer.remote(token, self._abort_here(tenant, request_id))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the registry restarting: ask again shortly
                logger.warning("abort registry: %s: %s", type(e).__name__, e)
                await asyncio.sleep(1.0)

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
        """One choice's events. When its group fails or its replica is removed, the choice goes on in
        another group: before its first token as a retry (`max_retries`), after it as a move
        (`max_migrations`) with what it generated so far, so its client sees a pause, not an error."""
        model_request = self._model_request(generation, index, run_id)
        assembler = ChoiceAssembler(index, generation)
        choice = _Choice()
        limits = self.config.gateway
        generated: list[int] = []
        num_retries = num_moves = 0
        cached: int | None = None  # prompt tokens from the prefix cache, as the first group reported them
        broke_at: float | None = None
        outcome = "error"
        try:
            while True:
                call_request, queue = await self._on_channel(model_request)
                chunks = None
                call_finished = False  # the model server sent its last chunk: the call ends on its own
                try:
                    choice.stream, choice.moving = self._streaming.generate.remote(call_request), False
                    request.streams.append(choice.stream)
                    # Over the channel, chunks first become messages here (to the client or the proxy):
                    # merged here.
                    chunks = choice.stream if queue is None else call_chunks(
                        choice.stream, queue, _LAST_TOKENS_WAIT_S, self._merge_policy, lambda: self._num_channel_streams)
                    async for chunk in chunks:
                        self._track(choice, chunk.replica_id)
                        if broke_at is not None:
                            self.metrics.resumed(time.monotonic() - broke_at)
                            broke_at = None
                        cached = chunk.num_cached_tokens if cached is None else cached
                        generated += chunk.token_ids
                        if chunk.finish_reason is not None:
                            in_call = len(generated) - len(model_request.resumed_token_ids)
                            self.metrics.received(chunk.channel_tokens_before, in_call - chunk.channel_tokens_before)
                        if chunk.num_cached_tokens != cached:  # moved: the first group's count stands
                            chunk = dataclasses.replace(chunk, num_cached_tokens=cached)
                        call_finished = chunk.finish_reason is not None
                        event = assembler.add(chunk)
                        if event.finish_reason is not None:
                            outcome = "finished"
                            if not call_finished:
                                choice.stream.cancel()  # ended by a stop string here: the engine stops at once
                        yield event
                        if event.finish_reason is not None:
                            return
                    break  # ended without a finish reason: aborted on the model server
                except (RequestCancelledError, asyncio.CancelledError) as e:
                    if request.aborted:
                        break
                    if not choice.moving:
                        raise
                    error, reason = e, "drain"
                except Exception as e:
                    cause = unwrap(e)
                    if isinstance(cause, ReplicaUnavailableError):
                        self._failed_replicas.note(cause.replica_id)  # route around it until Serve replaces it
                    if request.aborted or not _retryable(e):
                        raise
                    error, reason = e, "failure"
                    # The router had only groups this gateway saw fail (it falls back on them rather than
                    # stop all traffic), e.g. while Serve replaces a failed group and removes the other:
                    # a moving stream waits for a replacement instead of spending its moves in a burst.
                    if (broke_at is not None and isinstance(cause, ReplicaUnavailableError)
                            and cause.replica_id in model_request.avoid_replica_ids
                            and time.monotonic() - broke_at < limits.migration_wait_s):
                        error = None
                finally:
                    self._untrack(choice)
                    if call_finished:
                        request.streams.remove(choice.stream)  # ended: nothing to cancel (a Ray call each)
                    if queue is not None:
                        self._inbox.close(call_request.channel_key)
                        self._num_channel_streams -= 1
                        if chunks is not None:
                            await chunks.aclose()
                        if choice.stream is not None and not call_finished:
                            choice.stream.cancel()  # left for a channel fault: the call must not run on
                if error is None:
                    await asyncio.sleep(_WAIT_FOR_REPLICA_POLL_S)
                    model_request = self._moved(model_request, generated, "")
                    continue
                if not generated:
                    if num_retries >= limits.max_retries:
                        raise error
                    num_retries += 1
                    logger.warning("request %s: a model server replica failed before the first token (%s); "
                                   "retrying elsewhere (%d of %d)", generation.request_id, type(unwrap(error)).__name__,
                                   num_retries, limits.max_retries)
                else:
                    if num_moves >= limits.max_migrations:
                        raise error
                    num_moves += 1
                    broke_at = time.monotonic()
                    self.metrics.migrated(reason)
                    logger.info("request %s: choice %d moves to another group after %d tokens (%s; %d of %d)",
                                generation.request_id, index, len(generated), reason, num_moves,
                                limits.max_migrations)
                model_request = self._moved(model_request, generated, choice.last_replica_id)
            # Aborted: the model server's stream ended early.
            outcome = "abort"
            yield ChoiceEvent(index, (), (), (), "abort", ChoiceUsage(len(generation.prompt_token_ids), 0, 0, 0))
        finally:
            if num_moves:
                self.metrics.migrated_outcome(outcome)

    async def _on_channel(self, model_request: ModelRequest) -> tuple[ModelRequest, asyncio.Queue | None]:
        """The call's request with a new key on this replica's token channel, and that key's queue (no
        queue: the channel is off, or cannot listen now, and the call carries the tokens)."""
        if self._inbox is None or time.monotonic() < self._inbox_retry_at:
            return model_request, None
        try:
            address = await self._inbox.address()
        except OSError as e:
            logger.warning("token channel: cannot listen (%s); streams come in their Serve calls for the next "
                           "%g s", e, _INBOX_RETRY_S)
            self._inbox_retry_at = time.monotonic() + _INBOX_RETRY_S
            return model_request, None
        key = str(next(self._channel_keys))
        self._num_channel_streams += 1
        return dataclasses.replace(model_request, reply_to=address, channel_key=key), self._inbox.open(key)

    def _moved(self, model_request: ModelRequest, generated: list[int], left_replica_id: str) -> ModelRequest:
        """The request for the group a choice moves to: the prompt and what was generated so far (the
        routing keys cover both, so the group holding that prefix is preferred), the replica it left
        avoided."""
        keys = prefix_routing_keys([*model_request.prompt_token_ids, *generated], self.block_size,
                                   model_request.cache_salt, self.prefix_blocks)
        avoid = {*model_request.avoid_replica_ids, *self._failed_replicas.current()} | (
            {left_replica_id} if left_replica_id else set())
        return dataclasses.replace(model_request, resumed_token_ids=tuple(generated), prefix_keys=keys,
                                   avoid_replica_ids=tuple(sorted(avoid)))

    # --- replicas that leave ---------------------------------------------------------------------

    def _track(self, choice: _Choice, replica_id: str) -> None:
        if replica_id and replica_id != choice.replica_id:
            self._untrack(choice)
            choice.replica_id = choice.last_replica_id = replica_id
            self._choices_on.setdefault(replica_id, set()).add(choice)

    def _untrack(self, choice: _Choice) -> None:
        if choice.replica_id:
            choices = self._choices_on.get(choice.replica_id)
            if choices is not None:
                choices.discard(choice)
                if not choices:
                    del self._choices_on[choice.replica_id]
            choice.replica_id = ""

    def _listen_for_replicas_leaving(self) -> None:
        """From the first run on: hear from this process's request router when a model server replica
        leaves Serve's routing set (it is being stopped)."""
        if self._listening:
            return
        self._listening = True
        loop = asyncio.get_running_loop()
        key = deployment_key(self.model_server.app_name, self.model_server.deployment_name)

        def on_left(deployment: str, left: frozenset[str]) -> None:  # the router's thread
            if deployment == key:
                loop.call_soon_threadsafe(self._replicas_left, left)

        self._on_left = on_left
        REPLICA_SETS.subscribe(on_left)

    def _replicas_left(self, left: frozenset[str]) -> None:
        """Streams on a replica being stopped get `drain_grace_s` to finish, then move to another group
        (well inside the replica's graceful_shutdown_timeout_s, after which Serve would cut them)."""
        if self.config.gateway.max_migrations == 0:
            return
        grace_s = self.config.model_server.drain_grace_s
        loop = asyncio.get_running_loop()
        for replica_id in left:
            for choice in list(self._choices_on.get(replica_id, ())):
                loop.call_later(grace_s, self._move, choice, replica_id)

    @staticmethod
    def _move(choice: _Choice, replica_id: str) -> None:
        if choice.replica_id == replica_id and choice.stream is not None:
            choice.moving = True
            choice.stream.cancel()  # its model server aborts it; the choice's loop sends it elsewhere

    def close(self) -> None:
        self.workers.close()
        if self._inbox is not None:
            self._inbox.stop()
        if self._registry_poll is not None:
            self._registry_poll.cancel()
        if self._on_left is not None:
            REPLICA_SETS.unsubscribe(self._on_left)


def _replica_id() -> str:
    """This gateway replica's id inside Serve ("local" outside a replica, as in unit tests)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a Serve replica
        return "local"


_WAIT_FOR_REPLICA_POLL_S = 0.5  # a moving stream with no usable group asks again this often
# A stream's last chunk (in its Serve call) waits this long for the tokens its model server sent before it
# over the token channel (written before it, so normally there already), then the stream moves on.
_LAST_TOKENS_WAIT_S = 10.0
_INBOX_RETRY_S = 60.0  # a gateway whose channel cannot listen tries again after this long


def _retryable(exc: BaseException) -> bool:
    """A failure of the replica, not of the request: another group may serve it."""
    cause = unwrap(exc)
    return isinstance(cause, ReplicaUnavailableError | TokenChannelError | DeploymentUnavailableError
                      | ray.exceptions.RayActorError | ray.exceptions.ActorUnavailableError)


async def interleave(iterators: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """(source index, item) from several async iterators as items arrive; the first error ends it all,
    and leaving early closes every source.

    Every generator here closes what it iterates when it is left (aclosing): a CancelledError thrown in at
    a `yield` (as Serve does when a client goes away) does not pass through the generators below it, which
    would otherwise stay open, their streams running, until the garbage collector found them."""
    if len(iterators) == 1:
        async with contextlib.aclosing(iterators[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def drain(source: int, iterator: AsyncIterator) -> None:
        try:
            async with contextlib.aclosing(iterator):
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
