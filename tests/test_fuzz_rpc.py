"""Fuzz every public RPC of a real daemon with hypothesis-built protobuf messages.

Messages are drawn from the proto descriptors themselves: every field may be set, strings may be
empty, huge or odd unicode, numbers sit on their boundaries, doubles may be NaN or infinite,
enums take values the proto does not define, repeated fields get long. A bad request must get a
definite answer — never UNKNOWN or INTERNAL (a handler crashed) — and the daemon must still
serve a good request afterwards.

Addresses inside messages (gossip, next hops) are only ever loopback: a fuzzed message must not
make the daemon dial anything else.
"""

from __future__ import annotations

import math

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from helpers.cluster_client import generate, launch
from helpers.daemons import DaemonCluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import rpc
from node.proto.macmesh.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
    stage_pb2,
    stage_pb2_grpc,
)

MODEL = "macmesh-tiny"
BAD_STATUS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
EXAMPLES = 100  # per RPC group
# Generate's valid examples run real prefills (repeated fields make prompts of thousands of
# tokens): fewer of them keep the file near 40 s idle on 2 cores.
GENERATE_EXAMPLES = 50
CALL_TIMEOUT_S = 8.0

F = FieldDescriptor
_INT_BOUNDS = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}
LOOPBACK = st.sampled_from(["127.0.0.1:1", "127.0.0.1:65535", "", "127.0.0.1", "no-port", ":"])


def _int(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [lo, hi, 0, 1, -1, 2, 3, 4096, 2**31 - 1]
    return st.one_of(st.sampled_from([e for e in edges if lo <= e <= hi]), st.integers(lo, hi))


def _text(field_name: str) -> st.SearchStrategy[str]:
    if "address" in field_name or field_name == "next_hop":
        return LOOPBACK
    if field_name in ("model", "engine"):
        return st.one_of(
            st.sampled_from([MODEL, "", "auto", "native_mtp", "pipeline", "local", "/", ".."]),
            st.text(max_size=40),
        )
    return st.one_of(
        st.text(max_size=30),
        st.sampled_from(["", "\x00", "\ud7ff" * 3, "a" * 70_000]),
    )


def _scalar(field: FieldDescriptor) -> st.SearchStrategy:
    if field.type in _INT_BOUNDS:
        return _int(*_INT_BOUNDS[field.type])
    if field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        special = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, -1.0, 1e308, 0.5])
        return st.one_of(
            special, st.floats(allow_nan=True, width=32 if field.type == F.TYPE_FLOAT else 64)
        )
    if field.type == F.TYPE_BOOL:
        return st.booleans()
    if field.type == F.TYPE_STRING:
        return _text(field.name)
    if field.type == F.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.just(b"\x00" * 100_000))
    if field.type == F.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-5, 2**31 - 1))
    raise AssertionError(f"unhandled field type {field.type} of {field.full_name}")


