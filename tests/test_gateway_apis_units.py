"""Pure parts of the gateway's other APIs: stop-string attribution, stop reasons, error shapes,
request translation and the API-key check (no I/O)."""

from __future__ import annotations

import base64

import pytest
from aiohttp.test_utils import make_mocked_request

from node.client import FinalStats
from node.cluster.stops import StopMatcher
from node.gateway import anthropic, ollama, responses
from node.gateway.app import _key_matches, error_body
from node.gateway.errors import HttpError


def stats(**changes) -> FinalStats:
    base = dict(
        engine="local",
        engine_reason="r",
        drafter_kind=None,
        num_draft_tokens=0,
        proposed_draft_tokens=0,
        accepted_draft_tokens=0,
        acceptance_rate=0.0,
        prompt_tokens=3,
        generation_tokens=5,
        prompt_tps=10.0,
        generation_tps=20.0,
        stages=[],
        finish_reason="stop",
    )
    return FinalStats(**{**base, **changes})


def test_stop_matcher_names_the_earliest_stop_even_across_deltas():
    stop = StopMatcher(["world", "lo w"])
    assert stop.feed("hel") == "he"  # "l" may begin "lo w": held back
    out = stop.feed("lo world")
    assert stop.stopped and stop.matched == "lo w"  # it starts before "world"
    assert out == "l" and stop.flush() == ""
    assert StopMatcher(["x"]).matched is None


@pytest.mark.parametrize(
    ("finish", "sequence", "reason"),
    [("length", None, "max_tokens"), ("stop", None, "end_turn"), ("stop", "\n\n", "stop_sequence")],
)
def test_anthropic_stop_reason(finish, sequence, reason):
    final = stats(finish_reason=finish, stop_sequence=sequence)
    assert anthropic.stop_reason(final) == reason
    message = anthropic.message("msg_1", "m", "hi", final)
    assert message.stop_sequence == sequence and message.usage.output_tokens == 5


def test_each_api_has_its_own_error_shape():
    error = HttpError(404, "model 'x' not found", "not_found_error", "model")
    assert error_body("/v1/messages", error) == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "model 'x' not found"},
    }
    assert error_body("/api/chat", error) == {"error": "model 'x' not found"}
    assert error_body("/v1/responses", error)["error"]["param"] == "model"
    overloaded = HttpError(503, "down", "service_unavailable_error")
    assert anthropic.error_body(overloaded)["error"]["type"] == "overloaded_error"
    assert anthropic.error_body(HttpError(502, "bad", "x"))["error"]["type"] == "api_error"


def test_translations_put_the_system_prompt_first():
    req = anthropic.MessagesRequest.model_validate(
        {
            "model": "m",
            "max_tokens": 4,
            "system": [{"type": "text", "text": "S"}],
            "messages": [{"role": "user", "content": "Q"}],
            "stop_sequences": ["END"],
        }
    )
    opts = anthropic.options(req, "id")
    assert [(m.role, m.content) for m in opts.messages] == [("system", "S"), ("user", "Q")]
    assert opts.stop == ["END"] and opts.sampling.temperature == 1.0
    chat = ollama.ChatRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "Q"}],
            "options": {"num_predict": -1},
        }
    )
    opts = ollama.chat_options(chat, "id")
    assert opts.max_tokens == 0 and opts.sampling.top_k == 40 and opts.sampling.temperature == 0.8
    resp = responses.ResponsesRequest.model_validate(
        {"model": "m", "input": [{"role": "developer", "content": "S"}], "instructions": "I"}
    )
    roles = [(m.role, m.content) for m in responses.options(resp, "id").messages]
    assert roles == [("system", "I"), ("system", "S")]


@pytest.mark.parametrize(
    ("headers", "ok"),
    [
        ({"Authorization": "Bearer k1"}, True),
        ({"x-api-key": "k1"}, True),
        ({"Authorization": "Basic " + base64.b64encode(b"anyone:k1").decode()}, True),
        ({"Authorization": "Basic " + base64.b64encode(b"k1:wrong").decode()}, False),
        ({"Authorization": "Basic !!!"}, False),
        ({"Authorization": "Bearer k2"}, False),
        ({}, False),
    ],
)
def test_the_api_key_in_every_form_clients_send_it(headers, ok):
    assert _key_matches(make_mocked_request("GET", "/", headers=headers), "k1") is ok


def test_batch_and_queue_until_and_after_an_engine_reports_its_batch():
    from node.metrics import batch_and_queue, clear_batch_size, set_batch_size

    assert batch_and_queue("i-units", "native_mtp", 0) == (0, 0)
    assert batch_and_queue("i-units", "native_mtp", 3) == (1, 2)  # one computes, two wait
    assert batch_and_queue("i-units", "pipeline", 3) == (1, 0)  # all three are at some stage
    set_batch_size("i-units", 2)
    try:
        assert batch_and_queue("i-units", "local", 3) == (2, 1)
    finally:
        clear_batch_size("i-units")
    assert batch_and_queue("i-units", "local", 3) == (1, 2)
