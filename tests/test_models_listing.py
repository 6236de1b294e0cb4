"""Every launched instance is listed under the id a client must send, and reachable by it.

A real 2-node cluster on 127.0.0.1, a checkpoint launched by its *path* (outside every models
directory), a real `macmesh gateway` in front of the node that does not coordinate it, and the
official `openai` client: the instance shows in /v1/models under its card id and answers a
chat completion sent with that id. Cards without local weights say so, and where to get them.
"""

from __future__ import annotations

import shutil

import openai
import pytest
from helpers.cluster_client import launch
from helpers.daemons import DaemonCluster
from helpers.gateway_processes import start_gateway

from node.client import MacmeshClient
from node.models import bundled_model_path

NAME = "my-path-model"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("listing")
    checkpoint = root / "elsewhere" / NAME
    shutil.copytree(bundled_model_path(), checkpoint)
    env = {"HF_HUB_CACHE": str(root / "hf-cache"), "HF_HUB_OFFLINE": "1"}
    with DaemonCluster(root, env=env) as c:
        coordinator = c.start("coord", mdns=False)
        other = c.start("other", mdns=False, peers=[coordinator.address])
        c.wait_connected([coordinator, other], timeout=15)
        _, instance = launch(coordinator.address, str(checkpoint))
        gw = start_gateway(root, other.address)
        try:
            yield coordinator, other, gw, instance, checkpoint
        finally:
            gw.stop()


def test_path_launched_instance_is_listed_and_usable_by_that_id(cluster) -> None:
    _, _, gw, instance, checkpoint = cluster
    assert instance.model == str(checkpoint)  # launched by path...
    client = openai.OpenAI(base_url=gw.api, api_key="unused", max_retries=0, timeout=120)
    models = {m.id: m for m in client.models.list().data}
    assert NAME in models, sorted(models)  # ...listed under a name a remote client can send
    assert models[NAME].model_extra["launched"] is True
    assert models[NAME].model_extra["has_weights"] is True
    assert models["Qwen3.6-27B"].model_extra["has_weights"] is False
    assert models[NAME].model_extra["native_mtp"]["max_k"] >= 1
    assert not any(m.startswith("/") for m in models)
    reply = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "What does the os module do?"}],
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage.completion_tokens == 8
    assert reply.model_extra["macmesh"]["engine"] == "native_mtp"


def test_list_models_marks_cards_without_weights(cluster) -> None:
    _, other, _, _, _ = cluster
    with MacmeshClient(other.address, timeout=30) as c:
        models = {m.id: m for m in c.list_models()}
    entry = models[NAME]
    assert entry.launched and entry.has_weights and entry.source == "instance"
    card = models["Qwen3.6-27B"]  # a shipped card, no weights on this node
    assert not card.has_weights and not card.launched
    assert card.download_from == ["Qwen/Qwen3.6-27B", "mlx-community/Qwen3.6-27B-bf16"]
    assert models["macmesh-tiny"].has_weights and models["macmesh-tiny"].source == "bundled"
