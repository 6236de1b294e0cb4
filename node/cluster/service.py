"""The InferenceService every daemon hosts: Generate, ListModels, ClusterStatus, Place, Launch,
Unload. Any node answers any call.

- **Generate** runs on the instance's coordinator. A node that does not coordinate a matching
  instance asks its peers who does and relays the stream (deadline and cancellation carried
  over). The request is validated, admitted (``RESOURCE_EXHAUSTED`` beyond the instance's
  queue), and only then are response headers sent: a client knows its request was accepted.
  The engine runs on a worker thread; when the client goes away or its deadline passes, the
  call's callback cancels the request and every stage frees its caches.
- **A model that is not launched is NOT_FOUND**, with the command that launches it. Generate
  never loads a model by itself: loading takes memory on several machines and, for real
  models, minutes — a decision for ``macmesh launch``, not a side effect of a typo in a
  request (and a deadline-bound request could not wait for it anyway).
- **Launch** makes this node the coordinator (see ``coordinator.py``) and streams progress
  lines, then the instance. Cancelling the call cancels the launch and frees what was loaded.
- **Unload** works from any node: local instances are unloaded here, others by their
  coordinators.

Status codes: INVALID_ARGUMENT (a malformed request, a value outside the model's limits),
NOT_FOUND (unknown model, model not launched, no such instance), FAILED_PRECONDITION (an
engine the instance cannot run, weights missing on a stage node), RESOURCE_EXHAUSTED (the model
does not fit, the instance's queue is full), UNAVAILABLE (instance loading/failed, a stage or
peer unreachable), CANCELLED / DEADLINE_EXCEEDED from gRPC itself.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from queue import Empty, SimpleQueue
from typing import Any

import grpc

from node import rpc
from node.cluster import convert, peers
from node.cluster.admission import DEFAULT_HEADROOM, admit_load
from node.cluster.catalog import checkpoint_resolver, list_models, model_info_proto
from node.cluster.coordinator import Coordinator, LaunchCancelled, LaunchPlan
from node.cluster.instances import (
    InstanceInfo,
    InstanceRegistry,
    InstanceUnavailable,
    merge,
    pick_instance,
)
from node.cluster.limits import Limits, check_prompt_tokens, check_request
from node.cluster.live import DEFAULT_MAX_QUEUED, Busy, CancelToken, Instance
from node.cluster.selector import (
    REQUESTABLE,
    EngineRefused,
    native_mtp_disabled_by,
    request_engine,
)
from node.cluster.stops import StopMatcher
from node.logging import get_logger
from node.placement import InsufficientMemoryError, UnknownModelError, format_bytes
from node.proto.macmesh.v1 import inference_pb2 as pb
from node.proto.macmesh.v1 import inference_pb2_grpc as pb_grpc
from node.proto.macmesh.v1 import stage_pb2, stage_pb2_grpc
from node.security import calling_node

log = get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
STAGE_SERVICE_NAME = "macmesh.v1.StageService"
MAX_QUEUED_ENV = "MACMESH_MAX_QUEUED_REQUESTS"  # requests admitted per instance
POLL_S = 0.1
NO_DEADLINE_S = 365 * 24 * 3600.0  # "remaining" beyond a year means no deadline was set
_END = object()

Code = grpc.StatusCode


class Refusal(Exception):
    """An error with the status code it goes out with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message an exception goes out with."""
    from node.inference.errors import EngineUnavailable

    if isinstance(exc, Refusal):
        return exc.code, exc.message
    if isinstance(exc, grpc.RpcError):  # a peer's answer, relayed as it was
        return exc.code(), exc.details() or exc.code().name  # type: ignore[attr-defined]
    if isinstance(exc, UnknownModelError):  # NoCheckpointError too
        return Code.NOT_FOUND, str(exc)
    if isinstance(exc, InsufficientMemoryError):
        return Code.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, Busy):
        return Code.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, EngineRefused):
        return Code.FAILED_PRECONDITION, exc.reason
    if isinstance(exc, EngineUnavailable):
        return Code.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, InstanceUnavailable):
        return Code.UNAVAILABLE, str(exc)
    if isinstance(exc, LaunchCancelled):
        return Code.CANCELLED, str(exc)
    if isinstance(exc, ValueError):  # PlacementError, RequestError, bad fields
        return Code.INVALID_ARGUMENT, str(exc)
    code = getattr(exc, "code", None)
    if isinstance(code, grpc.StatusCode):  # PipelineError
        if code is Code.CANCELLED:  # the engine closed under the request: it was unloaded
            return Code.UNAVAILABLE, f"the instance was unloaded while the request ran ({exc})"
        return code, str(exc)
    log.error("internal error", error=repr(exc), exc_info=exc)
    return Code.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


_TRANSPORT_LOSS = ("Stream removed", "Socket closed", "Connection reset", "failed to connect")


def _lost_connection(details: str) -> bool:
    """gRPC's own words for a peer that vanished (not a status the peer sent)."""
    return any(words in details for words in _TRANSPORT_LOSS)


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code, message = status_for(exc)
    context.abort(code, message)