def messages(descriptor, depth: int = 0) -> st.SearchStrategy:
    """Any message of ``descriptor``'s type (nested up to 3 deep)."""
    cls = _class_of(descriptor)

    @st.composite
    def build(draw):
        msg = cls()
        for field in descriptor.fields:
            if not draw(st.booleans()):
                continue
            is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
            if is_map:
                key_f = field.message_type.fields_by_name["key"]
                val_f = field.message_type.fields_by_name["value"]
                entries = draw(st.dictionaries(_scalar(key_f), _scalar(val_f), max_size=5))
                getattr(msg, field.name).update(entries)
            elif field.type == F.TYPE_MESSAGE:
                if depth >= 3:
                    continue
                sub = messages(field.message_type, depth + 1)
                if field.is_repeated:
                    count = draw(st.sampled_from([0, 1, 3, 200]))
                    items = draw(st.lists(sub, min_size=min(count, 3), max_size=min(count, 3)))
                    items = (items * (count // max(len(items), 1) + 1))[:count] if items else []
                    getattr(msg, field.name).extend(items)
                else:
                    getattr(msg, field.name).CopyFrom(draw(sub))
            elif field.is_repeated:
                values = draw(st.lists(_scalar(field), max_size=8))
                if draw(st.integers(0, 9)) == 0 and values:
                    values = values * 5000  # huge repeated field
                getattr(msg, field.name).extend(values)
            else:
                setattr(msg, field.name, draw(_scalar(field)))
        return msg

    return build()


def _class_of(descriptor):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-rpc")
    with DaemonCluster(root) as cluster:
        daemon = cluster.start("fuzzed", mdns=False)
        _, instance = launch(daemon.address, MODEL)
        channel = rpc.channel(daemon.address)
        yield daemon, channel, instance
        channel.close()


def _check(call, what: str) -> None:
    try:
        call()
    except grpc.RpcError as exc:
        assert exc.code() not in BAD_STATUS, f"{what}: {exc.code().name}: {exc.details()}"


def _drain(stream, limit: int = 3) -> None:
    """Read a few responses of a server stream, then cancel it (a valid request may run long)."""
    try:
        for i, _ in enumerate(stream):
            if i + 1 >= limit:
                break
    finally:
        stream.cancel()


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
    database=None,
)


@settings(FUZZ, max_examples=GENERATE_EXAMPLES)
@given(request=messages(inference_pb2.GenerateRequest.DESCRIPTOR))
def test_fuzz_generate(node, request):
    _, channel, _ = node
    api = inference_pb2_grpc.InferenceServiceStub(channel)
    _check(
        lambda: _drain(api.Generate(request, timeout=CALL_TIMEOUT_S)), f"Generate({request!r:.300})"
    )


@FUZZ
@given(
    place=messages(inference_pb2.PlaceRequest.DESCRIPTOR),
    launch_=messages(inference_pb2.LaunchRequest.DESCRIPTOR),
    unload=messages(inference_pb2.UnloadRequest.DESCRIPTOR),
    status=messages(inference_pb2.ClusterStatusRequest.DESCRIPTOR),
    models=messages(inference_pb2.ListModelsRequest.DESCRIPTOR),
)
def test_fuzz_inference_control(node, place, launch_, unload, status, models):
    _, channel, _ = node
    api = inference_pb2_grpc.InferenceServiceStub(channel)
    if launch_.model == MODEL:  # a real launch loads weights; the fuzz wants bad requests
        launch_.model = MODEL + "-missing"
    if unload.model == MODEL or unload.instance_id:
        unload.model, unload.instance_id = unload.model + "-missing", ""
    _check(lambda: api.Place(place, timeout=CALL_TIMEOUT_S), f"Place({place!r:.300})")
    _check(lambda: _drain(api.Launch(launch_, timeout=CALL_TIMEOUT_S)), f"Launch({launch_!r:.300})")
    _check(lambda: api.Unload(unload, timeout=CALL_TIMEOUT_S), f"Unload({unload!r:.300})")
    _check(lambda: api.ClusterStatus(status, timeout=CALL_TIMEOUT_S), "ClusterStatus")
    _check(lambda: api.ListModels(models, timeout=CALL_TIMEOUT_S), "ListModels")


@FUZZ
@given(
    heartbeat=messages(node_pb2.HeartbeatRequest.DESCRIPTOR),
    goodbye=messages(node_pb2.GoodbyeRequest.DESCRIPTOR),
)
def test_fuzz_node_service(node, heartbeat, goodbye):
    _, channel, _ = node
    api = node_pb2_grpc.NodeServiceStub(channel)
    _check(
        lambda: api.Heartbeat(heartbeat, timeout=CALL_TIMEOUT_S), f"Heartbeat({heartbeat!r:.300})"
    )
    _check(lambda: api.Goodbye(goodbye, timeout=CALL_TIMEOUT_S), f"Goodbye({goodbye!r:.300})")
    _check(lambda: api.GetInfo(node_pb2.GetInfoRequest(), timeout=CALL_TIMEOUT_S), "GetInfo")
    _check(lambda: api.ClusterView(node_pb2.ClusterViewRequest(), timeout=CALL_TIMEOUT_S), "View")


@FUZZ
@given(
    load=messages(stage_pb2.LoadShardRequest.DESCRIPTOR),
    unload=messages(stage_pb2.UnloadShardRequest.DESCRIPTOR),
    status=messages(stage_pb2.StageStatusRequest.DESCRIPTOR),
    frames=st.lists(messages(stage_pb2.ForwardRequest.DESCRIPTOR), max_size=4),
    target=st.sampled_from(["", "real", "bogus"]),
)
def test_fuzz_stage_service(node, load, unload, status, frames, target):
    _, channel, instance = node
    api = stage_pb2_grpc.StageServiceStub(channel)
    if load.model == MODEL:
        load.model = MODEL + "-missing"  # the fuzz is about refusals, not about loading weights
    unload.instance_id = "fuzz-" + unload.instance_id  # never the live instance's shard
    _check(lambda: api.LoadShard(load, timeout=CALL_TIMEOUT_S), f"LoadShard({load!r:.300})")
    _check(lambda: api.UnloadShard(unload, timeout=CALL_TIMEOUT_S), "UnloadShard")
    _check(lambda: api.Status(status, timeout=CALL_TIMEOUT_S), "Status")
    instance_id = {"real": instance.instance_id, "bogus": "nope", "": ""}[target]
    metadata = (("x-macmesh-instance", instance_id),)
    _check(
        lambda: _drain(api.Forward(iter(frames), timeout=CALL_TIMEOUT_S, metadata=metadata)),
        f"Forward({frames!r:.300})",
    )


def test_daemon_healthy_after_fuzzing(node):
    daemon, _, instance = node
    assert daemon.alive(), daemon.log_text()[-3000:]
    _, ids, _ = generate(daemon.address, instance.instance_id, max_tokens=5)
    assert len(ids) == 5
    assert "internal error" not in daemon.log_text()
