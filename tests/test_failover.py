"""Coordinator failover on real daemons: a SIGKILLed coordinator's multi-node instances are
taken over by a stage holder (the live one with the lowest node id), keep their id and their
surviving stages' weights, get only the lost layer ranges placed again, and generate again
exactly as mlx-lm does. Requests in flight are told UNAVAILABLE naming the dead node; new ones
meet UNAVAILABLE naming it (never NOT_FOUND) until the take-over is done. Where the survivors
cannot honour the launch's min_nodes, status and logs say why and no weights stay orphaned."""

from __future__ import annotations

import re
import threading
import time

import grpc
import mlx.core as mx
import pytest
from helpers.cluster_client import generate, launch, status_code, stub
from helpers.daemons import PATIENCE_S, DaemonCluster, wait_for
from mlx_lm.generate import generate_step

from node import rpc
from node.client import MacmeshClient, MacmeshError, Unavailable
from node.cluster.failover import lost_nodes, replace_missing, successor
from node.cluster.instances import InstanceInfo, InstanceUnavailable, StageRef, pick_instance
from node.cluster.peers import FORWARDED, status_instances
from node.inference.loading import load_checkpoint
from node.placement import NodeCapacity, PlacementError, resolve_card
from node.placement.resolve import BUNDLED_MODELS_DIR
from node.proto.macmesh.v1 import inference_pb2 as pb
from node.proto.macmesh.v1 import stage_pb2, stage_pb2_grpc
from node.security import NODE_KEY

MODEL = "macmesh-tiny"
PROMPT = [11, 402, 97, 1500, 23, 7, 640, 3001]
TOKENS = 10
GiB = 1 << 30


def _reference() -> list[int]:
    """mlx-lm's own greedy continuation of PROMPT on one node: the independent reference."""
    model = load_checkpoint(BUNDLED_MODELS_DIR / MODEL).model
    steps = generate_step(
        mx.array(PROMPT), model, max_tokens=TOKENS, sampler=lambda x: mx.argmax(x, -1)
    )
    return [int(t) for t, _ in steps]


def _ids(address: str, instance_id: str) -> tuple[list[int], str]:
    _, ids, final = generate(address, instance_id, None, prompt_ids=PROMPT, max_tokens=TOKENS)
    return ids, final.engine


def _instance(address: str, instance_id: str) -> InstanceInfo | None:
    for info in status_instances(address, timeout_s=5) or []:
        if info.instance_id == instance_id:
            return info
    return None


def _runtime(address: str, instance_id: str) -> stage_pb2.StageStatus | None:
    """The stage this node holds for the instance (its StageService), if any."""
    with rpc.channel(address) as channel:
        reply = stage_pb2_grpc.StageServiceStub(channel).Status(
            stage_pb2.StageStatusRequest(instance_id=instance_id), timeout=5
        )
    return reply.stages[0] if reply.stages else None


def _in_flight(address: str, instance_id: str, started: threading.Event, outcome: dict) -> None:
    try:
        with MacmeshClient(address, timeout=120) as client:
            for _ in client.generate(
                instance_id, prompt_ids=PROMPT, max_tokens=3000, ignore_eos=True, raw=True
            ):
                started.set()
        outcome["result"] = "finished"
    except MacmeshError as exc:
        outcome["result"] = exc