def _remaining(context: grpc.ServicerContext) -> float | None:
    """The caller's deadline, to pass on to a peer; None when the caller set none (gRPC then
    reports a far-future deadline, which as a timeout would overflow into the past)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > NO_DEADLINE_S else remaining


def _cancel_token(context: grpc.ServicerContext) -> CancelToken:
    """Set when the call ends for any reason: client gone, deadline passed, or done."""
    cancel = CancelToken()
    if not context.add_callback(cancel.set):  # the call already ended
        cancel.set()
    return cancel


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, daemon: Any, *, max_queued: int | None = None) -> None:
        self.daemon = daemon
        self.registry: InstanceRegistry[Instance] = InstanceRegistry()
        self.limits = Limits.from_settings(daemon.settings)
        if max_queued is None:
            max_queued = int(os.environ.get(MAX_QUEUED_ENV, DEFAULT_MAX_QUEUED))
        self.coordinator = Coordinator(
            daemon,
            self.registry,
            native_mtp_enabled=daemon.settings.native_mtp,
            disabled_by=native_mtp_disabled_by(dict(os.environ)),
            max_queued=max(1, max_queued),
        )

    def shutdown(self) -> None:
        self.coordinator.unload_all()

    # -- lookups -------------------------------------------------------------------------

    def _peer_addresses(self) -> list[str]:
        return [n.address for n in self.daemon.live_nodes() if n.id != self.daemon.node_id]

    def cluster_instances(self) -> list[InstanceInfo]:
        return merge(self.registry.infos(), peers.gather_instances(self._peer_addresses()))

    def _target(self, model: str, requested: str, forwarded: bool) -> InstanceInfo:
        """The instance a Generate goes to: this node's if one fits, else a peer's."""
        local = [i.info() for i in self.registry.matching(model)]
        me = self.daemon.node_id
        try:
            return pick_instance(local, requested, me)
        except (LookupError, EngineRefused, InstanceUnavailable):
            if forwarded:  # the peer that sent it found it here; answer from here only
                if not local:
                    raise Refusal(
                        Code.NOT_FOUND, f"model {model!r} is not launched on this node"
                    ) from None
                raise
        remote = [i for i in peers.gather_instances(self._peer_addresses()) if i.answers_to(model)]
        try:
            return pick_instance(merge(local, remote), requested, me)
        except LookupError:
            raise Refusal(Code.NOT_FOUND, self._not_launched(model)) from None

    def _not_launched(self, model: str) -> str:
        launched = sorted({i.model for i in self.cluster_instances()})
        hint = f"launched: {', '.join(launched)}" if launched else "nothing is launched"
        return (
            f"model {model!r} is not launched on this cluster ({hint}); launch it first: "
            f"macmesh launch {model} --node {self.daemon.client_address()}"
        )

    # -- Generate --------------------------------------------------------------------------

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        cancel = _cancel_token(context)
        try:
            if not request.model:
                raise ValueError("model is empty: name a launched model or instance id")
            requested = request.engine or "auto"
            if requested not in REQUESTABLE:
                raise ValueError(
                    f"engine {requested!r} is not one of {', '.join(REQUESTABLE)} "
                    "(empty means auto)"
                )
            convert.check_messages(request)
            check_request(request, self.limits)
            convert.sampling_params(request.sampling)
            target = self._target(request.model, requested, peers.is_forwarded(context))
        except Exception as exc:
            _abort(context, exc)
            return
        if target.coordinator_node_id != self.daemon.node_id:
            yield from self._relay_generate(target, request, context)
            return
        instance = self.registry.get(target.instance_id)
        if instance is None:  # unloaded a moment ago
            context.abort(Code.UNAVAILABLE, f"instance {target.instance_id} was just unloaded")
        try:
            choice = request_engine(
                requested, instance.choice.engine, instance.choice.reason, len(instance.stages)
            )
            engine_request = convert.engine_request(request, instance.tokenizer)
            prompt_ids = instance.validate(engine_request, choice)
            check_prompt_tokens(len(prompt_ids), self.limits)
            release = instance.admit(cancel)
        except Exception as exc:
            _abort(context, exc)
            return
        events: SimpleQueue[Any] = SimpleQueue()
        threading.Thread(
            target=_run_request,
            args=(instance, engine_request, choice, cancel, events, release),
            name=f"generate-{instance.instance_id}",
            daemon=True,
        ).start()
        context.send_initial_metadata(())  # accepted: the request is validated and queued
        yield from self._stream(
            instance, choice, prompt_ids, list(request.stop), events, cancel, context,
            request.request_id,
        )  # fmt: skip

    def _stream(
        self,
        instance: Instance,
        choice: Any,
        prompt_ids: list[int],
        stops: list[str],
        events: SimpleQueue[Any],
        cancel: CancelToken,
        context: grpc.ServicerContext,
        request_id: str = "",
    ) -> Iterator[pb.GenerateResponse]:
        from node.inference.events import GenerationDone

        stop = StopMatcher(stops)
        began = time.perf_counter()
        first_at: float | None = None
        tokens = 0
        outcome = "cancelled"  # unless it ends any other way
        try:
            while True:
                try:
                    kind, payload = events.get(timeout=POLL_S)
                except Empty:
                    if not cancel.is_set():
                        continue
                    if context.is_active():  # cancelled, but not by the client: an unload
                        why = getattr(instance, "failure", "") or "it was unloaded"
                        context.abort(Code.UNAVAILABLE, f"instance {instance.instance_id}: {why}")
                    return  # the client is gone (or its deadline passed); the worker stopped
                if kind == "error":
                    outcome = "failed"
                    _abort(context, payload)
                    return
                if kind == "end":
                    context.abort(
                        Code.UNAVAILABLE, "the instance was unloaded while the request ran"
                    )
                    return
                if isinstance(payload, GenerationDone):
                    tail = stop.flush()
                    if tail:
                        yield pb.GenerateResponse(delta=pb.TextDelta(text=tail))
                    stats = payload.stats.model_copy(
                        update={"engine_reason": choice.reason, "stages": instance.stage_stats()}
                    )
                    instance.record(stats)
                    outcome = "finished"
                    yield pb.GenerateResponse(
                        final=convert.stats_to_proto(stats, payload.finish_reason)
                    )
                    return
                first_at = first_at or time.perf_counter()
                tokens += len(payload.token_ids)
                text = stop.feed(payload.text)
                if text or not stop.stopped:
                    yield pb.GenerateResponse(
                        delta=pb.TextDelta(text=text, token_ids=payload.token_ids)
                    )
                if stop.stopped:
                    cancel.set()  # the engine stops; its caches are freed
                    stats = _partial_stats(
                        instance, choice, len(prompt_ids), tokens, began, first_at
                    )
                    instance.record(stats)
                    final = convert.stats_to_proto(stats, "stop")
                    final.stop_sequence = stop.matched or ""
                    outcome = "finished"
                    yield pb.GenerateResponse(final=final)
                    return
        finally:
            cancel.set()  # whatever ended the stream, the request ends with it
            # The request's fate, under the caller's request_id (the proto's contract).
            log.info(
                "request ended",
                request_id=request_id,
                instance=instance.instance_id,
                outcome=outcome,
                tokens=tokens,
            )

    def _relay_generate(
        self, target: InstanceInfo, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        """Forward to the instance's coordinator, relaying headers, messages and status."""
        channel = rpc.channel(target.coordinator_address)
        call = pb_grpc.InferenceServiceStub(channel).Generate(
            request, timeout=_remaining(context), metadata=peers.FORWARDED
        )
        context.add_callback(call.cancel)
        try:
            call.initial_metadata()  # the coordinator accepted it (or failed)
            if call.done() and call.code() is not Code.OK:
                context.abort(call.code(), call.details() or call.code().name)
            context.send_initial_metadata(())
            yield from call
        except grpc.RpcError as exc:
            if exc.code() is Code.UNAVAILABLE and _lost_connection(exc.details() or ""):
                context.abort(
                    Code.UNAVAILABLE,
                    f"the coordinator of {target.instance_id}, node "
                    f"{target.coordinator_node_id[:8]} at {target.coordinator_address}, went "
                    f"away during the request ({exc.details()}); retry it",
                )
            _abort(context, exc)
        finally:
            call.cancel()
            channel.close()

    # -- models, status, placement ---------------------------------------------------------

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        entries = list_models(self.daemon.settings.models_dir, self.cluster_instances())
        models = [model_info_proto(entry) for entry in entries]
        return pb.ListModelsResponse(models=models)

    def ClusterStatus(
        self, request: pb.ClusterStatusRequest, context: grpc.ServicerContext
    ) -> pb.ClusterStatusResponse:
        local_only = request.local_only or peers.is_forwarded(context)
        instances = self.registry.infos() if local_only else self.cluster_instances()
        nodes = [] if local_only else [_node_proto(n) for n in self.daemon.cluster_view().nodes]
        return pb.ClusterStatusResponse(nodes=nodes, instances=[i.to_proto() for i in instances])

    def _plan(self, model: str, min_nodes: int, context_length: int, pin: bool) -> LaunchPlan:
        if not model:
            raise ValueError("model is empty: give a card id or a checkpoint directory")
        return self.coordinator.plan(
            model, max(1, min_nodes), context_length or None, pin_local=pin
        )

    def Place(self, request: pb.PlaceRequest, context: grpc.ServicerContext) -> pb.Placement:
        try:
            launch_plan = self._plan(
                request.model, request.min_nodes, request.context_length, pin=False
            )
        except Exception as exc:
            _abort(context, exc)
        placement = launch_plan.placement
        return pb.Placement(
            model=launch_plan.card.id,
            stages=[
                pb.PlannedStage(
                    node_id=s.node_id,
                    start_layer=s.start_layer,
                    end_layer=s.end_layer,
                    bytes=s.bytes,
                )
                for s in placement.stages
            ],
            total_bytes=placement.total_bytes,
            explanation=placement.explanation,
        )

    # -- Launch / Unload -----------------------------------------------------------------------

    def Launch(
        self, request: pb.LaunchRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.LaunchProgress]:
        cancel = _cancel_token(context)
        forwarded = peers.is_forwarded(context)
        model = request.model
        try:
            if request.pull:  # plan from the hub's headers; the nodes download below
                model = self.coordinator.prepare_pull(request.model)
            launch_plan = self._plan(model, request.min_nodes, request.context_length, pin=forwarded)
        except Exception as exc:
            _abort(context, exc)
            return
        if launch_plan.delegate_to is not None:
            yield from self._delegate_launch(launch_plan, request, context)
            return
        progress: SimpleQueue[Any] = SimpleQueue()

        def work() -> None:
            try:
                instance = self.coordinator.launch(
                    model,
                    launch_plan,
                    lambda line: progress.put(("line", line)),
                    cancel,
                    pull=request.pull,
                )
                progress.put(("done", instance))
            except BaseException as exc:
                progress.put(("error", exc))

        threading.Thread(target=work, name="launch", daemon=True).start()
        context.send_initial_metadata(())
        while True:
            try:
                kind, payload = progress.get(timeout=POLL_S)
            except Empty:
                continue  # the worker notices a cancel at its next step and reports
            if kind == "line":
                yield pb.LaunchProgress(message=payload)
            elif kind == "done":
                if cancel.is_set():  # the caller left just as the load finished
                    self.coordinator.unload(payload)
                    return
                yield pb.LaunchProgress(instance=payload.info().to_proto())
                return
            else:
                code, message = status_for(payload)
                if code is Code.INVALID_ARGUMENT:  # a stage could not load what we asked
                    code = Code.FAILED_PRECONDITION
                context.abort(code, message)
                return

    def _delegate_launch(
        self, launch_plan: LaunchPlan, request: pb.LaunchRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.LaunchProgress]:
        """The model fits on one other node only: that node loads and coordinates it."""
        node_id = launch_plan.delegate_to
        assert node_id is not None
        address = self.daemon.address_of(node_id)
        if address is None:
            context.abort(Code.UNAVAILABLE, f"node {node_id} left before the launch reached it")
        stage = launch_plan.placement.stages[0]
        context.send_initial_metadata(())
        yield pb.LaunchProgress(
            message=f"{launch_plan.card.id} fits on one node, {node_id} "
            f"({format_bytes(stage.bytes)}), but not on this one: {node_id} coordinates it"
        )
        with rpc.channel(address) as channel:
            call = pb_grpc.InferenceServiceStub(channel).Launch(
                request, timeout=_remaining(context), metadata=peers.FORWARDED
            )
            context.add_callback(call.cancel)
            try:
                yield from call
            except grpc.RpcError as exc:
                _abort(context, exc)

    def Unload(self, request: pb.UnloadRequest, context: grpc.ServicerContext) -> pb.UnloadResponse:
        if not request.model and not request.instance_id:
            context.abort(Code.INVALID_ARGUMENT, "give model or instance_id to unload")

        def wanted(info: InstanceInfo) -> bool:
            if request.instance_id and info.instance_id != request.instance_id:
                return False
            return not request.model or info.answers_to(request.model)

        count = 0
        for instance in self.registry.all():
            if wanted(instance.info()):
                self.coordinator.unload(instance)
                count += 1
        if not peers.is_forwarded(context):
            by_coordinator: dict[str, list[str]] = {}
            for info in peers.gather_instances(self._peer_addresses()):
                if wanted(info):
                    by_coordinator.setdefault(info.coordinator_address, []).append(info.instance_id)
            for address, ids in by_coordinator.items():
                try:
                    count += peers.unload_on(address, ids, timeout_s=_remaining(context) or 60.0)
                except grpc.RpcError as exc:
                    _abort(context, exc)
        if count == 0:
            what = request.instance_id or request.model
            context.abort(Code.NOT_FOUND, f"no instance of {what!r} is launched on this cluster")
        return pb.UnloadResponse(unloaded=count)


