"""The StageService gRPC servicer: LoadShard, UnloadShard, Status, Forward.

It hosts the stages of every instance this node takes part in (``macmesh run`` hosts it
through node.cluster.stage_host; ``python -m node.inference.stage`` serves it alone, for
benchmarks and tests). A Forward stream is an upstream stage's (or the coordinator's) chain
stream, or — with the ``x-macmesh-return`` metadata, to a last stage — a coordinator's return
stream, on which the stage sends the tokens of the requests opened with that route.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from node.inference import stage_mtp
from node.inference.codec import DEFAULT_CHUNK_BYTES
from node.inference.integrity import CorruptCheckpoint
from node.inference.link import INSTANCE_METADATA_KEY, RETURN_METADATA_KEY
from node.inference.mtp.recovery import MtpUnavailable
from node.inference.shard import ShardError, load_shard
from node.inference.stage_runtime import StageRuntime
from node.logging import get_logger
from node.placement.resolve import checkpoint_resolver
from node.proto.macmesh.v1 import stage_pb2 as pb
from node.proto.macmesh.v1 import stage_pb2_grpc as pb_grpc

log = get_logger(__name__)

ModelResolver = Callable[[str], Path]
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["StageService"].full_name


def models_dir_resolver(models_dir: Path | None) -> ModelResolver:
    """MODEL as a checkpoint directory: a path, or a name under ``models_dir``."""

    def resolve(model: str) -> Path:
        candidates = [Path(model).expanduser()]
        if models_dir is not None:
            candidates += [models_dir / model, models_dir / model.replace("/", "--")]
        for candidate in candidates:
            if (candidate / "config.json").is_file():
                return candidate
        where = f" or under {models_dir}" if models_dir is not None else ""
        raise ShardError(f"model {model!r} is not a checkpoint directory on this node{where}")

    return resolve


default_model_resolver = checkpoint_resolver(None)  # node.placement.resolve: the one resolver


_END = object()


class StageService(pb_grpc.StageServiceServicer):
    """Hosts the stages of every instance this node takes part in."""

    def __init__(
        self,
        resolve_model: ModelResolver = default_model_resolver,
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.resolve_model = resolve_model
        self.max_chunk_bytes = max_chunk_bytes
        self.runtimes: dict[str, StageRuntime] = {}
        self._lock = threading.Lock()

    def LoadShard(
        self, request: pb.LoadShardRequest, context: grpc.ServicerContext
    ) -> pb.LoadShardResponse:
        if not request.instance_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "instance_id is empty")
        if request.num_stages < 1 or request.position >= request.num_stages:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"position {request.position} is not inside a pipeline of {request.num_stages} stages",
            )
        with self._lock:
            if request.instance_id in self.runtimes:
                context.abort(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"instance {request.instance_id!r} already has a stage on this node; unload it first",
                )
        try:
            path = self.resolve_model(request.model)
            shard = load_shard(
                path, request.start_layer, request.end_layer, keep_embedding=request.mtp_head
            )
            runtime = StageRuntime(
                shard,
                instance_id=request.instance_id,
                model=request.model,
                position=request.position,
                num_stages=request.num_stages,
                next_hop=request.next_hop,
                max_chunk_bytes=self.max_chunk_bytes,
                # Stage 0 is where requests' decode steps meet: a worker drains its queue and
                # batches what waited. Later stages get batches whole, and compute on the
                # reader (the last stage answers on it: see _forward_last).
                inline=request.position > 0 or request.end_layer >= shard.num_layers,
                max_batch=request.max_batch,
                context_tokens=request.context_tokens,
            )
            if request.mtp_head:  # pipeline_mtp: the last stage drafts
                stage_mtp.load_head(runtime, path)
        except MtpUnavailable as exc:  # the checkpoint has no head to recover
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except CorruptCheckpoint as exc:  # the request is fine; this node's files are not
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except (ShardError, FileNotFoundError, ValueError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with self._lock:
            self.runtimes[request.instance_id] = runtime
        return pb.LoadShardResponse(shard=runtime.info())

    def shutdown(self, reason: str = "") -> None:
        """Unload every stage (the daemon is stopping; ``reason`` says so to callers)."""
        with self._lock:
            runtimes, self.runtimes = list(self.runtimes.values()), {}
        for runtime in runtimes:
            runtime.shutdown(reason)

    def UnloadShard(
        self, request: pb.UnloadShardRequest, context: grpc.ServicerContext
    ) -> pb.UnloadShardResponse:
        with self._lock:
            runtime = self.runtimes.pop(request.instance_id, None)
        if runtime is not None:
            runtime.shutdown()
            log.info("shard unloaded", instance=request.instance_id)
        return pb.UnloadShardResponse(unloaded=runtime is not None)

    def Status(
        self, request: pb.StageStatusRequest, context: grpc.ServicerContext
    ) -> pb.StageStatusResponse:
        with self._lock:
            runtimes = list(self.runtimes.values())
        return pb.StageStatusResponse(
            stages=[
                r.status()
                for r in runtimes
                if not request.instance_id or r.instance_id == request.instance_id
            ]
        )

    def Forward(
        self, request_iterator: Iterator[pb.ForwardRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ForwardResponse]:
        instance_id = dict(context.invocation_metadata()).get(INSTANCE_METADATA_KEY, "")
        runtime = self.runtimes.get(instance_id)
        if runtime is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"instance {instance_id!r} has no stage on this node (metadata {INSTANCE_METADATA_KEY})",
            )
        route = dict(context.invocation_metadata()).get(RETURN_METADATA_KEY, "")
        if route:
            if not runtime.shard.has_head:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"stage {runtime.position} of {instance_id!r} is not the last stage; only "
                    f"the last stage takes a return stream ({RETURN_METADATA_KEY})",
                )
            yield from self._serve_return(runtime, route, request_iterator, context)
            return
        if runtime.shard.has_head:
            yield from self._forward_last(runtime, request_iterator)
            return
        outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        session = runtime.new_session(outbox.put)

        def read() -> None:
            try:
                for frame in request_iterator:
                    session.handle(frame)
            except Exception as exc:  # the upstream went away; clean up below
                log.info("upstream stream ended", instance=instance_id, reason=str(exc))
            session.end(on_finished=lambda: outbox.put(_END))

        threading.Thread(target=read, name=f"stage-{runtime.position}-reader", daemon=True).start()
        while (response := outbox.get()) is not _END:
            yield response

    @staticmethod
    def _serve_return(
        runtime: StageRuntime,
        route: str,
        request_iterator: Iterator[pb.ForwardRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[pb.ForwardResponse]:
        """A coordinator's return stream: nothing comes in on it; the tokens, acks and errors
        of the requests opened with ``route`` go out on it, until the coordinator ends it."""
        outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        runtime.add_route(route, outbox.put)
        context.send_initial_metadata(())  # the route is in place: the coordinator may use it

        def watch() -> None:
            try:
                for _ in request_iterator:
                    pass  # the coordinator sends nothing on a return stream
            except Exception as exc:
                log.info("return stream ended", instance=runtime.instance_id, reason=str(exc))
            runtime.drop_route(route, outbox.put)
            outbox.put(_END)

        threading.Thread(target=watch, name=f"stage-{runtime.position}-return", daemon=True).start()
        while (response := outbox.get()) is not _END:
            yield response

    @staticmethod
    def _forward_last(
        runtime: StageRuntime, request_iterator: Iterator[pb.ForwardRequest]
    ) -> Iterator[pb.ForwardResponse]:
        """The last stage answers every frame while handling it (tokens, acks, errors, probe
        echoes; nothing arrives from downstream), so one thread reads, computes and replies:
        no handoff between a reader and the responding thread on the hot path."""
        replies: deque[pb.ForwardResponse] = deque()
        session = runtime.new_session(replies.append)
        try:
            for frame in request_iterator:
                session.handle(frame)
                while replies:
                    yield replies.popleft()
        except grpc.RpcError as exc:  # the upstream went away
            log.info("upstream stream ended", instance=runtime.instance_id, reason=str(exc))
        finally:
            session.end()


def add_stage_service(
    server: grpc.Server, resolve_model: ModelResolver = default_model_resolver
) -> StageService:
    """Register a StageService on ``server`` (before it starts) and return it."""
    service = StageService(resolve_model)
    pb_grpc.add_StageServiceServicer_to_server(service, server)
    return service
