"""The OpenAI gateway in front of real daemons: the official `openai` client, a real
`macmesh gateway` process and a real 2-node cluster on 127.0.0.1 (no test double).

The wider gateway suite (tests/test_gateway.py) drives one real daemon; this file checks the
main paths on a real 2-node cluster, with the request landing on a node that is not the
instance's coordinator."""

from __future__ import annotations

import openai
import pytest
from helpers.cluster_client import launch
from helpers.daemons import DaemonCluster
from helpers.gateway_processes import start_gateway

MODEL = "macmesh-tiny"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-gateway")
    with DaemonCluster(root) as cluster:
        coordinator = cluster.start("coord", mdns=False)
        other = cluster.start("other", mdns=False, peers=[coordinator.address])
        cluster.wait_connected([coordinator, other], timeout=15)
        launch(coordinator.address, MODEL)  # single node: native MTP on the coordinator
        gw = start_gateway(root, other.address)  # the gateway talks to the other node
        try:
            yield openai.OpenAI(base_url=gw.api, api_key="unused", max_retries=0, timeout=120)
        finally:
            gw.stop()


def test_models_list_native_mtp(gateway: openai.OpenAI) -> None:
    models = {m.id: m for m in gateway.models.list().data}
    assert MODEL in models
    native = models[MODEL].model_extra["native_mtp"]
    assert native["default_k"] >= 1 and native["max_k"] >= native["default_k"]


def test_chat_completion_reports_native_mtp_stats(gateway: openai.OpenAI) -> None:
    reply = gateway.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What does the os module do?"}],
        max_tokens=16,
        temperature=0,
        extra_body={"ignore_eos": True, "mtp_k": 2},
    )
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens == 16
    stats = reply.model_extra["macmesh"]
    assert stats["engine"] == "native_mtp"
    assert stats["drafter_kind"] == "native_mtp"
    assert stats["num_draft_tokens"] == 2
    assert stats["proposed_draft_tokens"] > 0
    assert stats["time_to_first_token_seconds"] >= stats["queue_seconds"] >= 0.0
    assert stats["time_to_first_token_seconds"] > 0.0


def test_streamed_completion_equals_the_plain_one(gateway: openai.OpenAI) -> None:
    args = dict(model=MODEL, prompt="The list type", max_tokens=12, temperature=0)
    plain = gateway.completions.create(**args, extra_body={"ignore_eos": True})
    chunks = gateway.completions.create(**args, stream=True, extra_body={"ignore_eos": True})
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == plain.choices[0].text
    assert plain.usage.completion_tokens == 12


def test_unknown_model_is_404_and_bad_input_400(gateway: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        gateway.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    with pytest.raises(openai.BadRequestError):
        gateway.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-1
        )
