"""Cached prompt tokens reach every API's usage, read by the official clients.

A real daemon serves a tiny dense checkpoint (``local`` engine, prompt cache on by default)
behind a real ``macmesh gateway``. A two-turn chat through the ``openai`` client: the second
turn reports the tokens its prompt shared with the first in
``usage.prompt_tokens_details.cached_tokens``. The same second turn again through the
``anthropic`` client (``cache_read_input_tokens``, with ``input_tokens`` the rest) and the
OpenAI Responses API (``usage.input_tokens_details.cached_tokens``): all but the last prompt
token come from the cache, and the text is the same greedy text. The daemon's and the
gateway's ``/metrics`` count the hits and the tokens served.
"""

from __future__ import annotations

import anthropic
import openai
import pytest
from helpers.cluster_client import launch
from helpers.daemons import DaemonCluster
from helpers.gateway_processes import start_gateway
from test_metrics import metrics_url, settled

from node.checkpoints import PRESETS, ensure_checkpoint

SYSTEM = "You are a careful assistant who answers in one short sentence. " * 6


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt-cache-gateway")
    with DaemonCluster(root) as cluster:
        node = cluster.start("node", mdns=False, extra_args=["--metrics-port", "0"])
        _, instance = launch(node.address, str(ensure_checkpoint(PRESETS["dense-stripped"])))
        gw = start_gateway(root, node.address)
        try:
            yield gw, instance.instance_id, node
        finally:
            gw.stop()


def test_cached_tokens_in_openai_anthropic_and_responses_usage(gateway) -> None:
    gw, model, node = gateway
    oai = openai.OpenAI(base_url=gw.api, api_key="none", max_retries=0, timeout=120)
    claude = anthropic.Anthropic(base_url=gw.url, api_key="none", max_retries=0, timeout=120)
    greedy = {"ignore_eos": True}

    def chat(messages: list[dict]) -> openai.types.chat.ChatCompletion:
        return oai.chat.completions.create(
            model=model, messages=messages, max_tokens=8, temperature=0, extra_body=greedy
        )

    conversation = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "How do I open a file?"},
    ]
    first = chat(conversation)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    conversation += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And close it?"},
    ]
    second = chat(conversation)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # At least the first prompt's snapshot (all but its last token) serves the second turn.
    assert first.usage.prompt_tokens - 1 <= cached < second.usage.prompt_tokens
    assert second.model_extra["macmesh"]["cached_prompt_tokens"] == cached
    total = second.usage.prompt_tokens
    expected = second.choices[0].message.content

    # The same second turn again: now its own prompt-end snapshot serves all but one token.
    reply = claude.messages.create(
        model=model,
        max_tokens=8,
        system=SYSTEM,
        messages=conversation[1:],
        extra_body={"temperature": 0, **greedy},
    )
    assert reply.content[0].text == expected
    assert reply.usage.cache_read_input_tokens == total - 1
    assert reply.usage.input_tokens == 1
    with claude.messages.stream(
        model=model,
        max_tokens=8,
        system=SYSTEM,
        messages=conversation[1:],
        extra_body={"temperature": 0, **greedy},
    ) as stream:
        assert "".join(stream.text_stream) == expected
        final = stream.get_final_message()
    assert final.usage.cache_read_input_tokens == total - 1

    response = oai.responses.create(
        model=model,
        input=conversation,
        max_output_tokens=8,
        temperature=0,
        extra_body=greedy,
    )
    assert response.output_text == expected
    assert response.usage.input_tokens == total
    assert response.usage.input_tokens_details.cached_tokens == total - 1

    # Four requests hit (the second turn, then the same turn three times).
    served = cached + 3 * (total - 1)
    for url, prefix in ((metrics_url(node), "macmesh"), (f"{gw.url}/metrics", "macmesh_gateway")):
        samples = settled(url, f"{prefix}_prompt_cache_hits_total", 4, engine="local")
        tokens = samples[f"{prefix}_prompt_cache_hit_tokens_total"]
        assert sum(v for labels, v in tokens if labels["engine"] == "local") == served, url
