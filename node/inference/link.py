"""The client end of a Forward stream, shared by stages and the coordinator.

(A stage's own ordering of MLX work lives in ``stage_runtime``: its job queue drains what waited
into batched forwards, ``stage_batch.plan_drain``.)

``ForwardLink`` is the client end of one long-lived ``StageService.Forward`` stream: frames
queued with ``send`` go out in order; every response is handed to ``on_response`` on the
link's receiver thread; ``on_closed`` runs once when the stream ends (None on a clean end, the
``grpc.RpcError`` otherwise). With ``return_route`` it is a coordinator's return stream to a
last stage: it sends nothing and receives the tokens of the requests opened with that route.

``MACMESH_TEST_HOP_DELAY_MS`` (benchmarks only: a simulated slower link) holds every frame a
link sends, and every response it receives, that many milliseconds after it was queued or
arrived — a delay line, so frames in flight overlap and one hop costs the delay once.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from node import rpc
from node.logging import get_logger
from node.proto.macmesh.v1 import stage_pb2 as pb
from node.proto.macmesh.v1 import stage_pb2_grpc as pb_grpc

log = get_logger(__name__)

INSTANCE_METADATA_KEY = "x-macmesh-instance"
# On a stream to a last stage: this is the coordinator's return stream for the given route.
RETURN_METADATA_KEY = "x-macmesh-return"
HOP_DELAY_ENV = "MACMESH_TEST_HOP_DELAY_MS"
_CLOSE = object()


def _hop_delay_s() -> float:
    value = os.environ.get(HOP_DELAY_ENV, "")
    return float(value) / 1000.0 if value else 0.0


def _hold_until(moment: float) -> None:
    wait = moment - time.monotonic()
    if wait > 0:
        time.sleep(wait)


def stage_channel(address: str) -> grpc.Channel:
    """A channel for stage traffic (Forward streams and shard management) to ``address``.

    A Forward stream carries no data while the next stage works through a long prefill; its
    keepalive pings are accepted because every macmesh server takes node.rpc.CHANNEL_OPTIONS
    (min_recv_ping_interval_without_data_ms), not gRPC's one-ping-per-5-min default."""
    return rpc.channel(address)  # with the process's TLS and secret


class ForwardLink:
    """The client end of one Forward stream to ``address`` for ``instance_id``."""

    def __init__(
        self,
        channel: grpc.Channel,
        instance_id: str,
        on_response: Callable[[pb.ForwardResponse], None],
        on_closed: Callable[[grpc.RpcError | None], None],
        *,
        name: str = "forward-link",
        return_route: str = "",
    ) -> None:
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._delay = _hop_delay_s()
        self._on_response = on_response
        self._on_closed = on_closed
        metadata = [(INSTANCE_METADATA_KEY, instance_id)]
        if return_route:
            metadata.append((RETURN_METADATA_KEY, return_route))
        self._call = pb_grpc.StageServiceStub(channel).Forward(
            self._requests(), metadata=tuple(metadata)
        )
        self._receiver = threading.Thread(target=self._receive, name=name, daemon=True)
        self._receiver.start()

    def wait_accepted(self, timeout: float) -> None:
        """Block until the stage accepted the stream (its response headers arrived); raises
        ``grpc.RpcError`` when it refused it, ``TimeoutError`` when it did not answer."""
        done = threading.Event()
        threading.Thread(
            target=lambda: (self._call.initial_metadata(), done.set()), daemon=True
        ).start()
        if not done.wait(timeout):
            raise TimeoutError(f"the stage did not accept the stream within {timeout} s")
        if self._call.done() and self._call.code() is not grpc.StatusCode.OK:
            raise self._call  # a grpc.RpcError with the stage's status

    def send(self, frame: pb.ForwardRequest) -> None:
        self._outbox.put((time.monotonic() + self._delay, frame) if self._delay else frame)

    def send_all(self, frames: Iterable[pb.ForwardRequest]) -> None:
        for frame in frames:
            self.send(frame)

    def close(self) -> None:
        """Half-close: no more frames; responses keep arriving until the peer ends the stream."""
        self._outbox.put(_CLOSE)

    def cancel(self) -> None:
        self._outbox.put(_CLOSE)
        self._call.cancel()

    def _requests(self) -> Iterator[pb.ForwardRequest]:
        while (frame := self._outbox.get()) is not _CLOSE:
            if isinstance(frame, tuple):  # held by the simulated hop delay
                _hold_until(frame[0])
                frame = frame[1]
            yield frame

    def _receive(self) -> None:
        error: grpc.RpcError | None = None
        try:
            for response in self._call:
                if self._delay:
                    _hold_until(time.monotonic() + self._delay)
                self._on_response(response)
        except grpc.RpcError as exc:
            error = exc
        except Exception:
            log.exception("forward link receiver failed")
            self._call.cancel()
        self._outbox.put(_CLOSE)  # let gRPC's request-consuming thread finish too
        self._on_closed(error)
