"""HubService: a node downloads the files of its part of a model when its coordinator asks
(``launch --pull``), streaming its progress back."""

from __future__ import annotations

import threading
from queue import SimpleQueue
from typing import Any

import grpc

from node.hub.download import PullProgress
from node.hub.remote import HubError, RepoNotFound, RevisionNotFound
from node.logging import get_logger
from node.proto.macmesh.v1 import hub_pb2 as pb
from node.proto.macmesh.v1 import hub_pb2_grpc as pb_grpc

log = get_logger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["HubService"].full_name


def progress_proto(p: PullProgress) -> pb.PullProgress:
    return pb.PullProgress(
        done_bytes=p.done_bytes,
        total_bytes=p.total_bytes,
        rate_bytes_per_s=p.rate_bps,
        eta_s=-1.0 if p.eta_s is None else p.eta_s,
        finished=p.finished,
        line=p.line(),
    )


class HubServicer(pb_grpc.HubServiceServicer):
    def __init__(self, node_name: str) -> None:
        self.node_name = node_name

    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext):
        from node.hub.pull import pull_model

        if not request.repo:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "PullRequest.repo is empty")
        model = f"{request.repo}@{request.revision}" if request.revision else request.repo
        layers = None if request.whole else (request.start_layer, request.end_layer)
        events: SimpleQueue[tuple[str, Any]] = SimpleQueue()

        def report(p: PullProgress) -> None:
            if not context.is_active():  # the coordinator went away: stop (resumable)
                raise HubError(f"the pull of {model} was cancelled by its caller")
            events.put(("progress", p))

        def work() -> None:
            try:
                result = pull_model(
                    model,
                    layers=layers,
                    mtp_head=request.mtp_head,
                    mtp_from=request.mtp_from or None,
                    progress=report,
                    node=self.node_name,
                )
                events.put(("done", result))
            except Exception as exc:  # reported to the caller, never fatal to the daemon
                events.put(("error", exc))

        threading.Thread(target=work, name="hub-pull", daemon=True).start()
        while True:
            kind, payload = events.get()
            if kind == "progress":
                yield progress_proto(payload)
            elif kind == "done":
                yield pb.PullProgress(  # the last word: where it went (no line to show)
                    finished=True,
                    snapshot=str(payload.snapshot),
                    fetched_bytes=payload.fetched_bytes,
                    mtp_probe=payload.probe.model_dump_json() if payload.probe else "",
                )
                return
            else:
                code = grpc.StatusCode.INTERNAL
                if isinstance(payload, RepoNotFound | RevisionNotFound):
                    code = grpc.StatusCode.NOT_FOUND
                elif isinstance(payload, HubError):
                    code = grpc.StatusCode.FAILED_PRECONDITION
                log.warning("pull failed", model=model, error=str(payload))
                context.abort(code, f"on {self.node_name}: {payload}")


def install(daemon: Any) -> HubServicer:
    servicer = HubServicer(getattr(daemon.settings, "name", None) or "this node")
    daemon.add_servicer(pb_grpc.add_HubServiceServicer_to_server, servicer, SERVICE_NAME)
    return servicer
