"""The gateway's pure parts (request mapping, response shapes, error mapping, OpenAPI document)
and a fuzz of its HTTP input handling: no body, however malformed, gets a 500."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import openai
import pytest
from helpers.gateway_processes import dead_address
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from node.client import (
    FinalStats,
    InternalError,
    InvalidRequest,
    NotFound,
    ResourceExhausted,
    StageInfo,
    Unavailable,
)
from node.gateway import create_app, openapi_document
from node.gateway.errors import field_path, from_client_error, from_validation_error
from node.gateway.schemas import ChatCompletionChunk, ChatCompletionRequest, CompletionRequest
from node.gateway.translate import Reply, RequestError, chat_options, completion_options
from node.proto.macmesh.v1 import inference_pb2 as pb
from node.proto.macmesh.v1 import inference_pb2_grpc as pb_grpc
from node.rpc import bind, make_server

USER = [{"role": "user", "content": "hi"}]


def chat_request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate_json(
        json.dumps({"model": "m", "messages": USER, **fields})
    )


def stats(**overrides) -> FinalStats:
    values = dict(
        engine="native_mtp",
        engine_reason="native_mtp: single node",
        drafter_kind="native_mtp",
        num_draft_tokens=2,
        proposed_draft_tokens=10,
        accepted_draft_tokens=7,
        acceptance_rate=0.7,
        prompt_tokens=5,
        generation_tokens=9,
        prompt_tps=100.0,
        generation_tps=50.0,
        stages=[StageInfo(node_id="a", address="127.0.0.1:1", start_layer=0, end_layer=4)],
        finish_reason="length",
    )
    return FinalStats(**{**values, **overrides})


# ----------------------------------------------------------------------------- requests


def test_chat_request_maps_to_generate_options() -> None:
    req = chat_request(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ],
        max_completion_tokens=7,
        top_p=0.5,
        top_k=-1,
        min_p=0.1,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"42": -100, "7": 3.5},
        seed=2**63,
        stop="END",
        mtp_k=3,
        engine="local",
        ignore_eos=True,
    )
    options = chat_options(req, "req-1")
    assert [(m.role, m.content) for m in options.messages] == [
        ("system", "be brief"),
        ("user", "a\nb"),
    ]
    assert options.max_tokens == 7
    s = options.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p) == (1.0, 0.5, 0, 0.1)  # OpenAI's default T
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty) == (1.1, 0.5, -0.5)
    assert s.logit_bias == {42: -100.0, 7: 3.5}
    assert s.seed == 2**63
    assert (options.stop, options.mtp_k, options.engine, options.ignore_eos) == (
        ["END"],
        3,
        "local",
        True,
    )
    assert options.request_id == "req-1"


def test_chat_without_limits_leaves_them_to_the_node() -> None:
    options = chat_options(chat_request(temperature=0), "r")
    assert (options.max_tokens, options.sampling.temperature, options.engine) == (0, 0.0, "auto")


def test_contradicting_token_limits_are_rejected() -> None:
    with pytest.raises(RequestError) as info:
        chat_options(chat_request(max_tokens=5, max_completion_tokens=6), "r")
    assert info.value.param == "max_completion_tokens"
    assert chat_options(chat_request(max_tokens=5, max_completion_tokens=5), "r").max_tokens == 5


@pytest.mark.parametrize(
    ("prompt", "text", "ids"),
    [
        ("once", "once", None),
        (["once"], "once", None),
        ([1, 2, 3], None, [1, 2, 3]),
        ([[4, 5]], None, [4, 5]),
    ],
)
def test_completion_prompt_forms(prompt, text, ids) -> None:
    req = CompletionRequest.model_validate_json(json.dumps({"model": "m", "prompt": prompt}))
    options = completion_options(req, "r")
    assert (options.prompt, options.prompt_ids) == (text, ids)
    assert options.raw is (text is not None)  # completions never apply the chat template
    assert options.max_tokens == 16  # OpenAI's default for completions


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0].type",
        ),
        ({"n": 3}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"stop": ""}, "stop"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"engine": "fast"}, "engine"),
    ],
)
def test_invalid_fields_are_named(fields, param) -> None:
    with pytest.raises(ValidationError) as info:
        chat_request(**fields)
    error = from_validation_error(info.value)
    assert error.status == 400
    assert error.detail.param == param
    assert param in error.detail.message


def test_missing_field_and_non_object_bodies() -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate_json(b'{"model": "m"}')
    assert from_validation_error(info.value).detail.message == "messages is required"
    for body in (b"[]", b"3", b"{", b""):
        with pytest.raises(ValidationError) as info:
            ChatCompletionRequest.model_validate_json(body)
        error = from_validation_error(info.value)
        assert error.status == 400 and error.detail.param is None


def test_field_path_drops_union_branch_names() -> None:
    assert (
        field_path(("messages", 0, "content", "list[TextPart]", 1, "text"))
        == "messages[0].content[1].text"
    )
    assert field_path(("prompt", "constrained-str")) == "prompt"


# ----------------------------------------------------------------------------- responses


def test_node_errors_map_to_http_statuses() -> None:
    cases = [
        (InvalidRequest("bad", grpc.StatusCode.INVALID_ARGUMENT), 400, None),
        (NotFound("no model", grpc.StatusCode.NOT_FOUND), 404, "model"),
        (ResourceExhausted("full", grpc.StatusCode.RESOURCE_EXHAUSTED), 429, None),
        (Unavailable("down", grpc.StatusCode.UNAVAILABLE), 503, None),
        (InternalError("boom", grpc.StatusCode.INTERNAL), 500, None),
    ]
    for exc, status, param in cases:
        error = from_client_error(exc)
        assert (error.status, error.detail.param, error.detail.message) == (
            status,
            param,
            exc.message,
        )
        assert error.body()["error"]["type"]


def test_non_streaming_bodies_carry_usage_and_stats() -> None:
    body = Reply(id="chatcmpl-1", created=1, model="m", chat=True).response("hi", stats())
    assert body["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": "hi"},
        "finish_reason": "length",
        "logprobs": None,
    }
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 9,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert body["macmesh"]["tps"] == 50.0
    assert body["macmesh"]["acceptance_rate"] == 0.7
    assert body["macmesh"]["stages"][0]["end_layer"] == 4
    text = Reply(id="cmpl-1", created=1, model="m", chat=False).response(
        "hi", stats(finish_reason="stop")
    )
    assert text["object"] == "text_completion"
    assert text["choices"][0]["text"] == "hi" and text["choices"][0]["finish_reason"] == "stop"


def test_stream_chunks_put_stats_on_the_last_chunk() -> None:
    plain = Reply(id="c", created=1, model="m", chat=True)
    assert plain.opening_chunks()[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = plain.text_chunk("a")
    assert "usage" not in text and "macmesh" not in text
    (closing,) = plain.closing_chunks(stats())
    assert closing["choices"][0]["finish_reason"] == "length"
    assert closing["macmesh"]["engine"] == "native_mtp" and "usage" not in closing

    with_usage = Reply(id="c", created=1, model="m", chat=True, include_usage=True)
    assert with_usage.text_chunk("a")["usage"] is None  # as OpenAI sends it
    finish, last = with_usage.closing_chunks(stats())
    assert "macmesh" not in finish
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 14 and last["macmesh"]
    for chunk in (text, closing, finish, last):
        ChatCompletionChunk.model_validate(chunk)  # what the OpenAPI document promises

    completion = Reply(id="c", created=1, model="m", chat=False)
    assert completion.opening_chunks() == []
    assert completion.text_chunk("x")["choices"][0]["text"] == "x"


# ----------------------------------------------------------------------------- OpenAPI


def test_openapi_document_is_complete() -> None:
    doc = openapi_document()
    json.dumps(doc)
    schemas = doc["components"]["schemas"]

    def refs(node) -> Iterator[str]:
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "404", "429", "503"} <= set(chat["responses"])
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    props = schemas["ChatCompletionRequest"]["properties"]
    assert {
        "top_k",
        "min_p",
        "repetition_penalty",
        "mtp_k",
        "engine",
        "max_completion_tokens",
    } <= set(props)
    assert schemas["ModelCard"]["properties"]["native_mtp"]


# ----------------------------------------------------------------------------- fuzz


@contextlib.contextmanager
def serve_gateway(node_address: str) -> Iterator[str]:
    """The gateway app on 127.0.0.1 in a background thread's event loop; yields its URL."""
    from aiohttp import web

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def start() -> None:
        app = create_app(node_address, request_timeout=10)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        holder["runner"] = runner
        holder["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}"
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()))
    thread.start()
    assert ready.wait(30)
    try:
        yield holder["url"]
    finally:
        asyncio.run_coroutine_threadsafe(holder["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    """A gateway over a node address where nothing listens."""
    with serve_gateway(dead_address()) as url:
        yield url


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "n", "stream", "stream_options", "stop", "seed", "presence_penalty", "frequency_penalty",
    "logit_bias", "top_k", "min_p", "repetition_penalty", "mtp_k", "engine", "ignore_eos",
    "logprobs", "tools", "echo", "suffix", "user",
]  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
small_values = (
    st.none()
    | st.booleans()
    | st.integers(-3, 70)
    | st.floats(-3, 3)
    | st.sampled_from(["auto", "local", "pipeline", "stop", "", "7"])
    | st.lists(st.text(max_size=3), max_size=5)
    | st.dictionaries(
        st.sampled_from(["7", "x", "-1", "include_usage"]),
        st.integers(-200, 200) | st.booleans(),
        max_size=2,
    )
)
valid_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=8)}
    ),
    min_size=1,
    max_size=2,
)
junk_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "tool", 3]), "content": json_values}),
    max_size=2,
)
base = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["m", "m", "m", "", 3]),
        "messages": valid_messages | valid_messages | junk_messages,
        "prompt": st.text(max_size=8) | st.lists(st.integers(-1, 2**33), max_size=3) | json_values,
    }
)
extras = st.dictionaries(st.sampled_from(FIELDS[3:]), small_values | json_values, max_size=3)
bodies = st.builds(lambda b, extra: {**b, **extra}, base, extras)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_no_body_gets_a_500(gateway_url: str, body: dict, path: str) -> None:
    status, reply = post(gateway_url + path, json.dumps(body).encode())
    # bad input -> 400; well-formed input reaches the (absent) node -> 503
    assert status in (400, 503), (status, reply)
    assert reply["error"]["message"]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.binary(max_size=64))
def test_no_bytes_get_a_500(gateway_url: str, raw: bytes) -> None:
    status, reply = post(gateway_url + "/v1/chat/completions", raw)
    assert status == 400, (status, reply)


# ----------------------------------------------------------------------------- command line


def test_command_rejects_a_bad_node_address_and_a_busy_port() -> None:
    def gateway(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "node.cli", "gateway", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    out = gateway("--node", "nonsense")
    assert out.returncode == 2 and "'nonsense' is not HOST:PORT" in out.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = gateway("--port", str(port), "--node", dead_address())
    assert out.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in out.stderr


# ----------------------------------------------------------------------------- node failures


class ScriptedNode(pb_grpc.InferenceServiceServicer):
    """A gRPC node that fails in scripted ways, to drive the gateway's error paths."""

    def __init__(self) -> None:
        self.request_ids: list[str] = []

    def Generate(self, request, context):
        self.request_ids.append(request.request_id)
        yield pb.GenerateResponse(delta=pb.TextDelta(text="partial", token_ids=[1]))
        if request.model == "dies-midway":
            context.abort(grpc.StatusCode.INTERNAL, "stage 2 went away")
        # "no-final": the stream ends without GenerationStats


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[ScriptedNode, str]]:
    server, _ = make_server(max_workers=4)
    servicer = ScriptedNode()
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = bind(server, "127.0.0.1", 0)
    server.start()
    with serve_gateway(f"127.0.0.1:{port}") as url:
        yield servicer, url
    server.stop(grace=None)


def sse_events(url: str, body: dict) -> list[Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        lines = [line.decode().strip() for line in response]
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def test_a_failure_mid_stream_is_an_in_band_error(scripted: tuple[ScriptedNode, str]) -> None:
    _, url = scripted
    body = {"model": "dies-midway", "messages": USER, "stream": True}
    events = sse_events(url + "/v1/chat/completions", body)
    assert events[1]["choices"][0]["delta"]["content"] == "partial"
    assert events[-2]["error"]["message"] == "stage 2 went away"
    assert events[-1] == "[DONE]"
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIError, match="stage 2 went away"):
        list(client.chat.completions.create(model="dies-midway", messages=USER, stream=True))
    status, reply = post(
        url + "/v1/chat/completions", json.dumps({**body, "stream": False}).encode()
    )
    assert (status, reply["error"]["message"]) == (500, "stage 2 went away")


def test_a_stream_without_final_stats_is_an_error(scripted: tuple[ScriptedNode, str]) -> None:
    _, url = scripted
    body = {"model": "no-final", "prompt": "x"}
    status, reply = post(url + "/v1/completions", json.dumps(body).encode())
    assert status == 502 and "without final stats" in reply["error"]["message"]
    events = sse_events(url + "/v1/completions", {**body, "stream": True})
    assert "without final stats" in events[-2]["error"]["message"]


def test_request_id_header_reaches_the_node(scripted: tuple[ScriptedNode, str]) -> None:
    servicer, url = scripted
    for header, expected_prefix in (("trace-42", "trace-42"), ("bad id with spaces", "cmpl-")):
        request = urllib.request.Request(
            url + "/v1/completions",
            data=json.dumps({"model": "no-final", "prompt": "x"}).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "X-Request-Id": header},
        )
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=30)
        assert servicer.request_ids[-1].startswith(expected_prefix)