def test_a_killed_coordinator_is_replaced_by_a_stage_holder(tmp_path):
    expected = _reference()
    with DaemonCluster(tmp_path) as cluster:
        first = cluster.start("n1", mdns=False)
        nodes = [
            first,
            *(cluster.start(f"n{i}", mdns=False, peers=[first.address]) for i in (2, 3, 4)),
        ]
        cluster.wait_connected(nodes, timeout=PATIENCE_S)
        coord, survivors = nodes[0], nodes[1:]
        _, two = launch(coord.address, MODEL, min_nodes=2)
        three = _launch_holding_a_stage(coord.address, MODEL, min_nodes=3)
        launched = {two.instance_id: two, three.instance_id: three}
        assert [len(two.stages), len(three.stages)] == [2, 3]
        assert coord.node_id in {s.node_id for s in three.stages}  # its range is lost with it
        relay = survivors[0]
        for info in launched.values():
            wait_for(
                lambda i=info: _instance(relay.address, i.instance_id), PATIENCE_S, what="seen"
            )
            assert _ids(relay.address, info.instance_id) == (expected, "pipeline")
        # What each surviving stage has computed so far: a reloaded shard would start at 0.
        frames = {
            (i, s.node_id): _runtime(_address(nodes, s.node_id), i).frames_processed
            for i, info in launched.items()
            for s in info.stages
            if s.node_id != coord.node_id
        }
        assert all(frames.values()), frames

        started, outcome = threading.Event(), {}
        worker = threading.Thread(
            target=_in_flight, args=(relay.address, two.instance_id, started, outcome)
        )
        worker.start()
        assert started.wait(PATIENCE_S), "the long request never produced a token"
        coord.kill()  # SIGKILL: no goodbye, its in-process stage and its registry are gone
        killed_at = time.monotonic()
        worker.join(PATIENCE_S)
        assert not worker.is_alive(), "the request in flight hangs after its coordinator died"
        error = outcome["result"]
        assert isinstance(error, Unavailable), repr(error)
        assert coord.address in str(error) and "went away during the request" in str(error)

        # A new request right away: served (the take-over was quick) or UNAVAILABLE naming
        # the dead coordinator — never NOT_FOUND, never a hang.
        try:
            ids, _ = _ids(relay.address, two.instance_id)
            assert ids == expected
        except Unavailable as exc:
            assert re.search(f"{coord.address}|{coord.node_id[:8]}", str(exc)), str(exc)

        for instance_id, before in launched.items():

            def taken_over(i=instance_id) -> InstanceInfo | None:
                info = _instance(relay.address, i)
                ok = info and info.state == "ready" and info.coordinator_node_id != coord.node_id
                return info if ok else None

            info = wait_for(taken_over, PATIENCE_S, what=f"{instance_id} taken over")
            print(f"{instance_id} ready again {time.monotonic() - killed_at:.2f} s after the kill")
            kept = [s for s in before.stages if s.node_id != coord.node_id]
            assert info.coordinator_node_id == min(s.node_id for s in kept)  # no election
            assert len(info.stages) == len(before.stages) == len({s.node_id for s in info.stages})
            assert coord.node_id not in {s.node_id for s in info.stages}
            for old, new in zip(before.stages, info.stages, strict=True):
                assert (old.start_layer, old.end_layer) == (new.start_layer, new.end_layer)
                if old.node_id != coord.node_id:  # kept where it was, weights never reloaded
                    assert new.node_id == old.node_id
                    runtime = _runtime(_address(nodes, new.node_id), instance_id)
                    assert runtime.frames_processed >= frames[(instance_id, new.node_id)]
            assert "taken over" in info.engine_reason and coord.node_id[:8] in info.engine_reason
            # Any survivor serves it, exactly as one node running mlx-lm does.
            for node in survivors:
                assert _ids(node.address, instance_id) == (expected, "pipeline")
        # The coordinator's own range of the 3-node instance went to the one node without one.
        spare = {n.node_id for n in survivors} - {s.node_id for s in three.stages}
        moved = [
            s for s in _instance(relay.address, three.instance_id).stages if s.node_id in spare
        ]
        lost = [s for s in three.stages if s.node_id == coord.node_id]
        assert [(s.start_layer, s.end_layer) for s in moved] == [
            (s.start_layer, s.end_layer) for s in lost
        ]
        print(f"both instances served again {time.monotonic() - killed_at:.2f} s after the kill")
        logs = "".join(n.log_text() for n in survivors)
        assert "taking over an instance from a dead coordinator" in logs
        assert "stage handed over to a new coordinator" in logs
        assert "unloading shard of a gone coordinator" not in logs


def test_a_take_over_that_cannot_honour_min_nodes_says_why_and_frees_the_stage(tmp_path):
    with DaemonCluster(tmp_path, env={"MACMESH_REPLACE_DELAY_S": "0.2"}) as cluster:
        coord = cluster.start("coord", mdns=False)
        stage = cluster.start("stage", mdns=False, peers=[coord.address])
        cluster.wait_connected([coord, stage], timeout=PATIENCE_S)
        _, instance = launch(coord.address, MODEL, min_nodes=2)
        assert _runtime(stage.address, instance.instance_id) is not None
        coord.kill()

        def explained() -> InstanceInfo | None:
            info = _instance(stage.address, instance.instance_id)
            return info if info and "not placed again" in info.engine_reason else None

        info = wait_for(explained, PATIENCE_S, what="the survivor saying why it cannot serve")
        assert info.state == "failed" and info.coordinator_node_id == stage.node_id
        assert coord.address in info.engine_reason, info.engine_reason
        assert "min_nodes 2" in info.engine_reason, info.engine_reason
        wait_for(
            lambda: _runtime(stage.address, instance.instance_id) is None,
            PATIENCE_S,
            what="the surviving shard unloaded",
        )
        log = stage.log_text()
        assert "taking over an instance from a dead coordinator" in log
        assert "failed instance not placed again" in log
        with pytest.raises(Unavailable, match="min_nodes 2"):
            _ids(stage.address, instance.instance_id)
        assert stage.alive()


