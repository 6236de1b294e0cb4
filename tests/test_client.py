"""The typed InferenceService client (``node.client``) against a real node process.

The node is a real ``macmesh run`` daemon serving a tiny native-MTP checkpoint (the real
servicer: admission, batching, deadlines, cancellation); its request log shows what became of
each request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest
from helpers.gateway_processes import InferenceNode, dead_address, start_daemon_node

from node.client import (
    AsyncMacmeshClient,
    Cancelled,
    ChatMessage,
    ClusterStatus,
    DeadlineExceeded,
    Delta,
    FailedPrecondition,
    FinalStats,
    InternalError,
    InvalidRequest,
    Launched,
    LaunchMessage,
    MacmeshClient,
    MacmeshError,
    NotFound,
    ResourceExhausted,
    Sampling,
    Unavailable,
    Unimplemented,
    error_from_rpc,
)

MAX_IN_FLIGHT = 3
LONG = {"max_tokens": 4000, "ignore_eos": True}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceNode]:
    handle = start_daemon_node(  # a real daemon: the real servicer, batching on
        tmp_path_factory.mktemp("client-node"), max_in_flight=MAX_IN_FLIGHT
    )
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(node: InferenceNode) -> Iterator[MacmeshClient]:
    with MacmeshClient(node.address, timeout=60) as c:
        yield c


def events_of(stream) -> tuple[list[Delta], FinalStats]:
    events = list(stream)
    assert isinstance(events[-1], FinalStats)
    assert all(isinstance(e, Delta) for e in events[:-1])
    return events[:-1], events[-1]


# ----------------------------------------------------------------------------- calls


def test_list_models_is_typed(client: MacmeshClient, node: InferenceNode) -> None:
    models = {m.id: m for m in client.list_models()}
    tiny = models[node.model_id]
    assert tiny.launched
    assert (tiny.native_mtp.default_k, tiny.native_mtp.max_k) == (2, 4)
    assert tiny.num_layers > 0 and tiny.context_length > 0


def test_generate_streams_deltas_then_stats(client: MacmeshClient, node: InferenceNode) -> None:
    stream = client.generate(
        node.model_id, "Hello", max_tokens=10, ignore_eos=True, request_id="client-gen-1"
    )
    deltas, stats = events_of(stream)
    assert sum(len(d.token_ids) for d in deltas) == stats.generation_tokens == 10
    assert stats.finish_reason == "length"
    assert stats.engine == "native_mtp" and stats.drafter_kind == "native_mtp"
    assert stats.accepted_draft_tokens <= stats.proposed_draft_tokens
    assert stats.stages and stats.stages[0].end_layer > stats.stages[0].start_layer
    node.wait_for_event("finished", "client-gen-1")


def test_prompt_forms(client: MacmeshClient, node: InferenceNode) -> None:
    ids = [72, 101, 108, 108, 111]
    _, stats = events_of(client.generate(node.model_id, prompt_ids=ids, max_tokens=3))
    assert stats.prompt_tokens == len(ids)
    turns = [ChatMessage(role="system", content="Be brief."), {"role": "user", "content": "Hi"}]
    _, chat_stats = events_of(client.generate(node.model_id, messages=turns, max_tokens=3))
    assert chat_stats.prompt_tokens > 2
    raw_stats = events_of(client.generate(node.model_id, "Hi", raw=True, max_tokens=3))[1]
    templated_stats = events_of(client.generate(node.model_id, "Hi", max_tokens=3))[1]
    assert raw_stats.prompt_tokens < templated_stats.prompt_tokens  # no chat template


def test_sampling_and_engine_options_apply(client: MacmeshClient, node: InferenceNode) -> None:
    sampling = Sampling(temperature=0.8, top_p=0.9, top_k=20, seed=5)
    runs = [
        "".join(
            e.text
            for e in client.generate(node.model_id, "Hi", max_tokens=8, sampling=sampling)
            if isinstance(e, Delta)
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1]  # same seed, same text
    _, stats = events_of(client.generate(node.model_id, "Hi", max_tokens=4, engine="local"))
    assert (stats.engine, stats.drafter_kind) == ("local", None)
    _, stats = events_of(client.generate(node.model_id, "Hi", max_tokens=4, mtp_k=1))
    assert stats.num_draft_tokens == 1


def test_cluster_calls_are_typed(client: MacmeshClient, node: InferenceNode) -> None:
    status = client.cluster_status()
    assert isinstance(status, ClusterStatus)
    assert status.instances[0].model == node.model_id
    assert status.instances[0].engine == "native_mtp"
    plan = client.place(node.model_id)
    assert plan.stages[0].end_layer > 0
    events = list(client.launch(node.model_id))  # a second instance of the model
    assert isinstance(events[0], LaunchMessage)
    assert isinstance(events[-1], Launched) and events[-1].instance.state == "ready"
    second = events[-1].instance.instance_id
    assert second != status.instances[0].instance_id
    assert client.unload(instance_id=second) == 1
    assert [i.instance_id for i in client.cluster_status().instances] == [
        status.instances[0].instance_id
    ]
    client.check_health()
    with pytest.raises(NotFound, match="no-such"):
        client.place("no-such-model")


# ----------------------------------------------------------------------------- errors


def test_bad_arguments_fail_before_sending(client: MacmeshClient, node: InferenceNode) -> None:
    with pytest.raises(InvalidRequest, match="temperature"):
        client.generate(node.model_id, "x", sampling={"temperature": -1})
    with pytest.raises(InvalidRequest, match="exactly one"):
        client.generate(node.model_id, "x", prompt_ids=[1])
    with pytest.raises(InvalidRequest, match="engine"):
        client.generate(node.model_id, "x", engine="warp")
    with pytest.raises(InvalidRequest, match="min_nodes"):
        client.place(node.model_id, min_nodes=-1)


def test_server_errors_are_typed(client: MacmeshClient, node: InferenceNode) -> None:
    with pytest.raises(NotFound, match="no-such-model") as info:
        list(client.generate("no-such-model", "x"))
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(InvalidRequest, match="99999"):
        list(client.generate(node.model_id, "x", sampling=Sampling(logit_bias={99999: 1.0})))
    with pytest.raises(InvalidRequest, match="mtp_k"):
        client.generate(node.model_id, "x", mtp_k=99).wait_started()


def test_resource_exhausted(client: MacmeshClient, node: InferenceNode) -> None:
    held = [client.generate(node.model_id, "x", **LONG) for _ in range(MAX_IN_FLIGHT)]
    try:
        for stream in held:
            stream.wait_started()
        with pytest.raises(ResourceExhausted, match=f"its limit is {MAX_IN_FLIGHT}"):
            list(client.generate(node.model_id, "x", max_tokens=2))
    finally:
        for stream in held:
            stream.close()
    # Cancelling is asynchronous: the node frees the slots a moment later, then admits again.
    deadline = time.monotonic() + 15
    while True:
        try:
            list(client.generate(node.model_id, "x", max_tokens=2))
            break
        except ResourceExhausted:
            assert time.monotonic() < deadline, "the node never freed the cancelled requests"
            time.sleep(0.1)


def test_unreachable_node_is_unavailable() -> None:
    with MacmeshClient(dead_address(), timeout=10) as c:
        with pytest.raises(Unavailable):
            c.list_models()
        with pytest.raises(Unavailable):
            list(c.generate("m", "x"))
        with pytest.raises(Unavailable):
            c.check_health()


def test_deadline_is_honoured_and_frees_the_request(
    client: MacmeshClient, node: InferenceNode
) -> None:
    stream = client.generate(node.model_id, "x", request_id="client-deadline", timeout=1.0, **LONG)
    with pytest.raises(DeadlineExceeded):
        list(stream)
    record = node.wait_for_event("cancelled", "client-deadline")
    assert record["tokens"] < LONG["max_tokens"]


def test_closing_the_stream_cancels_the_call(client: MacmeshClient, node: InferenceNode) -> None:
    with client.generate(node.model_id, "x", request_id="client-close", **LONG) as stream:
        assert isinstance(next(stream), Delta)
    node.wait_for_event("cancelled", "client-close")
    with pytest.raises(Cancelled):
        next(stream)


def test_error_mapping_covers_the_status_codes() -> None:
    class FakeRpcError(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode, details: str) -> None:
            self._code, self._details = code, details

        def code(self) -> grpc.StatusCode:
            return self._code

        def details(self) -> str:
            return self._details

    expected = {
        grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
        grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
        grpc.StatusCode.NOT_FOUND: NotFound,
        grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
        grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
        grpc.StatusCode.UNAVAILABLE: Unavailable,
        grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
        grpc.StatusCode.CANCELLED: Cancelled,
        grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
        grpc.StatusCode.INTERNAL: InternalError,
        grpc.StatusCode.UNKNOWN: InternalError,
    }
    for code, kind in expected.items():
        error = error_from_rpc(FakeRpcError(code, f"because {code.name}"))
        assert type(error) is kind and isinstance(error, MacmeshError)
        assert (error.code, error.message, str(error)) == (
            code,
            f"because {code.name}",
            error.message,
        )
    assert error_from_rpc(FakeRpcError(grpc.StatusCode.INTERNAL, "")).message  # never empty


# ----------------------------------------------------------------------------- asyncio


def test_async_client(node: InferenceNode) -> None:
    async def scenario() -> None:
        async with AsyncMacmeshClient(node.address, timeout=60) as c:
            assert node.model_id in {m.id for m in await c.list_models()}
            stream = c.generate(node.model_id, "Hello", max_tokens=6, ignore_eos=True)
            events = [e async for e in stream]
            assert isinstance(events[-1], FinalStats) and events[-1].generation_tokens == 6
            with pytest.raises(NotFound):
                await c.generate("no-such-model", "x").wait_started()
            async with c.generate(node.model_id, "x", request_id="async-close", **LONG) as s:
                await s.wait_started()
                assert isinstance(await anext(s), Delta)
            await c.check_health()

    asyncio.run(scenario())
    node.wait_for_event("cancelled", "async-close")
