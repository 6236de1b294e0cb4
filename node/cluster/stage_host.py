"""The StageService a daemon hosts: created on first use, and the orphan cleanup.

Importing the stage runtime imports mlx-lm (seconds), and a daemon that never hosts a stage
should start in well under one, so ``LazyStageService`` answers status probes and unloads
without it until a shard is loaded. It also remembers which coordinator loaded each shard,
and the instance's record the coordinator sent with it. When that coordinator is gone (down,
left, restarted), the record goes to ``take_over`` (node.cluster.failover: the live stage
holder with the lowest node id becomes the coordinator), and the shard stays loaded for the
new coordinator, whose LoadShard for the same range adopts it. A shard nobody adopts within
``ADOPT_WAIT_S`` (or without a record) is unloaded here, so no weights stay orphaned.

A shard answers to one coordinator at a time: while the node that loaded (or adopted) it is
up, another node's LoadShard or UnloadShard for that instance is refused. So a coordinator
that was only cut off for a while (seen down, taken over) cannot, once back, unload or take
back the stages its successor now drives.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc

from node.cluster.admission import DEFAULT_HEADROOM, admit_load
from node.logging import get_logger
from node.placement import InsufficientMemoryError
from node.proto.macmesh.v1 import stage_pb2, stage_pb2_grpc
from node.security import calling_node

log = get_logger(__name__)

GONE = ("down", "left", "restarted", "forgotten")
ADOPT_WAIT_S = 60.0  # an orphaned shard waits this long for the new coordinator to adopt it

Code = grpc.StatusCode
SERVICE_NAME = stage_pb2.DESCRIPTOR.services_by_name["StageService"].full_name


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
        self._records: dict[str, Any] = {}  # instance id -> inference_pb2.Instance it sent
        self._orphaned: set[str] = set()  # its coordinator is gone; nobody adopted it yet
        # The record of an orphaned instance -> the coordinator decides whether it succeeds.
        self.take_over: Callable[[Any], None] | None = None
        self.is_live: Callable[[str], bool] = lambda node_id: True  # membership: node up?

    def _real(self) -> Any:
        with self._lock:
            if self._service is None:
                from node.inference.stage_service import StageService

                self._service = StageService(self._resolve_model)
            return self._service

    def LoadShard(self, request: Any, context: grpc.ServicerContext) -> Any:
        owner = self._owned_by_another(request.instance_id, context)
        if owner:
            context.abort(
                Code.ALREADY_EXISTS,
                f"instance {request.instance_id!r} has a stage on this node that answers to "
                f"coordinator {owner[:8]}, which is up",
            )
        adopted = self._adopt(request, context)
        if adopted is not None:
            return adopted
        try:  # the coordinator planned from a heartbeat; check what is free right now
            admit_load(0, self.memory_headroom, "this stage node")
        except InsufficientMemoryError as exc:
            context.abort(Code.RESOURCE_EXHAUSTED, str(exc))
        reply = self._real().LoadShard(request, context)
        self._remember(request, context)
        return reply

    def _owned_by_another(self, instance_id: str, context: grpc.ServicerContext | None) -> str:
        """The live coordinator, other than the calling node, this instance's shard answers to
        ("" when the caller may manage it: its owner, a client, or the owner is gone)."""
        caller = calling_node(context) if context is not None else ""
        with self._lock:
            owner = self._coordinators.get(instance_id, "")
            orphaned = instance_id in self._orphaned  # its owner went (or restarted)
        if not caller or not owner or owner == caller or orphaned or not self.is_live(owner):
            return ""
        return owner

    def _remember(self, request: Any, context: grpc.ServicerContext) -> None:
        coordinator = calling_node(context)
        with self._lock:
            if coordinator:
                self._coordinators[request.instance_id] = coordinator
            if request.HasField("instance"):
                self._records[request.instance_id] = request.instance
            self._orphaned.discard(request.instance_id)

    def _adopt(self, request: Any, context: grpc.ServicerContext) -> Any:
        """A new coordinator's LoadShard for a range this node holds for the instance: keep
        the weights, follow its next hop, answer to it from now on."""
        with self._lock:
            service = self._service
        runtime = service.runtimes.get(request.instance_id) if service is not None else None
        if runtime is None or runtime.closed:
            return None
        held = (runtime.shard.start_layer, runtime.shard.end_layer, runtime.position)
        wanted = (request.start_layer, request.end_layer, request.position)
        if held != wanted or runtime.num_stages != request.num_stages:
            return None  # another range: the service refuses it (ALREADY_EXISTS)
        runtime.retarget(request.next_hop)
        self._remember(request, context)
        log.info(
            "stage handed over to a new coordinator",
            instance=request.instance_id,
            coordinator=calling_node(context),
            layers=f"[{request.start_layer},{request.end_layer})",
        )
        return stage_pb2.LoadShardResponse(shard=runtime.info())

    def on_peer_event(self, event: Any) -> None:
        """A coordinator that is gone (down, left, restarted) never unloads its shards. With
        the instance's record, a stage holder takes over (``take_over`` decides which one);
        the shard waits for it. Shards nobody adopts are unloaded here, so no weights stay
        orphaned on this node. Any node going may make this one the successor of an orphan
        still waiting (the successor it waited for died too)."""
        if str(event.kind) not in GONE:
            return
        with self._lock:
            fresh = [
                i
                for i, node in self._coordinators.items()
                if node == event.node_id and i not in self._orphaned
            ]
            self._orphaned.update(fresh)
            waiting = [(i, self._records.get(i)) for i in self._orphaned]
        take_over = self.take_over
        unload_now = [i for i, record in waiting if record is None or take_over is None]
        if unload_now:
            threading.Thread(
                target=self._unload_orphans, args=(unload_now, str(event.kind)), daemon=True
            ).start()
        for instance_id, record in waiting:
            if record is not None and take_over is not None:
                try:
                    take_over(record)
                except Exception:  # one bad record must not keep the others waiting
                    log.exception("take-over failed", instance=instance_id)
        for instance_id in fresh:
            if instance_id not in unload_now:
                timer = threading.Timer(
                    ADOPT_WAIT_S, self._unload_if_orphaned, (instance_id, event.node_id)
                )
                timer.daemon = True
                timer.start()

    def _unload_if_orphaned(self, instance_id: str, coordinator: str) -> None:
        with self._lock:
            still = (
                instance_id in self._orphaned and self._coordinators.get(instance_id) == coordinator
            )
        if still:
            self._unload_orphans([instance_id], f"not adopted within {ADOPT_WAIT_S:g} s")

    def _unload_orphans(self, instance_ids: list[str], why: str) -> None:
        for instance_id in instance_ids:
            log.warning("unloading shard of a gone coordinator", instance=instance_id, why=why)
            self.UnloadShard(stage_pb2.UnloadShardRequest(instance_id=instance_id), None)
        import mlx.core as mx

        mx.clear_cache()

    # Until a shard is loaded there is nothing to unload, report or forward to: answer
    # without importing the runtime (a status probe must not take seconds).

    def UnloadShard(self, request: Any, context: grpc.ServicerContext | None) -> Any:
        owner = self._owned_by_another(request.instance_id, context)
        if owner:
            log.warning(
                "unload refused: the shard answers to another coordinator now",
                instance=request.instance_id,
                caller=calling_node(context),
                coordinator=owner,
            )
            return stage_pb2.UnloadShardResponse(unloaded=False)
        with self._lock:
            self._coordinators.pop(request.instance_id, None)
            self._records.pop(request.instance_id, None)
            self._orphaned.discard(request.instance_id)
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
