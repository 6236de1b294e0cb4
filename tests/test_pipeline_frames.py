"""Malformed Forward frames get INVALID_ARGUMENT and the stage keeps serving; large frames pass.

Frames are sent by hand on a real Forward stream to the middle stage of a 3-stage pipeline
whose stages are separate processes.
"""

from __future__ import annotations

from pathlib import Path
from queue import Empty, SimpleQueue

import grpc
import mlx.core as mx
import pytest
from helpers.daemons import wait_for
from helpers.stage_nodes import StageNodes

from node import rpc
from node.checkpoints import PRESETS, ensure_checkpoint
from node.inference.codec import decode_tensor, encode_tensor
from node.inference.link import INSTANCE_METADATA_KEY, ForwardLink
from node.inference.pipeline import PipelineEngine, SimplePlacement
from node.inference.requests import GenerateRequest
from node.inference.shard import load_shard
from node.proto.macmesh.v1 import stage_pb2 as pb
from node.proto.macmesh.v1 import stage_pb2_grpc as pb_grpc

PRESET = "dense-high"  # 6 layers, hidden 64, float32
PROMPT = [3, 14, 15, 92, 65, 35]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    path = ensure_checkpoint(PRESETS[PRESET])
    with StageNodes(tmp_path_factory.mktemp("frame-nodes"), count=2) as nodes:
        placement = SimplePlacement.even(6, ["coordinator", nodes[0].name, nodes[1].name])
        engine = PipelineEngine(path, placement, nodes.addresses, local_node_id="coordinator")
        engine.load()
        try:
            yield engine, nodes
        finally:
            engine.close()


class Stream:
    """A hand-driven Forward stream to one stage."""

    def __init__(self, address: str, instance_id: str, max_send_bytes: int | None = None) -> None:
        if max_send_bytes is None:
            self.channel = rpc.channel(address)
        else:  # a client willing to send more than macmesh servers accept
            options = [*rpc.CHANNEL_OPTIONS, ("grpc.max_send_message_length", max_send_bytes)]
            self.channel = rpc.channel(address, options)
        self.replies: SimpleQueue = SimpleQueue()
        self.link = ForwardLink(
            self.channel, instance_id, self.replies.put, lambda e: self.replies.put(("closed", e))
        )

    def send(self, request_id: str, **kind) -> None:
        self.link.send(pb.ForwardRequest(request_id=request_id, **kind))

    def reply(self, timeout: float = 20) -> pb.ForwardResponse:
        reply = self.replies.get(timeout=timeout)
        assert isinstance(reply, pb.ForwardResponse), f"stream closed: {reply}"
        return reply

    def quiet(self, seconds: float = 0.3) -> bool:
        try:
            self.replies.get(timeout=seconds)
        except Empty:
            return True
        return False

    def close(self) -> None:
        self.link.cancel()
        self.channel.close()


def hidden(rows: int, width: int = 64, dtype: mx.Dtype = mx.float32) -> pb.TensorChunk:
    return encode_tensor(mx.zeros((1, rows, width), dtype=dtype))[0]


def expect_invalid(stream: Stream, request_id: str, *fragments: str) -> None:
    reply = stream.reply()
    assert reply.request_id == request_id and reply.WhichOneof("kind") == "error", reply
    assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert reply.error.position == 1
    for fragment in fragments:
        assert fragment in reply.error.message, reply.error.message


