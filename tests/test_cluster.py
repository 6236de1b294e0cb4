"""The cluster as a product, on three real daemons (``macmesh run`` processes on 127.0.0.1).

One cluster for the module (starting daemons is the expensive part): node1 coordinates a
pipelined instance over all three nodes, node2 a single-node native-MTP instance (and admits
one request at a time: ``MACMESH_MAX_QUEUED_REQUESTS=1``), node3 coordinates nothing and is
where most requests are sent, so they are relayed. The last test kills node3.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
import typer
from helpers.cluster_client import generate, launch, raw_generate, status_code, stub
from helpers.daemons import DaemonCluster, wait_for
from typer.testing import CliRunner

from node import rpc
from node.cli import app
from node.client import DeadlineExceeded, MacmeshClient, ResourceExhausted, Unavailable
from node.cluster.peers import status_instances
from node.commands import launch as launch_command
from node.proto.macmesh.v1 import inference_pb2 as pb
from node.proto.macmesh.v1 import stage_pb2, stage_pb2_grpc

MODEL = "macmesh-tiny"
LONG = {"max_tokens": 3000, "ignore_eos": True}  # runs for seconds: long enough to interrupt


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cluster")
    with DaemonCluster(root) as daemons:
        node1 = daemons.start("node1", mdns=False)
        spawned = [
            daemons.spawn(
                "node2", mdns=False, peers=[node1.address], env={"MACMESH_MAX_QUEUED_REQUESTS": "1"}
            ),
            daemons.spawn("node3", mdns=False, peers=[node1.address]),
        ]
        node2, node3 = (daemons.wait_ready(d) for d in spawned)
        daemons.wait_connected([node1, node2, node3], timeout=15)
        pipe_lines, pipelined = launch(node1.address, MODEL, min_nodes=3)
        yield {
            "nodes": (node1, node2, node3),
            "pipelined": pipelined,
            "pipe_lines": pipe_lines,
            "daemons": daemons,
        }


def stage_status(address: str) -> list:
    with rpc.channel(address) as channel:
        reply = stage_pb2_grpc.StageServiceStub(channel).Status(
            stage_pb2.StageStatusRequest(), timeout=5
        )
    return list(reply.stages)


def instances(address: str) -> dict:
    """Instance id -> ``InstanceInfo`` (with in_flight, aliases, ...) as ``address`` sees it."""
    return {i.instance_id: i for i in status_instances(address, timeout_s=10) or []}


def test_launch_streams_progress_and_every_node_sees_the_instances(cluster) -> None:
    node1, node2, node3 = cluster["nodes"]
    pipelined = cluster["pipelined"]
    assert pipelined.engine == "pipeline" and "3 nodes" in pipelined.engine_reason
    assert pipelined.coordinator_node_id == node1.node_id
    assert {s.node_id for s in pipelined.stages} == {node1.node_id, node2.node_id, node3.node_id}
    assert pipelined.stages[0].start_layer == 0 and pipelined.stages[-1].end_layer == 4
    lines = cluster["pipe_lines"]
    assert lines[0].startswith("placement (3 stages)")
    assert sum("ready on" in line for line in lines) == 3, lines

    # The CLI: `macmesh launch` on node2 makes node2 the coordinator of a single-node instance.
    result = CliRunner().invoke(app, ["launch", MODEL, "--node", node2.address, "--json"])
    assert result.exit_code == 0, result.output
    single = json.loads(result.stdout)
    assert single["engine"] == "native_mtp" and single["coordinator_node_id"] == node2.node_id
    assert "loading layer 3 on node2" in result.stderr and "native MTP head ready" in result.stderr
    cluster["single"] = single

    for node in (node1, node2, node3):
        seen = instances(node.address)
        assert set(seen) == {pipelined.instance_id, single["instance_id"]}, node.name
        assert seen[single["instance_id"]].engine_reason == single["engine_reason"]


def test_generate_from_any_node_reaches_the_coordinator_with_its_stages(cluster) -> None:
    node1, node2, node3 = cluster["nodes"]
    pipelined, single = cluster["pipelined"], cluster["single"]
    _, pipe_ids, pipe = generate(node3.address, MODEL, engine="pipeline", max_tokens=12)
    assert pipe.engine == "pipeline" and pipe.engine_reason == pipelined.engine_reason
    assert [(s.node_id, s.start_layer, s.end_layer) for s in pipe.stages] == [
        (s.node_id, s.start_layer, s.end_layer) for s in pipelined.stages
    ]
    addresses = {n.node_id: n.address for n in (node1, node2, node3)}
    assert all(s.address == addresses[s.node_id] for s in pipe.stages)

    _, mtp_ids, mtp = generate(node1.address, MODEL, engine="native_mtp", max_tokens=12)
    assert mtp.engine == "native_mtp" and [s.node_id for s in mtp.stages] == [node2.node_id]
    assert mtp_ids == pipe_ids  # both engines are exact: greedy gives the same tokens

    # `macmesh generate --node` from a node that coordinates nothing: same JSON as --local.
    result = CliRunner().invoke(
        app,
        ["generate", MODEL, "The os module", "--node", node3.address, "--raw", "--json",
         "--max-tokens", "12", "--engine", "native_mtp"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["token_ids"] == mtp_ids and out["text"]
    stats = out["stats"]
    assert stats["engine"] == "native_mtp" and stats["drafter_kind"] == "native_mtp"
    assert stats["stages"] == [
        {"node_id": node2.node_id, "start_layer": 0, "end_layer": 4, "address": node2.address}
    ]
    assert stats["engine_reason"] == single["engine_reason"]

    # Status now shows the recent decode speed of both instances, from any node.
    seen = instances(node2.address)
    assert seen[pipelined.instance_id].recent_generation_tps > 0
    assert seen[single["instance_id"]].recent_generation_tps > 0
    table = CliRunner().invoke(app, ["status", "--node", node3.address], env={"COLUMNS": "160"})
    assert table.exit_code == 0, table.output
    for text in (pipelined.instance_id, single["instance_id"], "native_mtp", "pipeline", "tok/s"):
        assert text in table.output
    assert "head recovered" in table.output  # the reason
    as_json = CliRunner().invoke(app, ["status", "--node", node1.address, "--json"])
    data = json.loads(as_json.stdout)
    assert len(data["nodes"]) == 3
    by_id = {i["instance_id"]: i for i in data["instances"]}
    assert by_id[pipelined.instance_id]["stages"][0]["node_id"] == pipelined.stages[0].node_id
    assert by_id[single["instance_id"]]["requests_served"] == 2


def test_stop_strings_and_chat_messages(cluster) -> None:
    node3 = cluster["nodes"][2]
    sampled = {"temperature": 0.8, "seed": 3}
    text, _, _ = generate(
        node3.address, MODEL, engine="native_mtp", max_tokens=16, sampling=sampled
    )
    assert len(text) >= 6, text
    stop = text[3:6]
    cut, _, stats = generate(
        node3.address, MODEL, engine="native_mtp", max_tokens=16, sampling=sampled, stop=[stop]
    )
    assert cut == text[: text.find(stop)] and stats.finish_reason == "stop"

    with MacmeshClient(node3.address, timeout=60) as client:
        events = list(
            client.generate(
                MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, engine="pipeline"
            )
        )
    final = events[-1]
    assert final.kind == "final" and final.engine == "pipeline"
    assert final.prompt_tokens > 3  # the chat template wrapped the one-word turn


def test_models_and_place_from_any_node(cluster) -> None:
    node1, node2, _ = cluster["nodes"]
    with MacmeshClient(node1.address, timeout=10) as client:
        models = {m.id: m for m in client.list_models()}
        placement = client.place(MODEL, min_nodes=2)
        client.check_health()  # grpc.health.v1 says InferenceService is SERVING
    assert models[MODEL].launched and models[MODEL].native_mtp.default_k == 2  # type: ignore[union-attr]
    assert models["Qwen3.6-27B"].native_mtp.max_k == 8  # type: ignore[union-attr]  # the K policy decides depth
    assert not models["Qwen3.6-27B"].launched
    assert len(placement.stages) == 2 and placement.stages[-1].end_layer == 4
    listed = CliRunner().invoke(app, ["models", "--node", node2.address, "--json"])
    assert listed.exit_code == 0, listed.output
    assert any(m["id"] == MODEL and m["launched"] for m in json.loads(listed.stdout))


def test_status_codes(cluster) -> None:
    node3 = cluster["nodes"][2]
    pipelined = cluster["pipelined"]
    _, api = stub(node3.address)
    C = grpc.StatusCode

    def gen(**fields):
        return lambda: raw_generate(node3.address, pb.GenerateRequest(**fields))

    cases = [
        (gen(text="x"), C.INVALID_ARGUMENT, "model is empty"),
        (gen(model=MODEL), C.INVALID_ARGUMENT, "no prompt"),
        (
            gen(model=MODEL, text="x", sampling=pb.SamplingParams(temperature=-1)),
            C.INVALID_ARGUMENT,
            "temperature",
        ),
        (gen(model=MODEL, prompt_ids=pb.TokenIds(ids=[10**6])), C.INVALID_ARGUMENT, "vocabulary"),
        (lambda: api.Unload(pb.UnloadRequest(), timeout=10), C.INVALID_ARGUMENT, "model or"),
        (gen(model="Qwen3.6-27B", text="x"), C.NOT_FOUND, "macmesh launch Qwen3.6-27B"),
        (
            lambda: list(api.Launch(pb.LaunchRequest(model="no-such-model"), timeout=10)),
            C.NOT_FOUND,
            "unknown model",
        ),
        (
            lambda: list(api.Launch(pb.LaunchRequest(model="tiny-qwen3.5-dense"), timeout=10)),
            C.NOT_FOUND,
            "weights are not on this node",
        ),
        (lambda: api.Place(pb.PlaceRequest(model="nope"), timeout=10), C.NOT_FOUND, "nope"),
        (lambda: api.Unload(pb.UnloadRequest(model="nope"), timeout=10), C.NOT_FOUND, "nope"),
        (
            gen(model=pipelined.instance_id, text="x", engine="local"),
            C.FAILED_PRECONDITION,
            "spans 3 nodes",
        ),
        (
            lambda: api.Place(pb.PlaceRequest(model="Qwen3.5-122B-A10B-4bit"), timeout=10),
            C.RESOURCE_EXHAUSTED,
            "",
        ),
        (
            lambda: list(api.Launch(pb.LaunchRequest(model="Qwen3.5-122B-A10B-4bit"), timeout=10)),
            C.RESOURCE_EXHAUSTED,
            "",
        ),
        (
            lambda: api.Place(pb.PlaceRequest(model=MODEL, min_nodes=9), timeout=10),
            C.INVALID_ARGUMENT,
            "min_nodes 9",
        ),
    ]
    for call, code, text in cases:
        got, details = status_code(call)
        assert (got, text in details) == (code, True), details

    # RESOURCE_EXHAUSTED: node2 admits one request per instance; a second one is refused.
    with MacmeshClient(node3.address, timeout=60) as client:
        running = client.generate(MODEL, "x", engine="native_mtp", raw=True, **LONG)
        running.wait_started()
        next(iter(running))
        with pytest.raises(ResourceExhausted, match="limit is 1"):
            list(client.generate(MODEL, "y", engine="native_mtp", raw=True, max_tokens=2))
        running.close()


def test_cancel_and_deadline_free_the_request_everywhere(cluster) -> None:
    node1, node2, node3 = cluster["nodes"]
    pipelined, single = cluster["pipelined"], cluster["single"]

    def idle() -> bool:
        seen = instances(node1.address)
        busy = seen[pipelined.instance_id].in_flight + seen[single["instance_id"]].in_flight
        cached = [s.cached_requests for n in (node1, node2, node3) for s in stage_status(n.address)]
        return busy == 0 and not any(cached)

    with MacmeshClient(node3.address, timeout=60) as client:
        stream = client.generate(MODEL, "x", engine="pipeline", raw=True, **LONG)
        deltas = [next(stream) for _ in range(3)]
        assert all(d.kind == "delta" for d in deltas)
        busy = instances(node1.address)[pipelined.instance_id]
        assert busy.in_flight == 1
        stream.close()  # the client goes away: every stage frees the request's caches
    wait_for(idle, timeout=10, what="pipeline request released on every stage")

    began = time.monotonic()
    with MacmeshClient(node1.address) as client, pytest.raises(DeadlineExceeded):
        list(client.generate(MODEL, "x", engine="native_mtp", raw=True, timeout=0.5, **LONG))
    print(f"deadline of 0.5 s reported after {time.monotonic() - began:.2f} s")
    wait_for(idle, timeout=10, what="native MTP request ended at its deadline")


def test_unload_from_another_node_frees_every_stage(cluster) -> None:
    node1, node2, node3 = cluster["nodes"]
    pipelined = cluster["pipelined"]
    before = {
        n.name: [s.shard.instance_id for s in stage_status(n.address)] for n in (node2, node3)
    }
    assert all(pipelined.instance_id in ids for ids in before.values()), before
    # `unload` (node/commands/launch.py) is not registered in node.cli yet: a one-command app.
    unload_app = typer.Typer()
    unload_app.command()(launch_command.unload)
    result = CliRunner().invoke(
        unload_app, ["--instance", pipelined.instance_id, "--node", node3.address]
    )
    assert result.exit_code == 0, result.output
    assert "unloaded 1 instance" in result.stdout
    for node in (node1, node2, node3):
        assert not [
            s for s in stage_status(node.address) if s.shard.instance_id == pipelined.instance_id
        ]
        assert pipelined.instance_id not in instances(node.address)


def test_unloading_an_instance_ends_its_running_requests_as_unavailable(cluster) -> None:
    node1, _, node3 = cluster["nodes"]
    _, extra = launch(node1.address, MODEL)  # a second single-node instance, on node1
    assert extra.coordinator_node_id == node1.node_id and extra.engine == "native_mtp"
    with MacmeshClient(node3.address, timeout=60) as client:
        running = client.generate(extra.instance_id, "x", raw=True, **LONG)
        assert next(running).kind == "delta"
        assert client.unload(instance_id=extra.instance_id) == 1
        with pytest.raises(Unavailable, match="was unloaded"):
            list(running)
    assert extra.instance_id not in instances(node3.address)


def test_unload_frees_mlx_memory_in_the_coordinator(tmp_path) -> None:
    """A single-node instance lives in the daemon process: after Unload, MLX's active memory
    is back where it was (measured inside a daemon run in a subprocess)."""
    script = textwrap.dedent(
        f"""
        import gc, json, os, sys
        import mlx.core as mx
        from node.config import Settings
        from node.daemon import Daemon
        from node.cluster.service import install
        from node.client import MacmeshClient
        d = Daemon(Settings(name="mem", grpc_port=0, interface="127.0.0.1", mdns=False,
                            state_dir={str(tmp_path)!r}, models_dir={str(tmp_path)!r}))
        install(d)
        d.start()
        base = mx.get_active_memory()
        with MacmeshClient(d.client_address()) as c:
            for e in c.launch("{MODEL}"):
                pass
            for e in c.generate("{MODEL}", "x", raw=True, max_tokens=8):
                pass
            loaded = mx.get_active_memory()
            c.unload("{MODEL}")
        after = mx.get_active_memory()
        d.stop()
        print(json.dumps({{"base": base, "loaded": loaded, "after": after,
                           "cache": mx.get_cache_memory()}}), flush=True)
        os._exit(0)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    assert mem["loaded"] - mem["base"] > 10 * 2**20  # the weights and the MTP head
    assert mem["after"] - mem["base"] < 2**20, mem  # gone again
    assert mem["cache"] < 2**20, mem  # and given back, not kept in MLX's buffer cache


def test_a_stage_node_going_down_makes_its_instance_unavailable(cluster) -> None:
    node1, node2, node3 = cluster["nodes"]
    _, instance = launch(node1.address, MODEL, min_nodes=3)
    node3.kill()  # SIGKILL: no goodbye
    code, details = status_code(
        lambda: raw_generate(
            node1.address,
            pb.GenerateRequest(model=instance.instance_id, text="x", max_tokens=4),
            timeout=20,
        )
    )
    assert code is grpc.StatusCode.UNAVAILABLE, details
    failed = wait_for(
        lambda: instances(node1.address)[instance.instance_id].state == "failed",
        timeout=15,
        what="instance marked failed once node3 is down",
    )
    assert failed
    assert "node3" in instances(node2.address)[instance.instance_id].engine_reason
    # Its surviving stages were unloaded already; Unload forgets the record.
    wait_for(
        lambda: (
            not [
                s
                for s in stage_status(node2.address)
                if s.shard.instance_id == instance.instance_id
            ]
        ),
        timeout=10,
        what="surviving stage unloaded",
    )
    with MacmeshClient(node2.address, timeout=30) as client:
        assert client.unload(instance_id=instance.instance_id) == 1
