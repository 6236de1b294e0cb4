"""Probe round trips: transport + codec cost of one hop, measured through a real stage.

A benchmark helper (scripts/bench_pipeline.py), kept out of the engine: it sends a tensor to
a stage as a ``Probe`` frame and times the echo.
"""

from __future__ import annotations

import time
from queue import SimpleQueue
from typing import Any

import grpc
import mlx.core as mx

from node.inference.codec import DEFAULT_CHUNK_BYTES, TensorAssembler, encode_tensor
from node.inference.link import ForwardLink, stage_channel
from node.inference.pipeline import PipelineError, status_for_code
from node.proto.macmesh.v1 import stage_pb2 as pb


def probe_round_trips(
    address: str,
    instance_id: str,
    array: mx.array,
    repeats: int,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> list[float]:
    """Send ``array`` to a stage ``repeats`` times as a Probe and time each echo (seconds).

    A round trip runs from encoding here, through the hop, the stage decoding it into an MLX
    array and re-encoding it, the hop back, to the echo decoded into an MLX array on this
    side's receiving thread (where a coordinator handles tokens): two hops of stage traffic.
    """
    channel = stage_channel(address)
    done: SimpleQueue[Any] = SimpleQueue()
    state: dict[str, Any] = {}

    def on_response(reply: pb.ForwardResponse) -> None:
        if reply.WhichOneof("kind") != "probe":
            done.put(reply)
            return
        tensor = state["assembler"].add(reply.probe.tensor)
        if tensor is not None:
            mx.eval(tensor.to_mx())
            done.put(time.perf_counter() - state["began"])

    link = ForwardLink(channel, instance_id, on_response=on_response, on_closed=done.put)
    timings = []
    try:
        for i in range(repeats):
            state["assembler"] = TensorAssembler()
            state["began"] = time.perf_counter()
            link.send_all(
                pb.ForwardRequest(request_id=f"probe-{i}", probe=pb.Probe(tensor=c))
                for c in encode_tensor(array, max_chunk_bytes)
            )
            result = done.get(timeout=120)
            if isinstance(result, float):
                timings.append(result)
            elif isinstance(result, pb.ForwardResponse):
                status = status_for_code(result.error.code)
                raise PipelineError(status, f"probe failed: {result.error.message}")
            else:
                raise PipelineError(grpc.StatusCode.UNAVAILABLE, f"probe stream closed: {result}")
    finally:
        link.cancel()
        channel.close()
    return timings