def test_malformed_frames_are_invalid_argument_and_the_stage_keeps_serving(cluster) -> None:
    engine, nodes = cluster
    stage1 = nodes[0].address
    stream = Stream(stage1, engine.instance_id)
    try:
        act = pb.Activation
        stream.send("ghost", activation=act(start_position=0, token_ids=[1], hidden=hidden(1)))
        expect_invalid(stream, "ghost", "unknown request id 'ghost'")

        stream.send("narrow", open=pb.OpenRequest())
        stream.send(
            "narrow", activation=act(start_position=0, token_ids=[1, 2], hidden=hidden(2, width=32))
        )
        expect_invalid(stream, "narrow", "shape [1, 2, 32]", "width 64")

        stream.send("fp16", open=pb.OpenRequest())
        stream.send(
            "fp16",
            activation=act(start_position=0, token_ids=[1], hidden=hidden(1, dtype=mx.float16)),
        )
        expect_invalid(stream, "fp16", "TENSOR_DTYPE_FLOAT16", "TENSOR_DTYPE_FLOAT32")

        context = PRESETS[PRESET].max_position_embeddings
        stream.send("huge", open=pb.OpenRequest())
        oversized = pb.TensorChunk(
            dtype=pb.TENSOR_DTYPE_FLOAT32, shape=[1, context + 1, 64], data=b"\0" * 256
        )
        stream.send(
            "huge",
            activation=act(start_position=0, token_ids=[1] * (context + 1), hidden=oversized),
        )
        expect_invalid(stream, "huge", f"beyond the model's context of {context}")

        stream.send("gap", open=pb.OpenRequest())
        stream.send("gap", activation=act(start_position=5, token_ids=[1], hidden=hidden(1)))
        expect_invalid(stream, "gap", "starts at position 5", "has 0 positions cached")

        stream.send("dup", open=pb.OpenRequest())
        stream.send("dup", open=pb.OpenRequest())
        expect_invalid(stream, "dup", "already open")

        stream.send("", release=pb.ReleaseRequest())
        expect_invalid(stream, "", "empty request_id")

        # A failed request stays quiet until released; its release frees it everywhere.
        stream.send("narrow", activation=act(start_position=2, token_ids=[1], hidden=hidden(1)))
        assert stream.quiet()
        for rid in ("narrow", "fp16", "huge", "gap", "dup"):
            stream.send(rid, release=pb.ReleaseRequest())
            reply = stream.reply()
            assert (reply.request_id, reply.WhichOneof("kind"), reply.released.stages) == (
                rid,
                "released",
                2,
            )

        # The same stream still serves a well-formed request: real hidden states from layers [0, 2).
        first = load_shard(ensure_checkpoint(PRESETS[PRESET]), 0, 2)
        h = first.forward(mx.array([PROMPT]), first.make_cache())
        stream.send("good", open=pb.OpenRequest())
        stream.send(
            "good",
            activation=act(
                start_position=0, token_ids=PROMPT, hidden=encode_tensor(h)[0], sample=True
            ),
        )
        reply = stream.reply()
        assert reply.WhichOneof("kind") == "token", reply
        assert reply.token.position == len(PROMPT)
        expected = list(
            engine.generate(GenerateRequest(prompt_ids=PROMPT, max_tokens=1, ignore_eos=True))
        )[-1]
        assert expected.token_ids == [reply.token.token_id]
        stream.send("good", release=pb.ReleaseRequest())
        assert stream.reply().WhichOneof("kind") == "released"

        status = engine.status()[1]
        assert status.frames_rejected >= 7
        wait_for(lambda: engine.cached_requests() == [0, 0, 0], 10, what="caches freed")
    finally:
        stream.close()


def test_prompt_cache_frames_keep_resume_and_forget_a_stages_snapshot(cluster) -> None:
    """The coordinator names snapshots; a stage keeps its layers' payload, resumes a request
    from it exactly (the token equals the one computed from scratch), forgets it when told,
    and refuses a resume it cannot serve with the request's own error."""
    engine, nodes = cluster
    stream = Stream(nodes[0].address, engine.instance_id)
    act = pb.Activation
    try:
        stream.send("nameless", open=pb.OpenRequest(resume_length=5))
        expect_invalid(stream, "nameless", "resumes 5 positions but names no snapshot")
        stream.send("ghost", snapshot=pb.SnapshotRequest(id=3))
        expect_invalid(stream, "ghost", "unknown request id 'ghost'")

        first = load_shard(ensure_checkpoint(PRESETS[PRESET]), 0, 2)
        cache = first.make_cache()
        head = first.forward(mx.array([PROMPT[:-1]]), cache)
        last = first.forward(mx.array([PROMPT[-1:]]), cache)
        stream.send("take", open=pb.OpenRequest())
        stream.send(
            "take",
            activation=act(start_position=0, token_ids=PROMPT[:-1], hidden=encode_tensor(head)[0]),
        )
        stream.send("take", snapshot=pb.SnapshotRequest(id=7))
        stream.send("take", release=pb.ReleaseRequest())
        assert stream.reply().WhichOneof("kind") == "released"

        stream.send("resume", open=pb.OpenRequest(resume_snapshot=7, resume_length=5))
        position = len(PROMPT) - 1
        tail = act(
            start_position=position,
            token_ids=PROMPT[-1:],
            hidden=encode_tensor(last)[0],
            sample=True,
        )
        stream.send("resume", activation=tail)
        reply = stream.reply()
        assert reply.WhichOneof("kind") == "token", reply
        expected = list(
            engine.generate(GenerateRequest(prompt_ids=PROMPT, max_tokens=1, ignore_eos=True))
        )[-1]
        assert (reply.token.position, [reply.token.token_id]) == (len(PROMPT), expected.token_ids)
        stream.send("resume", release=pb.ReleaseRequest())
        assert stream.reply().WhichOneof("kind") == "released"

        stream.send("", forget=pb.ForgetSnapshots(ids=[7]))
        assert stream.quiet()
        stream.send("gone", open=pb.OpenRequest(resume_snapshot=7, resume_length=5))
        reply = stream.reply()
        assert reply.WhichOneof("kind") == "error" and reply.request_id == "gone"
        assert reply.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "holds no prompt-cache snapshot 7 of 5 positions" in reply.error.message
        stream.send("gone", release=pb.ReleaseRequest())
        wait_for(lambda: engine.cached_requests() == [0, 0, 0], 10, what="caches freed")
    finally:
        stream.close()