def _run_request(
    instance: Instance,
    request: Any,
    choice: Any,
    cancel: CancelToken,
    events: SimpleQueue[Any],
    release: Callable[[], None],
) -> None:
    """The engine loop of one request, on its own thread: it ends (and frees the request's
    caches) when the request finishes or is cancelled, whatever happens to the gRPC call."""
    try:
        finished = False
        for event in instance.generate(request, choice, cancel):
            events.put(("event", event))
            finished = event.kind == "done"
            if cancel.is_set():
                return
        if not finished and not cancel.is_set():
            events.put(("end", None))  # the instance went away without finishing the request
    except Exception as exc:
        events.put(("error", exc))
    finally:
        release()


def _partial_stats(
    instance: Instance,
    choice: Any,
    prompt_tokens: int,
    tokens: int,
    began: float,
    first_at: float | None,
) -> Any:
    """Stats of a request a stop string ended (the engine's own stats never came)."""
    from node.inference.stats import GenerationStats, rate

    now = time.perf_counter()
    first = first_at or now
    return GenerationStats(
        engine=choice.engine,
        engine_reason=choice.reason,
        drafter_kind="native_mtp" if choice.engine == "native_mtp" else None,
        prompt_tokens=prompt_tokens,
        generation_tokens=tokens,
        prompt_tps=rate(prompt_tokens, first - began),
        generation_tps=rate(max(tokens - 1, 0), now - first),
        stages=instance.stage_stats(),
    )


