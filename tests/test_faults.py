"""Faults on real daemons: a stage killed mid-generation, a coordinator killed with its stages
loaded. Callers get a clear status fast, failed instances are placed again, nothing stays
orphaned, and other instances never notice."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from helpers.cluster_client import generate, launch
from helpers.daemons import DaemonCluster, wait_for

from node import rpc
from node.client import MacmeshClient, ResourceExhausted, Unavailable
from node.cluster.admission import check_memory
from node.cluster.peers import status_instances
from node.placement import InsufficientMemoryError
from node.proto.macmesh.v1 import stage_pb2, stage_pb2_grpc

MODEL = "macmesh-tiny"


def _stage_count(address: str) -> int:
    with rpc.channel(address) as channel:
        reply = stage_pb2_grpc.StageServiceStub(channel).Status(
            stage_pb2.StageStatusRequest(), timeout=5
        )
    return len(reply.stages)


def _instance(address: str, instance_id: str):
    for info in status_instances(address, timeout_s=5) or []:
        if info.instance_id == instance_id:
            return info
    return None


def test_stage_killed_mid_generation_fails_fast_and_is_placed_again(tmp_path):
    env = {"MACMESH_REPLACE_DELAY_S": "0.5"}
    with DaemonCluster(tmp_path, env=env) as cluster:
        coord = cluster.start("coord", mdns=False)
        victim = cluster.start("victim", mdns=False, peers=[coord.address])
        cluster.wait_connected([coord, victim], timeout=15)
        _, pipelined = launch(coord.address, MODEL, min_nodes=2)
        _, local = launch(coord.address, MODEL, min_nodes=1)
        assert len(pipelined.stages) == 2 and len(local.stages) == 1

        started = threading.Event()
        outcome: dict = {}

        def long_request() -> None:
            try:
                with MacmeshClient(coord.address, timeout=60) as client:
                    stream = client.generate(
                        pipelined.instance_id, "hello", max_tokens=3000, ignore_eos=True, raw=True
                    )
                    for _ in stream:
                        started.set()
                outcome["result"] = "finished"
            except Unavailable as exc:
                outcome["result"] = exc
            except Exception as exc:  # any other status is a failure of this test
                outcome["result"] = exc
            outcome["at"] = time.monotonic()

        worker = threading.Thread(target=long_request, daemon=True)
        worker.start()
        assert started.wait(30), "the request never produced a token"
        victim.kill()  # SIGKILL, mid-generation
        killed_at = time.monotonic()
        worker.join(60)  # a hang guard; the latency itself is printed, not asserted
        assert not worker.is_alive(), "the caller still hangs 60 s after the stage died"
        assert isinstance(outcome["result"], Unavailable), outcome
        print(f"caller told UNAVAILABLE {outcome['at'] - killed_at:.2f} s after the kill")

        # The other instance never noticed.
        _, ids, final = generate(coord.address, local.instance_id, max_tokens=6)
        assert len(ids) == 6 and final.engine in ("local", "native_mtp")

        # Marked failed, then placed again on the survivor under the same id.
        def replaced():
            info = _instance(coord.address, pipelined.instance_id)
            return info if info and info.state == "ready" and len(info.stages) == 1 else None

        info = wait_for(replaced, timeout=30, what="failed instance placed again")
        assert info.stages[0].node_id == coord.node_id
        log = coord.log_text()
        assert "instance failed" in log and "placing failed instance again" in log, log[-3000:]
        _, ids, _ = generate(coord.address, pipelined.instance_id, max_tokens=4)
        assert len(ids) == 4


def test_stages_unload_the_shards_of_a_dead_coordinator(tmp_path):
    with DaemonCluster(tmp_path) as cluster:
        coord = cluster.start("coord", mdns=False)
        stage = cluster.start("stage", mdns=False, peers=[coord.address])
        cluster.wait_connected([coord, stage], timeout=15)
        launch(coord.address, MODEL, min_nodes=2)
        assert _stage_count(stage.address) == 1
        coord.kill()  # SIGKILL: it never says goodbye nor unloads anything
        try:
            wait_for(
                lambda: _stage_count(stage.address) == 0,
                timeout=20,
                what="the stage unloads its orphaned shard",
            )
        except TimeoutError as exc:  # seen once in CI under heavy load: keep the evidence
            raise AssertionError(f"{exc}\n--- stage log ---\n{stage.log_text()[-4000:]}") from None
        assert "unloading shard of a gone coordinator" in stage.log_text()
        assert stage.alive()
        try:
            with MacmeshClient(stage.address, timeout=5) as client:
                client.check_health()
        except grpc.RpcError as exc:  # pragma: no cover - a clearer failure message
            raise AssertionError(f"stage unhealthy after the coordinator died: {exc}") from None


def test_memory_admission_refuses_a_launch_that_would_not_fit(tmp_path):
    check_memory(100, 1_000, 2_000, 0.10, "n")  # 100 + 200 kept free <= 1000: fits
    with pytest.raises(InsufficientMemoryError, match="keeps free"):
        check_memory(900, 1_000, 2_000, 0.10, "n")
    # A node that must keep 99% of its memory free refuses at once, with RESOURCE_EXHAUSTED,
    # although the planner (from the last heartbeat, 10% headroom) thought the model fits.
    with DaemonCluster(tmp_path, env={"MACMESH_LAUNCH_MEMORY_HEADROOM": "0.99"}) as cluster:
        node = cluster.start("full", mdns=False)
        with pytest.raises(ResourceExhausted, match="free right now"):
            launch(node.address, MODEL)
        with MacmeshClient(node.address, timeout=5) as client:
            assert client.cluster_status().instances == []
