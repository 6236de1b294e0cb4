"""The gateway's Anthropic, Ollama and OpenAI Responses APIs, each driven by its official Python
client (``anthropic``, ``ollama``, ``openai``) against a real ``macmesh gateway`` process in front
of a real 2-node cluster on 127.0.0.1 (the gateway talks to the node that does not coordinate
the instance, so every request is relayed over gRPC as in production).

The reference for "the API passed the conversation through unchanged" is the same conversation
through the OpenAI chat endpoint, greedy: the texts must be equal. Errors must come back in each
API's own shape (the clients' typed exceptions prove the status, the bodies are checked as JSON).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import anthropic
import ollama
import openai
import pytest
import requests
from helpers.cluster_client import launch
from helpers.daemons import DaemonCluster
from helpers.gateway_processes import start_gateway

from node.client import MacmeshClient

MODEL = "macmesh-tiny"
KEY = "sk-apis"
SYSTEM = "You are terse."
QUESTION = "What does the os module do?"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("gateway-apis")
    with DaemonCluster(root) as cluster:
        coordinator = cluster.start("coord", mdns=False)
        other = cluster.start("other", mdns=False, peers=[coordinator.address])
        cluster.wait_connected([coordinator, other], timeout=15)
        launch(coordinator.address, MODEL)
        gw = start_gateway(root, other.address, "--api-key", KEY)
        gw.coordinator = coordinator.address  # type: ignore[attr-defined]
        try:
            yield gw
        finally:
            gw.stop()


@pytest.fixture(scope="module")
def claude(gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llama(gateway) -> ollama.Client:
    return ollama.Client(host=gateway.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


@pytest.fixture(scope="module")
def oai(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.api, api_key=KEY, max_retries=0, timeout=120)


def reference(
    oai: openai.OpenAI, messages: list[dict], max_tokens: int, **extra
) -> tuple[str, str]:
    """(text, finish_reason) of the same greedy conversation through the OpenAI chat API."""
    reply = oai.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, extra_body=extra
    )
    return reply.choices[0].message.content, reply.choices[0].finish_reason


CONVERSATION = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]

# ----------------------------------------------------------------------------- Anthropic


def prompt_total(usage) -> int:
    """Anthropic splits the prompt into computed and cache-read tokens."""
    return usage.input_tokens + (usage.cache_read_input_tokens or 0)


# This anthropic client has no sampling arguments any more; the API still takes them.
GREEDY_TO_THE_LIMIT = {"temperature": 0, "ignore_eos": True}


def test_anthropic_message_equals_the_openai_chat(claude, oai):
    expected, _ = reference(oai, CONVERSATION, 12, ignore_eos=True)
    reply = claude.messages.create(
        model=MODEL,
        max_tokens=12,
        system=SYSTEM,
        messages=[{"role": "user", "content": QUESTION}],
        extra_body=GREEDY_TO_THE_LIMIT,
    )
    assert reply.type == "message" and reply.role == "assistant"
    assert reply.content[0].type == "text" and reply.content[0].text == expected
    assert reply.stop_reason == "max_tokens" and reply.stop_sequence is None
    assert reply.usage.output_tokens == 12
    # the system prompt reached the model: the same question without it is a shorter prompt
    bare = claude.messages.create(
        model=MODEL, max_tokens=1, messages=[{"role": "user", "content": QUESTION}]
    )
    assert prompt_total(reply.usage) > prompt_total(bare.usage) > 0


def test_anthropic_stream_equals_the_plain_message(claude):
    args = dict(
        model=MODEL,
        max_tokens=10,
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        extra_body=GREEDY_TO_THE_LIMIT,
    )
    plain = claude.messages.create(**args)
    with claude.messages.stream(**args) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == plain.content[0].text == final.content[0].text
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 10
    assert prompt_total(final.usage) == prompt_total(plain.usage)
    kinds = [event.type for event in claude.messages.create(**args, stream=True)]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert "content_block_delta" in kinds


def test_anthropic_stop_sequence_is_named(claude, oai):
    full, _ = reference(oai, [{"role": "user", "content": QUESTION}], 24, ignore_eos=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"no usable stop sequence in {full!r}"
    reply = claude.messages.create(
        model=MODEL,
        max_tokens=24,
        messages=[{"role": "user", "content": QUESTION}],
        stop_sequences=[stop],
        extra_body=GREEDY_TO_THE_LIMIT,
    )
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == stop
    assert reply.content[0].text == full[: full.find(stop)]


def test_anthropic_errors_have_anthropics_shape(gateway, claude):
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(
            model="no-such-model", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
    assert missing.value.body["type"] == "error"
    assert missing.value.body["error"]["type"] == "not_found_error"
    assert "no-such-model" in missing.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(
            model=MODEL,
            max_tokens=4,
            messages=[{"role": "user", "content": "x"}],
            extra_body={"temperature": 1.5},
        )
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    assert "temperature" in bad.value.body["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError) as denied:
        anthropic.Anthropic(base_url=gateway.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "x"}]
        )
    assert denied.value.body["error"]["type"] == "authentication_error"
    # what the client would not send: no max_tokens, an image block, not JSON
    for body in (
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
        {
            "model": MODEL,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": [{"type": "image"}]}],
        },
        "not json",
    ):
        reply = requests.post(
            f"{gateway.url}/v1/messages",
            headers={"x-api-key": KEY},
            **({"data": body} if isinstance(body, str) else {"json": body}),
            timeout=30,
        )
        assert reply.status_code == 400, reply.text
        error = reply.json()
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"


# ----------------------------------------------------------------------------- Ollama


def test_ollama_lists_and_shows_models(llama):
    names = [m.model for m in llama.list().models]
    assert MODEL in names
    shown = llama.show(MODEL)
    assert shown.details.family == "qwen3_5"
    assert shown.modelinfo["general.architecture"] == "qwen3_5"
    assert shown.modelinfo["macmesh.native_mtp.default_k"] >= 1
    assert [m.model for m in llama.ps().models] == [MODEL]  # the launched one
    with pytest.raises(ollama.ResponseError) as missing:
        llama.show("no-such-model")
    assert missing.value.status_code == 404 and "no-such-model" in missing.value.error


def test_ollama_chat_equals_the_openai_chat_and_streams_the_same(llama, oai):
    expected, finish = reference(oai, CONVERSATION, 12)
    options = {"temperature": 0, "num_predict": 12}
    reply = llama.chat(model=MODEL, messages=CONVERSATION, options=options)
    assert reply.done and reply.message.role == "assistant"
    assert reply.message.content == expected
    assert reply.done_reason == finish  # both "length", or both "stop" when EOS came first
    assert reply.eval_count == (12 if finish == "length" else reply.eval_count) > 0
    assert reply.prompt_eval_count > 0 and reply.total_duration > 0
    chunks = list(llama.chat(model=MODEL, messages=CONVERSATION, options=options, stream=True))
    assert "".join(c.message.content for c in chunks) == expected
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].eval_count == reply.eval_count


def test_ollama_generate_raw_and_templated(llama, oai):
    options = {"temperature": 0, "num_predict": 8}
    templated = llama.generate(model=MODEL, prompt=QUESTION, system=SYSTEM, options=options)
    assert templated.response == reference(oai, CONVERSATION, 8)[0]
    raw = llama.generate(model=MODEL, prompt="The list type", raw=True, options=options)
    completion = oai.completions.create(
        model=MODEL, prompt="The list type", max_tokens=8, temperature=0
    )
    assert raw.response == completion.choices[0].text
    streamed = "".join(
        c.response
        for c in llama.generate(
            model=MODEL, prompt="The list type", raw=True, options=options, stream=True
        )
    )
    assert streamed == raw.response
    loaded = llama.generate(model=MODEL, prompt="")
    assert loaded.done and loaded.done_reason == "load"


def test_ollama_errors_have_ollamas_shape(gateway, llama):
    with pytest.raises(ollama.ResponseError) as missing:
        llama.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404 and "no-such-model" in missing.value.error
    with pytest.raises(ollama.ResponseError) as streamed_missing:
        list(
            llama.chat(
                model="no-such-model", messages=[{"role": "user", "content": "hi"}], stream=True
            )
        )
    assert streamed_missing.value.status_code == 404
    bad = requests.post(
        f"{gateway.url}/api/chat",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "options": {"temperature": "hot"},
        },
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert bad.status_code == 400 and set(bad.json()) == {"error"}
    assert "options.temperature" in bad.json()["error"]
    assert requests.get(f"{gateway.url}/api/tags", timeout=30).status_code == 401


# ----------------------------------------------------------------------------- Responses


def test_responses_text_in_text_out(oai):
    expected, _ = reference(oai, CONVERSATION, 12, ignore_eos=True)
    reply = oai.responses.create(
        model=MODEL,
        instructions=SYSTEM,
        input=QUESTION,
        max_output_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.output_text == expected
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.output_tokens == 12 and reply.usage.input_tokens > 0
    as_messages = oai.responses.create(
        model=MODEL,
        input=[
            {"role": "developer", "content": SYSTEM},
            {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
        ],
        max_output_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert as_messages.output_text == expected


def test_responses_stream_equals_the_plain_response(oai):
    args = dict(model=MODEL, input=QUESTION, max_output_tokens=10, temperature=0)
    plain = oai.responses.create(**args)
    events = list(oai.responses.create(**args, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == plain.output_text == events[-1].response.output_text
    with oai.responses.stream(**args) as stream:
        assert stream.get_final_response().output_text == plain.output_text


def test_responses_errors_have_openais_shape(oai):
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model="no-such-model", input="hi")
    with pytest.raises(openai.BadRequestError) as stored:
        oai.responses.create(model=MODEL, input="hi", previous_response_id="resp_123")
    assert stored.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as bad:
        oai.responses.create(model=MODEL, input="hi", temperature=3)
    assert bad.value.body["param"] == "temperature"


# ----------------------------------------------------------------------------- mid-stream


def unloaded_mid_stream(gateway, start: Callable[[str], Iterator]) -> list:
    """Stream from a fresh instance, unload it after the first event; return what came."""
    _, instance = launch(gateway.coordinator, MODEL)
    events = start(instance.instance_id)
    seen = [next(events)]
    with MacmeshClient(gateway.coordinator, timeout=60) as client:
        assert client.unload(instance_id=instance.instance_id) == 1
    seen.extend(events)  # ends (or raises) once the node reports the unload
    return seen


LONG = 20000


def test_a_failure_after_the_stream_started_is_in_each_apis_own_shape(gateway, claude, llama, oai):
    with pytest.raises(anthropic.APIStatusError) as failed:
        unloaded_mid_stream(
            gateway,
            lambda model: iter(
                claude.messages.create(
                    model=model,
                    max_tokens=LONG,
                    messages=[{"role": "user", "content": "Go on."}],
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
            ),
        )
    assert failed.value.body["type"] == "error"
    assert failed.value.body["error"]["type"] == "overloaded_error"
    assert "unloaded" in failed.value.body["error"]["message"]

    with pytest.raises(ollama.ResponseError) as failed_ollama:
        unloaded_mid_stream(
            gateway,
            lambda model: llama.generate(
                model=model, prompt="Go on.", stream=True, options={"num_predict": LONG}
            ),
        )
    assert "unloaded" in failed_ollama.value.error

    seen = unloaded_mid_stream(
        gateway,
        lambda model: iter(
            oai.responses.create(
                model=model,
                input="Go on.",
                max_output_tokens=LONG,
                stream=True,
                extra_body={"ignore_eos": True},
            )
        ),
    )
    assert seen[-1].type == "error" and "unloaded" in seen[-1].message
