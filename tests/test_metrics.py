"""Prometheus metrics, scraped from real daemons (``macmesh run --metrics-port 0``) and a real
gateway in front of a real 2-node cluster, and parsed with prometheus_client's own parser.

The cluster runs two instances of the bundled model on the coordinator: one single-node
(native MTP) and one pipelined across both nodes. Requests go through the gateway to the
*other* node, which relays them to the coordinator: the coordinator counts them, the relay
counts relays, the stage node times every activation it passes on, and the gateway counts what
its clients asked. Every expected count comes from the requests' own final stats.
"""

from __future__ import annotations

import json
from collections import defaultdict

import openai
import pytest
import requests
from helpers.cluster_client import launch
from helpers.daemons import PATIENCE_S, DaemonCluster, wait_for
from helpers.gateway_processes import start_gateway
from prometheus_client.parser import text_string_to_metric_families

MODEL = "macmesh-tiny"
TOKENS = 8


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name -> [(labels, value)], from the Prometheus text at ``url``."""
    reply = requests.get(url, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.headers["Content-Type"].startswith("text/plain")
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels``."""
    found = [v for ls, v in samples.get(name, []) if labels.items() <= ls.items()]
    assert found, f"no {name} {labels} in {sorted(samples)}"
    return sum(found)


def settled(url: str, name: str, expected: float, **labels: str) -> dict:
    """Scrape ``url`` until counter ``name`` reaches ``expected``: a server counts a request when
    its handler returns, which can be just after the client read the last message."""

    def scraped() -> dict | None:
        samples = scrape(url)
        found = [v for ls, v in samples.get(name, []) if labels.items() <= ls.items()]
        return samples if found and sum(found) == expected else None

    return wait_for(scraped, timeout=PATIENCE_S, what=f"{name}{labels} == {expected} at {url}")


def metrics_url(daemon) -> str:
    port = json.loads((daemon.state_dir / "daemon.json").read_text())["metrics_port"]
    assert port, "the daemon did not report its metrics port"
    return f"http://127.0.0.1:{port}/metrics"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    with DaemonCluster(root) as daemons:
        extra = ["--metrics-port", "0"]
        coord = daemons.start("coord", mdns=False, extra_args=extra)
        other = daemons.start("other", mdns=False, peers=[coord.address], extra_args=extra)
        daemons.wait_connected([coord, other], timeout=15)
        _, pipelined = launch(coord.address, MODEL, min_nodes=2)
        _, single = launch(coord.address, MODEL, min_nodes=1)
        assert len(pipelined.stages) == 2 and single.engine == "native_mtp"
        gw = start_gateway(root, other.address)
        client = openai.OpenAI(base_url=gw.api, api_key="unused", max_retries=0, timeout=120)
        try:
            yield {
                "coord": coord,
                "other": other,
                "gateway": gw,
                "client": client,
                "pipelined": pipelined,
                "single": single,
            }
        finally:
            gw.stop()


def chat(client: openai.OpenAI, model: str, **extra) -> dict:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What does the os module do?"}],
        max_tokens=TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True, **extra},
    )
    return reply.model_extra["macmesh"]


