"""The OpenAI gateway, end to end: the official ``openai`` client -> a real ``macmesh gateway``
process -> a real ``macmesh run`` daemon serving a tiny native-MTP checkpoint (the real
servicer: admission, batching, stop strings, cancellation), whose request log shows what
became of each request.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from helpers.gateway_processes import (
    Gateway,
    InferenceNode,
    dead_address,
    start_daemon_node,
    start_gateway,
)

MAX_IN_FLIGHT = 4


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceNode]:
    handle = start_daemon_node(  # a real daemon: the real servicer, batching on
        tmp_path_factory.mktemp("node"), max_in_flight=MAX_IN_FLIGHT
    )
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def gateway(node: InferenceNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    handle = start_gateway(tmp_path_factory.mktemp("gateway"), node.address)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    # No retries: a 429 or 503 must reach the test, not be retried away.
    return openai.OpenAI(base_url=gateway.api, api_key="unused", max_retries=0, timeout=60)


def chat(client: openai.OpenAI, model: str, content: str = "Hello there", **kwargs):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], **kwargs
    )


def token_counts(usage) -> tuple[int, int, int]:
    """How many tokens, not where they came from: the second of two requests with the same
    prompt reads most of it from the prompt cache (test_prompt_cache_gateway checks
    cached_tokens), so the usage objects differ in prompt_tokens_details."""
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def http(url: str, body: bytes | None = None, method: str = "GET") -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=body, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# ----------------------------------------------------------------------------- models, health


def test_models_list_native_mtp(client: openai.OpenAI, node: InferenceNode) -> None:
    models = {m.id: m for m in client.models.list().data}
    tiny = models[node.model_id]
    assert tiny.native_mtp == {"default_k": 2, "max_k": 4}
    assert tiny.launched is True
    for model in models.values():
        assert model.object == "model"
        mtp = model.native_mtp
        assert mtp is None or 1 <= mtp["default_k"] <= mtp["max_k"]
    assert client.models.retrieve(node.model_id).id == node.model_id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_health_and_openapi(gateway: Gateway, node: InferenceNode) -> None:
    status, body = http(f"{gateway.url}/health")
    assert (status, body["status"], body["node"]) == (200, "ok", node.address)
    status, doc = http(f"{gateway.url}/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.1")
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/health"} <= set(doc["paths"])


# ----------------------------------------------------------------------------- chat


def test_chat_reports_usage_and_macmesh_stats(client: openai.OpenAI, node: InferenceNode) -> None:
    # K pinned: what the policy would choose depends on this machine's measured costs, and
    # this test is about the stats reporting the drafts, whatever K is.
    reply = chat(
        client,
        node.model_id,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True, "mtp_k": 2},
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12
    stats = reply.macmesh
    assert stats["engine"] == "native_mtp"
    assert stats["drafter_kind"] == "native_mtp"
    hist = stats["draft_k_histogram"]
    assert hist[2] == sum(hist) >= 1 and stats["num_draft_tokens"] == 2
    assert 0 < stats["accepted_draft_tokens"] <= stats["proposed_draft_tokens"]
    rate = stats["accepted_draft_tokens"] / stats["proposed_draft_tokens"]
    assert stats["acceptance_rate"] == pytest.approx(rate)
    assert stats["tps"] > 0 and stats["engine_reason"]
    assert stats["stages"] and stats["stages"][0]["end_layer"] > 0
    assert (stats["prompt_tokens"], stats["generation_tokens"]) == (
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
    )


def test_chat_stream_equals_non_stream(client: openai.OpenAI, node: InferenceNode) -> None:
    kwargs = {"max_tokens": 16, "temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = chat(client, node.model_id, "Tell me about the sea", **kwargs)
    chunks = list(
        chat(
            client,
            node.model_id,
            "Tell me about the sea",
            stream=True,
            stream_options={"include_usage": True},
            **kwargs,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length"]
    last = chunks[-1]
    assert last.choices == []
    assert token_counts(last.usage) == token_counts(whole.usage)
    assert last.macmesh["engine"] == "native_mtp"
    assert all(getattr(c, "macmesh", None) is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_stream_without_include_usage_still_ends_with_stats(
    client: openai.OpenAI, node: InferenceNode
) -> None:
    chunks = list(chat(client, node.model_id, max_tokens=4, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].macmesh["generation_tokens"] >= 1
    assert all(c.usage is None for c in chunks)


def test_extensions_pick_engine_and_draft_length(
    client: openai.OpenAI, node: InferenceNode
) -> None:
    local = chat(client, node.model_id, max_tokens=6, temperature=0, extra_body={"engine": "local"})
    assert local.macmesh["engine"] == "local"
    assert local.macmesh["drafter_kind"] is None
    assert local.macmesh["proposed_draft_tokens"] == 0
    k1 = chat(
        client,
        node.model_id,
        max_completion_tokens=6,
        temperature=0,
        extra_body={"mtp_k": 1, "top_k": 5, "min_p": 0.0, "repetition_penalty": 1.0},
    )
    assert k1.macmesh["num_draft_tokens"] == 1
    # greedy decoding is the same text whichever engine runs it
    assert k1.choices[0].message.content == local.choices[0].message.content


def test_seed_makes_sampling_reproducible(client: openai.OpenAI, node: InferenceNode) -> None:
    texts = {
        chat(client, node.model_id, max_tokens=12, temperature=0.9, seed=1234, top_p=0.95)
        .choices[0]
        .message.content
        for _ in range(2)
    }
    assert len(texts) == 1


def test_stop_string_cuts_the_text(client: openai.OpenAI, node: InferenceNode) -> None:
    kwargs = {"max_tokens": 24, "temperature": 0, "extra_body": {"ignore_eos": True}}
    full = chat(client, node.model_id, "Once upon a time", **kwargs).choices[0].message.content
    middle = len(full) // 2
    stop = full[middle : middle + 3]
    cut = chat(client, node.model_id, "Once upon a time", stop=[stop], **kwargs).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full[: full.index(stop)]


# ----------------------------------------------------------------------------- completions


def test_completion_with_token_ids(client: openai.OpenAI, node: InferenceNode) -> None:
    ids = [72, 101, 108, 108, 111, 44, 32]
    reply = client.completions.create(
        model=node.model_id,
        prompt=ids,
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.object == "text_completion"
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == 5
    assert reply.choices[0].finish_reason == "length"
    assert reply.macmesh["engine"] == "native_mtp"


def test_completion_stream_equals_non_stream(client: openai.OpenAI, node: InferenceNode) -> None:
    kwargs = {"max_tokens": 10, "temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(model=node.model_id, prompt="The cluster", **kwargs)
    chunks = list(
        client.completions.create(
            model=node.model_id,
            prompt="The cluster",
            stream=True,
            stream_options={"include_usage": True},
            **kwargs,
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert token_counts(chunks[-1].usage) == token_counts(whole.usage)
    assert chunks[-1].macmesh["generation_tokens"] == 10


# ----------------------------------------------------------------------------- errors


def test_bad_values_are_400_naming_the_field(client: openai.OpenAI, node: InferenceNode) -> None:
    cases = [
        ({"temperature": 7.0}, "temperature"),
        ({"n": 2}, "n"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"extra_body": {"engine": "warp"}}, "engine"),
        ({"extra_body": {"mtp_k": -1}}, "mtp_k"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            chat(client, node.model_id, **kwargs)
        assert info.value.status_code == 400
        named = info.value.body["param"]  # the field, or a path into it ("logit_bias.abc")
        assert named == param or named.startswith(param + "."), (kwargs, info.value.body)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=node.model_id, messages=[])
    assert info.value.body["param"] == "messages"


def test_values_the_node_rejects_are_400(client: openai.OpenAI, node: InferenceNode) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, node.model_id, logit_bias={"99999": 5})  # beyond the vocabulary
    assert "99999" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, node.model_id, stream=True, extra_body={"mtp_k": 99})  # above max_k
    assert "mtp_k" in info.value.body["message"]


def test_malformed_bodies_are_400(gateway: Gateway, node: InferenceNode) -> None:
    url = f"{gateway.api}/chat/completions"
    for body in (
        b"{not json",
        b"[1, 2]",
        b"",
        b'{"model": "x"}',
        b'{"messages": "hi", "model": 3}',
    ):
        status, reply = http(url, body, "POST")
        assert status == 400, (body, reply)
        assert reply["error"]["type"] == "invalid_request_error"
    status, reply = http(
        url, b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', "POST"
    )
    assert status == 400


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        chat(client, "no-such-model")
    assert info.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):  # streaming too: the status comes before the SSE
        chat(client, "no-such-model", stream=True)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")


def test_resource_exhausted_is_429(client: openai.OpenAI, node: InferenceNode) -> None:
    long = {
        "max_tokens": 4000,
        "temperature": 0,
        "stream": True,
        "extra_body": {"ignore_eos": True},
    }
    held = [chat(client, node.model_id, **long) for _ in range(MAX_IN_FLIGHT)]
    try:
        with pytest.raises(openai.RateLimitError) as info:
            chat(client, node.model_id, max_tokens=2, temperature=0)
        assert info.value.status_code == 429
    finally:
        for stream in held:
            stream.close()
    # Cancelling is asynchronous: the node frees the slots a moment later, then admits again.
    deadline = time.monotonic() + 15
    while True:
        try:
            chat(client, node.model_id, max_tokens=2, temperature=0)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the node never freed the cancelled requests"
            time.sleep(0.1)


def test_unreachable_node_is_503(tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path, dead_address())
    try:
        client = openai.OpenAI(base_url=gateway.api, api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as info:
            chat(client, "any-model")
        assert info.value.status_code == 503
        with pytest.raises(openai.InternalServerError) as info:
            client.models.list()
        assert info.value.status_code == 503
        status, body = http(f"{gateway.url}/health")
        assert (status, body["status"]) == (503, "unavailable")
    finally:
        gateway.stop()


# ----------------------------------------------------------------------------- cancellation, load


def test_client_disconnect_cancels_the_node_call(
    client: openai.OpenAI, node: InferenceNode
) -> None:
    stream = chat(
        client,
        node.model_id,
        max_tokens=4000,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    first = next(iter(stream))
    stream.close()
    cancelled = node.wait_for_event("cancelled", first.id, timeout=15)
    assert cancelled["tokens"] < 4000


def test_client_timeout_cancels_a_non_streaming_request(
    client: openai.OpenAI, node: InferenceNode
) -> None:
    request_id = "gateway-non-stream-timeout"
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=1.5).chat.completions.create(
            model=node.model_id,
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=4000,
            temperature=0,
            extra_body={"ignore_eos": True},
            extra_headers={"X-Request-Id": request_id},  # the gateway passes it to the node
        )
    cancelled = node.wait_for_event("cancelled", request_id, timeout=15)
    assert cancelled["tokens"] < 4000


def test_concurrent_requests_each_get_their_own_answer(
    client: openai.OpenAI, node: InferenceNode
) -> None:
    prompts = ["Hello there", "The quick brown fox", "What time is it", "def add(a, b):"]
    kwargs = {"max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}
    expected = {
        p: chat(client, node.model_id, p, **kwargs).choices[0].message.content for p in prompts
    }
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def run(prompt: str, stream: bool) -> None:
        try:
            if stream:
                chunks = chat(client, node.model_id, prompt, stream=True, **kwargs)
                results[prompt] = "".join(
                    c.choices[0].delta.content or "" for c in chunks if c.choices
                )
            else:
                results[prompt] = (
                    chat(client, node.model_id, prompt, **kwargs).choices[0].message.content
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p, i % 2 == 0)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)  # a hang guard: the assertions below are what the test checks
    assert not errors, errors
    assert results == expected
