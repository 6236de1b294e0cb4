"""Small helpers for tests that drive real daemons through their InferenceService."""

from __future__ import annotations

import grpc

from node import rpc
from node.client import Launched, MacmeshClient
from node.proto.macmesh.v1 import inference_pb2 as pb
from node.proto.macmesh.v1 import inference_pb2_grpc as pb_grpc


def launch(address: str, model: str, min_nodes: int = 1, timeout: float = 120) -> tuple:
    """Launch through the typed client; returns (progress lines, the instance)."""
    lines: list[str] = []
    with MacmeshClient(address, timeout=timeout) as client:
        for event in client.launch(model, min_nodes=min_nodes):
            if isinstance(event, Launched):
                return lines, event.instance
            lines.append(event.message)
    raise AssertionError(f"launch of {model} on {address} ended without an instance: {lines}")


def generate(address: str, model: str, prompt: str = "The os module", **options) -> tuple:
    """(text, token ids, final stats) of one request through the typed client."""
    text, ids, final = [], [], None
    options.setdefault("raw", True)
    options.setdefault("max_tokens", 12)
    with MacmeshClient(address, timeout=120) as client:
        for event in client.generate(model, prompt, **options):
            if event.kind == "delta":
                text.append(event.text)
                ids.extend(event.token_ids)
            else:
                final = event
    assert final is not None, "no final stats"
    return "".join(text), ids, final


def raw_generate(address: str, request: pb.GenerateRequest, timeout: float = 60) -> list:
    """Every response of a Generate call made with the bare stub (no client-side checks);
    raises ``grpc.RpcError`` with the server's status."""
    with rpc.channel(address) as channel:
        return list(pb_grpc.InferenceServiceStub(channel).Generate(request, timeout=timeout))


def status_code(call) -> tuple[grpc.StatusCode, str]:
    """Run ``call()``; return the gRPC status it failed with (fails if it succeeded)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    raise AssertionError("the call succeeded")


def stub(address: str) -> tuple[grpc.Channel, pb_grpc.InferenceServiceStub]:
    channel = rpc.channel(address)
    return channel, pb_grpc.InferenceServiceStub(channel)