def test_a_message_beyond_the_grpc_limit_fails_that_stream_only(cluster) -> None:
    engine, nodes = cluster
    stream = Stream(nodes[0].address, engine.instance_id, max_send_bytes=2 * rpc.MAX_MESSAGE_BYTES)
    try:
        blob = pb.TensorChunk(
            dtype=pb.TENSOR_DTYPE_FLOAT32,
            shape=[1, 1 << 20, 17],
            data=b"\0" * (rpc.MAX_MESSAGE_BYTES + 1024),
        )
        stream.send("x", probe=pb.Probe(tensor=blob))
        closed = stream.replies.get(timeout=30)
        assert isinstance(closed, tuple) and closed[0] == "closed"
        assert closed[1].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        stream.close()
    done = list(engine.generate(GenerateRequest(prompt_ids=PROMPT, max_tokens=4, ignore_eos=True)))[
        -1
    ]
    assert len(done.token_ids) == 4


def test_an_8k_token_prefill_of_a_5120_wide_model_crosses_a_stage(cluster) -> None:
    """80 MiB of bf16 hidden states travel chunked and come back bit-exact."""
    engine, nodes = cluster
    x = ((mx.arange(8192 * 5120) % 65521) - 30000).astype(mx.bfloat16).reshape(1, 8192, 5120)
    stream = Stream(nodes[0].address, engine.instance_id)
    try:
        chunks = encode_tensor(x)
        assert len(chunks) > 1 and max(c.ByteSize() for c in chunks) < rpc.MAX_MESSAGE_BYTES
        for chunk in chunks:
            stream.send("wide", probe=pb.Probe(tensor=chunk))
        echoed = []
        while sum(len(c.data) for c in echoed) < x.nbytes:
            reply = stream.reply(timeout=60)
            assert reply.WhichOneof("kind") == "probe", reply
            echoed.append(reply.probe.tensor)
        assert mx.array_equal(decode_tensor(echoed), x).item()
    finally:
        stream.close()


def test_shard_management_errors_are_clear(cluster) -> None:
    engine, nodes = cluster
    path = str(ensure_checkpoint(PRESETS[PRESET]))
    with rpc.channel(nodes[1].address) as channel:
        stub = pb_grpc.StageServiceStub(channel)

        def load(**fields) -> grpc.RpcError:
            request = dict(
                instance_id="other",
                model=path,
                start_layer=0,
                end_layer=6,
                position=0,
                num_stages=1,
            )
            request.update(fields)
            with pytest.raises(grpc.RpcError) as failure:
                stub.LoadShard(pb.LoadShardRequest(**request), timeout=60)
            return failure.value

        error = load(start_layer=4, end_layer=9)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "[4, 9)" in error.details()
        error = load(model=str(Path(path) / "missing"))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "missing" in error.details()
        error = load(instance_id=engine.instance_id)
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        error = load(start_layer=0, end_layer=3, next_hop="")
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "no next hop" in error.details()
        assert not stub.UnloadShard(pb.UnloadShardRequest(instance_id="other"), timeout=10).unloaded

        call = stub.Forward(
            iter([pb.ForwardRequest(request_id="r", open=pb.OpenRequest())]),
            metadata=((INSTANCE_METADATA_KEY, "nope"),),
        )
        with pytest.raises(grpc.RpcError) as failure:
            list(call)
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