def test_requests_tokens_latency_mtp_and_hops_are_counted_where_they_happen(cluster):
    client, single, pipelined = cluster["client"], cluster["single"], cluster["pipelined"]
    mtp = [chat(client, single.instance_id, mtp_k=2) for _ in range(2)]
    piped = [chat(client, pipelined.instance_id) for _ in range(2)]
    assert {s["engine"] for s in mtp} == {"native_mtp"} and {s["engine"] for s in piped} == {
        "pipeline"
    }
    with pytest.raises(openai.NotFoundError):
        chat(client, "no-such-model")

    coord = settled(
        metrics_url(cluster["coord"]), "macmesh_inter_token_latency_seconds_count", 4 * (TOKENS - 1)
    )
    coord = settled(
        metrics_url(cluster["coord"]),
        "macmesh_requests_total",
        2,
        engine="pipeline",
        outcome="length",
    )
    assert value(coord, "macmesh_requests_total", engine="native_mtp", outcome="length") == 2
    assert value(coord, "macmesh_requests_total", engine="pipeline", outcome="length") == 2
    for engine, stats in (("native_mtp", mtp), ("pipeline", piped)):
        generated = sum(s["generation_tokens"] for s in stats)
        assert value(coord, "macmesh_generation_tokens_total", engine=engine) == generated
        prompt = sum(s["prompt_tokens"] for s in stats)
        assert value(coord, "macmesh_prompt_tokens_total", engine=engine) == prompt
    assert value(coord, "macmesh_time_to_first_token_seconds_count") == 4
    assert value(coord, "macmesh_inter_token_latency_seconds_count") == 4 * (TOKENS - 1)
    assert value(coord, "macmesh_time_to_first_token_seconds_sum") > 0
    proposed = value(coord, "macmesh_mtp_proposed_draft_tokens_total", instance=single.instance_id)
    accepted = value(coord, "macmesh_mtp_accepted_draft_tokens_total", instance=single.instance_id)
    assert proposed == sum(s["proposed_draft_tokens"] for s in mtp) > 0
    assert accepted == sum(s["accepted_draft_tokens"] for s in mtp)
    assert (
        value(coord, "macmesh_node_memory_total_bytes")
        >= value(coord, "macmesh_node_memory_available_bytes")
        > 0
    )
    for instance in (single, pipelined):
        labels = {"instance": instance.instance_id}
        assert value(coord, "macmesh_instance_requests_in_flight", **labels) == 0
        assert value(coord, "macmesh_queue_length", **labels) == 0
        assert value(coord, "macmesh_batch_size", **labels) == 0

    other = settled(metrics_url(cluster["other"]), "macmesh_relayed_requests_total", 4)
    assert value(other, "macmesh_relayed_requests_total") == 4
    assert value(other, "macmesh_time_to_first_token_seconds_count") == 0  # timed once, there
    assert value(other, "macmesh_inter_token_latency_seconds_count") == 0
    assert value(other, "macmesh_requests_total", engine="none", outcome="not_found") == 1
    assert "macmesh_requests_total" not in other or not any(
        ls.get("outcome") == "length" for ls, _ in other["macmesh_requests_total"]
    )
    # every token of the pipelined requests was sampled on its last stage; which node that is
    # follows the nodes' free memory at launch time, so it is read from the placement
    last = pipelined.stages[-1].node_id
    holder = next(d for d in (cluster["coord"], cluster["other"]) if d.node_id == last)
    stage_node = scrape(metrics_url(holder))
    hops = value(stage_node, "macmesh_stage_forward_seconds_count", instance=pipelined.instance_id)
    assert hops == sum(s["generation_tokens"] for s in piped)
    assert (
        value(stage_node, "macmesh_stage_forward_seconds_sum", instance=pipelined.instance_id) > 0
    )

    gateway = settled(
        f"{cluster['gateway'].url}/metrics", "macmesh_gateway_time_to_first_token_seconds_count", 4
    )
    requests_total = "macmesh_gateway_requests_total"
    assert (
        value(gateway, requests_total, api="openai_chat", engine="native_mtp", outcome="length")
        == 2
    )
    assert (
        value(gateway, requests_total, api="openai_chat", engine="pipeline", outcome="length") == 2
    )
    assert value(gateway, requests_total, api="openai_chat", outcome="not_found") == 1
    assert (
        value(gateway, "macmesh_gateway_generation_tokens_total", api="openai_chat") == 4 * TOKENS
    )
    assert value(gateway, "macmesh_gateway_time_to_first_token_seconds_count") == 4
    assert (
        value(gateway, "macmesh_gateway_mtp_accepted_draft_tokens_total", model=single.instance_id)
        == accepted
    )
    nodes = {ls["node"] for ls, _ in gateway["macmesh_cluster_node_memory_total_bytes"]}
    assert nodes == {cluster["coord"].node_id, cluster["other"].node_id}
    engines = {ls["engine"] for ls, _ in gateway["macmesh_cluster_instance_stages"]}
    assert engines == {"native_mtp", "pipeline"}
    assert value(gateway, "macmesh_cluster_instance_stages", instance=pipelined.instance_id) == 2
    assert value(gateway, "macmesh_gateway_cluster_up") == 1


def test_queue_length_and_batch_size_while_requests_wait(cluster):
    """Two long requests on the single-node instance (max_batch 8): both are admitted and,
    once the batch has taken them in (the first native-MTP request measures the instance's
    costs before it joins), both decode together and none waits."""
    client, single = cluster["client"], cluster["single"]
    args = dict(
        model=single.instance_id,
        messages=[{"role": "user", "content": "Tell me everything."}],
        max_tokens=20000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    first = client.chat.completions.create(**args)
    next(iter(first))  # it computes
    second = client.chat.completions.create(**args)  # returns once the node admitted it
    labels = {"instance": single.instance_id}

    def both_in_the_batch() -> dict | None:
        coord = scrape(metrics_url(cluster["coord"]))
        return coord if value(coord, "macmesh_batch_size", **labels) == 2 else None

    try:
        coord = wait_for(both_in_the_batch, timeout=PATIENCE_S, what="a batch of 2")
        assert value(coord, "macmesh_instance_requests_in_flight", **labels) == 2
        assert value(coord, "macmesh_queue_length", **labels) == 0
    finally:
        first.close()
        second.close()


def test_a_metrics_port_in_use_fails_the_start_and_names_the_port(tmp_path):
    import socket

    with socket.socket() as taken, DaemonCluster(tmp_path) as daemons:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = daemons.spawn("busy", mdns=False, extra_args=["--metrics-port", str(port)])
        assert daemon.proc.wait(timeout=120) == 1, daemon.log_text()
        assert f"cannot serve metrics on port {port}" in daemon.log_text()
        assert not (daemon.state_dir / "daemon.json").exists()  # it never joined a cluster