def _node_proto(node: Any) -> pb.ClusterNode:
    return pb.ClusterNode(
        node_id=node.id,
        name=node.name,
        address=node.address,
        state=str(node.state),
        memory_total_bytes=node.total_memory_bytes,
        memory_available_bytes=node.available_memory_bytes,
        chip=node.chip,
        last_seen_seconds_ago=node.seconds_since_seen,
    )


class LazyStageService(stage_pb2_grpc.StageServiceServicer):
    """The pipeline's StageService, created on first use: it imports mlx-lm (seconds), and a
    daemon that never hosts a stage should start in well under one."""

    def __init__(
        self, resolve_model: Callable[[str], Any], memory_headroom: float = DEFAULT_HEADROOM
    ) -> None:
        self._resolve_model = resolve_model
        self.memory_headroom = memory_headroom
        self._service: Any = None
        self._lock = threading.Lock()
        self._coordinators: dict[str, str] = {}  # instance id -> node id that loaded it

    def _real(self) -> Any:
        with self._lock:
            if self._service is None:
                from node.inference.stage import StageService

                self._service = StageService(self._resolve_model)
            return self._service

    def LoadShard(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:  # the coordinator planned from a heartbeat; check what is free right now
            admit_load(0, self.memory_headroom, "this stage node")
        except InsufficientMemoryError as exc:
            context.abort(Code.RESOURCE_EXHAUSTED, str(exc))
        reply = self._real().LoadShard(request, context)
        coordinator = calling_node(context)
        if coordinator:
            with self._lock:
                self._coordinators[request.instance_id] = coordinator
        return reply

    def on_peer_event(self, event: Any) -> None:
        """A coordinator that is gone (down, left, restarted) never unloads its shards: unload
        them here, so no weights stay orphaned on this node."""
        if str(event.kind) not in ("down", "left", "restarted", "forgotten"):
            return
        with self._lock:
            orphans = [i for i, node in self._coordinators.items() if node == event.node_id]
        if orphans:
            threading.Thread(
                target=self._unload_orphans, args=(orphans, str(event.kind)), daemon=True
            ).start()

    def _unload_orphans(self, instance_ids: list[str], why: str) -> None:
        for instance_id in instance_ids:
            log.warning("unloading shard of a gone coordinator", instance=instance_id, why=why)
            self.UnloadShard(stage_pb2.UnloadShardRequest(instance_id=instance_id), None)
        import mlx.core as mx

        mx.clear_cache()

    # Until a shard is loaded there is nothing to unload, report or forward to: answer
    # without importing the runtime (a status probe must not take seconds).

    def UnloadShard(self, request: Any, context: grpc.ServicerContext | None) -> Any:
        with self._lock:
            self._coordinators.pop(request.instance_id, None)
        if self._service is None:
            return stage_pb2.UnloadShardResponse(unloaded=False)
        return self._real().UnloadShard(request, context)

    def Status(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self._service is None:
            return stage_pb2.StageStatusResponse()
        return self._real().Status(request, context)

    def Forward(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        if self._service is None:
            context.abort(Code.NOT_FOUND, "no stage is loaded on this node")
        return self._real().Forward(request_iterator, context)

    def shutdown(self, reason: str = "") -> None:
        with self._lock:
            service = self._service
        if service is not None:
            service.shutdown(reason)
            import mlx.core as mx

            mx.clear_cache()


def install(daemon: Any) -> InferenceServicer:
    """Host the InferenceService and the pipeline's StageService on ``daemon`` (before start).

    Stages resolve MODEL names under the node's models directory and the bundled models; on
    stop, every instance this node coordinates is unloaded (its remote stages too), then every
    stage it hosts."""
    stages = LazyStageService(
        checkpoint_resolver(daemon.settings.models_dir),
        float(getattr(daemon.settings, "launch_memory_headroom", DEFAULT_HEADROOM)),
    )
    daemon.add_servicer(
        stage_pb2_grpc.add_StageServiceServicer_to_server, stages, STAGE_SERVICE_NAME
    )
    servicer = InferenceServicer(daemon)
    daemon.add_servicer(pb_grpc.add_InferenceServiceServicer_to_server, servicer, SERVICE_NAME)
    from node.hub.service import install as install_hub

    install_hub(daemon)  # HubService: this node's part of a `launch --pull`
    daemon.subscribe(servicer.coordinator.on_peer_event)
    daemon.subscribe(stages.on_peer_event)

    def stop(_daemon: Any) -> None:
        servicer.shutdown()
        # In-flight requests through this node's stages learn which node went, and why.
        stages.shutdown(f"the stage on node {daemon.settings.name} ({daemon.address}) stopped")

    daemon.on_stop(stop)
    return servicer
