"""The StageService a daemon hosts: created on first use, and the orphan cleanup.

Importing the stage runtime imports mlx-lm (seconds), and a daemon that never hosts a stage
should start in well under one, so ``LazyStageService`` answers status probes and unloads
without it until a shard is loaded. It also remembers which coordinator loaded each shard:
a coordinator that is gone (down, left, restarted) never unloads its shards, so this node
unloads them itself and no weights stay orphaned.
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

    def _real(self) -> Any:
        with self._lock:
            if self._service is None:
                from node.inference.stage_service import StageService

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