def test_a_shard_answers_only_to_its_live_coordinator(tmp_path):
    """A coordinator that was cut off for a while and taken over must not unload or take back
    the stages its successor drives: while the shard's coordinator is up, another node's
    UnloadShard is refused and its LoadShard is ALREADY_EXISTS naming the owner."""
    with DaemonCluster(tmp_path) as cluster:
        coord = cluster.start("coord", mdns=False)
        stage = cluster.start("stage", mdns=False, peers=[coord.address])
        other = cluster.start("other", mdns=False, peers=[coord.address])
        cluster.wait_connected([coord, stage, other], timeout=PATIENCE_S)
        instance = _launch_holding_a_stage(coord.address, MODEL, min_nodes=2)
        held = next(s for s in instance.stages if s.node_id != coord.node_id)
        holder = next(n for n in (stage, other) if n.node_id == held.node_id)
        stranger = next(n for n in (stage, other) if n is not holder)
        as_stranger = ((NODE_KEY, stranger.node_id),)
        with rpc.channel(holder.address) as channel:
            stages = stage_pb2_grpc.StageServiceStub(channel)
            reply = stages.UnloadShard(
                stage_pb2.UnloadShardRequest(instance_id=instance.instance_id),
                timeout=10,
                metadata=as_stranger,
            )
            assert not reply.unloaded
            runtime = _runtime(holder.address, instance.instance_id)
            request = stage_pb2.LoadShardRequest(
                instance_id=instance.instance_id,
                model=MODEL,
                start_layer=held.start_layer,
                end_layer=held.end_layer,
                position=runtime.shard.position,
                num_stages=runtime.shard.num_stages,
                next_hop=runtime.shard.next_hop,
            )
            code, details = status_code(
                lambda: stages.LoadShard(request, timeout=30, metadata=as_stranger)
            )
        assert code is grpc.StatusCode.ALREADY_EXISTS and coord.node_id[:8] in details, details
        assert _ids(coord.address, instance.instance_id) == (_reference(), "pipeline")
        assert "unload refused" in holder.log_text()


def _launch_holding_a_stage(address: str, model: str, min_nodes: int) -> InstanceInfo:
    """Launch so that the coordinator holds a stage itself: a launch forwarded by a peer pins
    the receiving node into the placement (as a delegated launch does)."""
    channel, inference = stub(address)
    with channel:
        for event in inference.Launch(
            pb.LaunchRequest(model=model, min_nodes=min_nodes), timeout=120, metadata=FORWARDED
        ):
            if event.HasField("instance"):
                return InstanceInfo.from_proto(event.instance)
    raise AssertionError("the launch ended without an instance")


def _address(nodes, node_id: str) -> str:
    return next(n.address for n in nodes if n.node_id == node_id)


# ---- the pure part --------------------------------------------------------------------------


def _stage(node: str, start: int, end: int) -> StageRef:
    return StageRef(node_id=node, start_layer=start, end_layer=end)


def _node(node: str, free: int = 8 * GiB) -> NodeCapacity:
    return NodeCapacity(id=node, available_memory_bytes=free, total_memory_bytes=16 * GiB)


def test_the_successor_is_the_surviving_stage_holder_with_the_lowest_id():
    stages = [_stage("c", 0, 2), _stage("b", 2, 3), _stage("d", 3, 4)]
    assert lost_nodes(stages, "c", live={"b", "d", "e"}) == {"c"}
    assert successor(stages, {"c"}) == "b"
    assert lost_nodes(stages, "a", live={"c", "d"}) == {"a", "b"}  # b died as well
    assert successor(stages, {"a", "b"}) == "c"
    assert successor(stages, {"b", "c", "d"}) is None


def test_only_the_lost_ranges_move_and_min_nodes_is_honoured():
    card = resolve_card(MODEL)
    stages = [_stage("a", 0, 2), _stage("b", 2, 4)]
    live = [_node("b"), _node("c", 4 * GiB), _node("d", 6 * GiB)]
    placement = replace_missing(card, stages, {"a"}, live, min_nodes=2)
    assert [(s.node_id, s.start_layer, s.end_layer) for s in placement.stages] == [
        ("d", 0, 2),  # the roomiest node without a stage of it
        ("b", 2, 4),  # kept where it is
    ]
    with pytest.raises(PlacementError, match="0 live node"):
        replace_missing(card, stages, {"a"}, [_node("b")], min_nodes=2)
    with pytest.raises(PlacementError, match="context length 99999999"):
        replace_missing(card, stages, {"a"}, live, min_nodes=2, context_length=99_999_999)
    tight = [_node("b"), _node("c", 1024)]
    with pytest.raises(PlacementError):
        replace_missing(card, stages, {"a"}, tight, min_nodes=2)


def test_a_request_for_a_failed_instance_is_told_what_failed():
    failed = InstanceInfo(
        instance_id="tiny-1",
        model=MODEL,
        coordinator_node_id="b",
        stages=[_stage("b", 0, 4)],
        engine="pipeline",
        engine_reason="pipeline: 2 nodes [failed: its coordinator, node a at H:1, is gone; "
        "not placed again: min_nodes 2 is above the cluster size 1]",
        state="failed",
    )
    with pytest.raises(InstanceUnavailable, match=r"tiny-1 failed: its coordinator.*min_nodes 2"):
        pick_instance([failed], "auto", "b")
