"""The InferenceService every daemon hosts: Generate, ListModels, ClusterStatus, Place,
Launch, Unload. Any node answers any call; this module only turns RPCs into calls of the
modules that do the work.

A Generate, from the wire to the engine and back (docs/architecture.md tells the same story):
the request's sizes are checked against the node's limits (``limits``), it becomes
``GenerateOptions`` (``node.messages``, validated once, on arrival), ``routing`` finds the
instance — this node's, or a peer's, to which it is relayed over a pooled channel — and on
the coordinator ``generate.serve`` checks it against the instance, admits it, runs it and
streams ``Delta`` events and one ``FinalStats``, each converted to protobuf once, here.

- **A model that is not launched is NOT_FOUND**, with the command that launches it. Generate
  never loads a model by itself: loading takes memory on several machines and, for real
  models, minutes — a decision for ``macmesh launch``, not a side effect of a typo in a
  request (and a deadline-bound request could not wait for it anyway).
- **Launch** makes this node the coordinator (see ``coordinator.py``) and streams progress
  lines, then the instance. Cancelling the call cancels the launch and frees what was loaded.
- **Unload** works from any node: local instances are unloaded here, others by their
  coordinators. Status codes: ``errors.py``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from queue import Empty, SimpleQueue
from typing import Any

import grpc

from node.cluster import generate, peers
from node.cluster.admission import DEFAULT_HEADROOM
from node.cluster.catalog import checkpoint_resolver, list_models, model_info_proto
from node.cluster.coordinator import Coordinator, LaunchPlan
from node.cluster.errors import Code, abort, status_for
from node.cluster.instances import InstanceInfo, InstanceRegistry
from node.cluster.limits import Limits, check_request
from node.cluster.live import DEFAULT_MAX_QUEUED, Instance
from node.cluster.routing import Router, remaining
from node.cluster.selector import native_mtp_disabled_by
from node.cluster.stage_host import SERVICE_NAME as STAGE_SERVICE_NAME
from node.cluster.stage_host import LazyStageService
from node.messages import event_to_proto, options_from_proto
from node.placement import format_bytes
from node.proto.macmesh.v1 import inference_pb2 as pb
from node.proto.macmesh.v1 import inference_pb2_grpc as pb_grpc
from node.proto.macmesh.v1 import stage_pb2_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
MAX_QUEUED_ENV = "MACMESH_MAX_QUEUED_REQUESTS"  # requests admitted per instance
POLL_S = 0.1


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, daemon: Any, *, max_queued: int | None = None) -> None:
        self.daemon = daemon
        self.registry: InstanceRegistry[Instance] = InstanceRegistry()
        self.router = Router(daemon, self.registry)
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
        self.router.close()

    def cluster_instances(self) -> list[InstanceInfo]:
        return self.router.cluster_instances()

    # -- Generate --------------------------------------------------------------------------

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        cancel = generate.cancel_token(context)
        forwarded = peers.is_forwarded(context)
        call = None
        try:
            check_request(request, self.limits)  # sizes first: before parsing a huge message
            options = options_from_proto(request)
            target = self.router.target(options.model, options.engine, forwarded)
            while call is None and target.coordinator_node_id != self.daemon.node_id:
                try:
                    call = self.router.open_relay(target, request, context)
                except grpc.RpcError as exc:
                    if exc.code() is not Code.NOT_FOUND or forwarded:
                        raise
                    # The coordinator no longer has it: our view was stale. Look again once.
                    self.router.invalidate()
                    retry = self.router.target(options.model, options.engine, forwarded)
                    if retry.instance_id == target.instance_id:
                        raise
                    target = retry
        except Exception as exc:
            abort(context, exc)
            return
        if call is not None:  # another node coordinates it: relay (abort() must not be caught)
            yield from self.router.relay(target, call, context)
            return
        instance = self.registry.get(target.instance_id)
        if instance is None:  # unloaded a moment ago
            context.abort(Code.UNAVAILABLE, f"instance {target.instance_id} was just unloaded")
        for event in generate.serve(instance, options, self.limits, cancel, context):
            yield event_to_proto(event)

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

    def _plan(
        self,
        model: str,
        min_nodes: int,
        context_length: int,
        pin: bool,
        mtp_across_pipeline: bool = False,
    ) -> LaunchPlan:
        if not model:
            raise ValueError("model is empty: give a card id or a checkpoint directory")
        return self.coordinator.plan(
            model,
            max(1, min_nodes),
            context_length or None,
            pin_local=pin,
            mtp_across_pipeline=mtp_across_pipeline,
        )

    def Place(self, request: pb.PlaceRequest, context: grpc.ServicerContext) -> pb.Placement:
        try:
            launch_plan = self._plan(
                request.model, request.min_nodes, request.context_length, pin=False
            )
        except Exception as exc:
            abort(context, exc)
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
        cancel = generate.cancel_token(context)
        forwarded = peers.is_forwarded(context)
        model = request.model
        try:
            if request.pull:  # plan from the hub's headers; the nodes download below
                model = self.coordinator.prepare_pull(request.model)
            launch_plan = self._plan(
                model,
                request.min_nodes,
                request.context_length,
                pin=forwarded,
                mtp_across_pipeline=request.mtp_across_pipeline,
            )
        except Exception as exc:
            abort(context, exc)
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
        call = self.router.channels.stub(address).Launch(
            request, timeout=remaining(context), metadata=peers.FORWARDED
        )
        context.add_callback(call.cancel)
        try:
            yield from call
        except grpc.RpcError as exc:
            abort(context, exc)

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
            for info in self.router.remote_instances():
                if wanted(info):
                    by_coordinator.setdefault(info.coordinator_address, []).append(info.instance_id)
            for address, ids in by_coordinator.items():
                try:
                    count += peers.unload_on(
                        self.router.channels, address, ids, timeout_s=remaining(context) or 60.0
                    )
                except grpc.RpcError as exc:
                    abort(context, exc)
        if count == 0:
            what = request.instance_id or request.model
            context.abort(Code.NOT_FOUND, f"no instance of {what!r} is launched on this cluster")
        return pb.UnloadResponse(unloaded=count)


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
    # A stage holder whose coordinator dies may be the one that takes the instance over
    # (MACMESH_REPLACE_FAILED=0: it unloads the orphaned shard instead).
    if servicer.coordinator.replace_failed:
        stages.take_over = servicer.coordinator.take_over
    stages.is_live = lambda node_id: (
        node_id == daemon.node_id or any(n.id == node_id for n in daemon.live_nodes())
    )
    daemon.subscribe(servicer.coordinator.on_peer_event)
    daemon.subscribe(servicer.router.on_peer_event)
    daemon.subscribe(stages.on_peer_event)

    def stop(_daemon: Any) -> None:
        servicer.shutdown()
        # In-flight requests through this node's stages learn which node went, and why.
        stages.shutdown(f"the stage on node {daemon.settings.name} ({daemon.address}) stopped")

    daemon.on_stop(stop)
    return servicer
