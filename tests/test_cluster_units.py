"""The pure parts of node.cluster: instance choice, placement choice, stop strings, the
throughput meter, wire conversions, and the model catalogue. No daemon, no gRPC."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from node import messages
from node.cluster import convert
from node.cluster.catalog import NoCheckpointError, list_models, locate, resolve_checkpoint_name
from node.cluster.coordinator import choose_placement
from node.cluster.instances import (
    InstanceInfo,
    InstanceUnavailable,
    RecentRate,
    StageRef,
    layers_text,
    merge,
    pick_instance,
)
from node.cluster.live import CancelToken
from node.cluster.selector import EngineRefused
from node.cluster.stops import StopMatcher
from node.inference.stats import FinalStats, GenerationStats, StageStats
from node.models import bundled_model_path
from node.placement import InsufficientMemoryError, NodeCapacity, get_card, resolve_card
from node.proto.macmesh.v1 import inference_pb2 as pb

GIB = 1024**3


def info(
    instance_id: str,
    engine: str,
    *,
    node: str = "a",
    state: str = "ready",
    stages: int = 1,
    in_flight: int = 0,
    model: str = "m",
) -> InstanceInfo:
    return InstanceInfo(
        instance_id=instance_id,
        model=model,
        aliases=[f"{model}-alias"],
        coordinator_node_id=node,
        stages=[StageRef(node_id=f"n{i}", start_layer=i, end_layer=i + 1) for i in range(stages)],
        engine=engine,
        engine_reason=f"{engine}: because",
        state=state,
        in_flight=in_flight,
    )


# -- which instance a request goes to -------------------------------------------------------


def test_pick_prefers_this_node_then_the_faster_engine_then_the_idle_one() -> None:
    here_pipe = info("p", "pipeline", node="me", stages=2)
    there_mtp = info("t", "native_mtp", node="other")
    assert pick_instance([there_mtp, here_pipe], "auto", "me") is here_pipe
    busy = info("b", "native_mtp", node="me", in_flight=3)
    idle_local = info("l", "local", node="me")
    idle_mtp = info("i", "native_mtp", node="me")
    assert pick_instance([busy, idle_local, idle_mtp], "auto", "me") is idle_mtp
    assert pick_instance([busy, idle_local], "auto", "me") is busy  # native MTP beats local
    # An explicit engine ignores the preference order but keeps the load order.
    assert pick_instance([busy, idle_mtp], "native_mtp", "me") is idle_mtp
    assert (
        pick_instance([here_pipe, idle_mtp], "local", "me") is idle_mtp
    )  # MTP instances decode plain


def test_pick_refuses_with_the_reason_or_says_nothing_is_ready() -> None:
    with pytest.raises(LookupError):
        pick_instance([], "auto", "me")
    with pytest.raises(EngineRefused, match="several nodes"):
        pick_instance([info("s", "native_mtp")], "pipeline", "me")
    with pytest.raises(EngineRefused, match="spans 2 nodes"):
        pick_instance([info("p", "pipeline", stages=2)], "native_mtp", "me")
    with pytest.raises(InstanceUnavailable, match="x is loading"):
        pick_instance([info("x", "local", state="loading")], "auto", "me")


def test_instances_answer_to_id_model_and_aliases_and_merge_once() -> None:
    a = info("a-1", "local", model="tiny")
    assert a.answers_to("a-1") and a.answers_to("tiny") and a.answers_to("tiny-alias")
    assert not a.answers_to("other")
    assert [i.instance_id for i in merge([a], [a, info("b-2", "local")])] == ["b-2", "a-1"]
    assert InstanceInfo.from_proto(a.to_proto()) == a


# -- placement ----------------------------------------------------------------------------------


def nodes(*free_gib: float) -> list[NodeCapacity]:
    return [
        NodeCapacity(id=f"n{i}", available_memory_bytes=int(g * GIB), total_memory_bytes=64 * GIB)
        for i, g in enumerate(free_gib)
    ]


def test_placement_prefers_the_launching_node_when_the_model_fits_there() -> None:
    card = get_card("Qwen3.6-27B-4bit")  # ~15 GiB
    cluster = nodes(60, 20, 40)
    assert choose_placement(card, cluster, "n2").node_ids == ["n2"]
    # The planner alone would take the biggest node.
    assert choose_placement(card, cluster, "n1").node_ids == ["n1"]


def test_placement_elsewhere_when_the_launching_node_is_too_small() -> None:
    card = get_card("Qwen3.6-27B-4bit")
    placement = choose_placement(card, nodes(60, 4), "n1")
    assert placement.node_ids == ["n0"]  # a single other node: the service delegates there
    split = choose_placement(card, nodes(60, 4, 40), "n1", min_nodes=2)
    assert len(split.stages) == 2
    pinned = choose_placement(card, nodes(60, 12), "n1", pin_local=True)
    assert "n1" in pinned.node_ids and len(pinned.stages) == 2
    with pytest.raises(InsufficientMemoryError):
        choose_placement(card, nodes(4, 4), "n1")


def test_placement_budgets_cache_and_state_for_every_sequence_of_a_batch() -> None:
    card = get_card("Qwen3.6-27B-4bit")
    one = choose_placement(card, nodes(60), "n0", context_length=32768)
    eight = choose_placement(card, nodes(60), "n0", context_length=32768, sequences=8)
    # KV (the MTP head's too) and GatedDeltaNet state, per sequence.
    per_sequence = card.kv_bytes_per_token * 32768 + card.linear_state_bytes
    assert one.stages[0].cache_bytes >= per_sequence
    assert eight.stages[0].cache_bytes == 8 * one.stages[0].cache_bytes
    assert eight.max_concurrent_sequences == 8
    # What fits one sequence on a node may need two nodes for a batch of 8.
    room = one.stages[0].bytes / 0.9 / GIB + 0.5  # GiB free: one sequence fits, 8 do not
    assert choose_placement(card, nodes(room), "n0", context_length=32768).single_node
    with pytest.raises(InsufficientMemoryError, match="8 sequences"):
        choose_placement(card, nodes(room), "n0", context_length=32768, sequences=8)


def test_placement_budgets_the_instances_prompt_cache() -> None:
    """A launch places the prompt cache too (--prompt-cache-mb): a node with room for the
    model and its KV but not for 1 GiB more sends a launch elsewhere or onto two nodes."""
    card = get_card("Qwen3.6-27B-4bit")
    bare = choose_placement(card, nodes(60), "n0")
    cached = choose_placement(card, nodes(60), "n0", prompt_cache_bytes=GIB)
    assert cached.stages[0].prompt_cache_bytes == GIB
    assert cached.stages[0].bytes == bare.stages[0].bytes + GIB
    room = bare.stages[0].bytes / 0.9 / GIB + 0.5  # GiB free: the model fits, +1 GiB does not
    assert choose_placement(card, nodes(room), "n0").single_node
    with pytest.raises(InsufficientMemoryError, match=r"prompt cache 1\.0 GiB"):
        choose_placement(card, nodes(room), "n0", prompt_cache_bytes=GIB)


# -- stop strings, throughput, cancellation -----------------------------------------------------


def test_stop_matcher_holds_back_partial_matches_and_cuts_at_the_first() -> None:
    stop = StopMatcher(["END", "\n\n"])
    out = [stop.feed(t) for t in ["Hello E", "N", "x and\n", "\nmore"]]
    assert "".join(out) + stop.flush() == "Hello ENx and"
    assert stop.stopped
    plain = StopMatcher([])
    assert plain.feed("a") == "a" and plain.flush() == ""
    held = StopMatcher(["xyz"])
    assert held.feed("abcx") == "abc" and held.flush() == "x"


def test_recent_rate_sums_tokens_over_the_window() -> None:
    rate = RecentRate(window_s=60)
    rate.record(100, 2.0, now=0.0)
    rate.record(10, 1.0, now=30.0)
    assert rate.value(now=31.0) == pytest.approx(110 / 3.0)
    assert rate.value(now=70.0) == pytest.approx(10.0)  # the first one aged out
    assert rate.value(now=200.0) == 0.0


def test_cancel_token_runs_callbacks_once_and_late_ones_at_once() -> None:
    token, calls = CancelToken(), []
    token.on_cancel(lambda: calls.append(1))
    token.set()
    token.set()
    token.on_cancel(lambda: calls.append(2))
    assert calls == [1, 2] and token.is_set()


def test_layers_text() -> None:
    assert layers_text(3, 4) == "layer 3" and layers_text(0, 12) == "layers 0-11"


# -- wire conversions -----------------------------------------------------------------------------


def test_request_edges_validate_once_and_name_the_field() -> None:
    wire = pb.GenerateRequest(model="m", text="hi", sampling=pb.SamplingParams())
    options = messages.options_from_proto(wire)
    request = convert.engine_request(options)
    assert request.prompt == "hi" and request.max_tokens == convert.DEFAULT_MAX_TOKENS
    assert request.sampling.top_p == 1.0 and request.sampling.repetition_penalty == 1.0
    ids = messages.options_from_proto(
        pb.GenerateRequest(model="m", prompt_ids=pb.TokenIds(ids=[1, 2]))
    )
    assert convert.engine_request(ids).prompt_ids == [1, 2]
    with pytest.raises(ValueError, match="no prompt"):
        messages.options_from_proto(pb.GenerateRequest(model="m"))
    with pytest.raises(ValueError, match=r"sampling\.temperature=-1\.0"):
        messages.options_from_proto(
            pb.GenerateRequest(model="m", text="x", sampling=pb.SamplingParams(temperature=-1))
        )
    with pytest.raises(ValueError, match=r"messages\[0\]\.role='robot'"):
        messages.options_from_proto(
            pb.GenerateRequest(
                model="m",
                messages=pb.ChatMessages(messages=[pb.ChatMessage(role="robot", content="x")]),
            )
        )
    with pytest.raises(ValueError, match="engine='warp'"):
        messages.options_from_proto(pb.GenerateRequest(model="m", text="x", engine="warp"))
    with pytest.raises(ValueError, match="model is empty"):
        messages.options_from_proto(pb.GenerateRequest(text="x"))
    with pytest.raises(ValueError, match="prompt is empty"):
        messages.options_from_proto(pb.GenerateRequest(model="m", text=""))
    chat = pb.GenerateRequest(
        model="m", messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="x")])
    )
    with pytest.raises(ValueError, match="no chat template"):
        convert.engine_request(messages.options_from_proto(chat), tokenizer=None)


def test_options_round_trip_through_the_wire() -> None:
    options = messages.GenerateOptions(
        model="m",
        messages=[messages.ChatMessage(role="user", content="hello")],
        max_tokens=7,
        sampling=messages.Sampling(temperature=0.5, top_k=3, logit_bias={4: -1.5}, seed=0),
        engine="native_mtp",
        mtp_k=2,
        stop=["\n"],
        request_id="r1",
    )
    assert messages.options_from_proto(messages.options_to_proto(options)) == options
    auto = messages.GenerateOptions(model="m", prompt_ids=[1])
    assert messages.options_from_proto(messages.options_to_proto(auto)) == auto


def test_stats_round_trip_through_the_wire_without_drift() -> None:
    stats = FinalStats(
        engine="native_mtp",
        engine_reason="native_mtp: x",
        drafter_kind="native_mtp",
        num_draft_tokens=2,
        proposed_draft_tokens=10,
        accepted_draft_tokens=7,
        acceptance_rate=0.7,
        prompt_tokens=3,
        generation_tokens=12,
        prompt_tps=100.0,
        generation_tps=50.0,
        stages=[StageStats(node_id="n1", address="127.0.0.1:1", start_layer=0, end_layer=4)],
        finish_reason="length",
    )
    wire = messages.stats_to_proto(stats)
    assert wire.finish_reason == "length"
    assert messages.stats_from_proto(wire) == stats
    # Nothing drafted: None on both sides of the wire, never 0.0 on one of them.
    plain = FinalStats(engine="pipeline", finish_reason="stop")
    back = messages.stats_from_proto(messages.stats_to_proto(plain))
    assert back == plain and back.acceptance_rate is None and back.drafter_kind is None
    # An engine outside the contract is an error naming it, never silently another engine.
    with pytest.raises(ValueError, match="engine='warp'"):
        messages.stats_from_proto(pb.GenerationStats(engine="warp", finish_reason="stop"))
    with pytest.raises(ValueError, match="finish_reason"):
        messages.stats_from_proto(pb.GenerationStats(engine="local", finish_reason="bored"))


def test_an_instance_round_trips_through_the_wire_field_for_field() -> None:
    """Every field InstanceInfo shares with pb.Instance crosses (the converters copy them by
    name): a non-default value for each comes back; unset optionals stay None, not 0."""
    stage = StageStats(node_id="n1", address="127.0.0.1:1", start_layer=0, end_layer=4)
    bare = messages.InstanceInfo(
        instance_id="tiny-1",
        model="macmesh-tiny",
        coordinator_node_id="n1",
        stages=[stage],
        engine="pipeline_mtp",
        engine_reason="pipeline_mtp: x",
        state="ready",
    )
    back = messages.InstanceInfo.from_proto(bare.to_proto())
    assert back == bare and back.current_mtp_k is None and back.context_length is None
    full = bare.model_copy(
        update={
            "aliases": ["tiny"],
            "coordinator_address": "127.0.0.1:2",
            "recent_generation_tps": 12.5,
            "in_flight": 2,
            "requests_served": 9,
            "batch_size": 2,
            "queued": 1,
            "current_mtp_k": 0,  # a K of 0 is a choice, not "unset"
            "min_nodes": 2,
            "context_length": 4096,
            "mtp_opted_in_by": "MACMESH_PIPELINE_MTP=1",
        }
    )
    defaults = {n: f.default for n, f in messages.InstanceInfo.model_fields.items()}
    changed = {n for n in defaults if getattr(full, n) != getattr(bare, n)}
    shared = set(messages.InstanceInfo.model_fields) & set(pb.Instance.DESCRIPTOR.fields_by_name)
    assert shared - changed <= {
        "instance_id",
        "model",
        "coordinator_node_id",
        "stages",
        "engine",
        "engine_reason",
        "state",
    }  # every other field is exercised with a non-default value
    assert messages.InstanceInfo.from_proto(full.to_proto()) == full


def test_engine_events_are_the_api_events() -> None:
    from node.inference.events import GenerationDone, TokenDelta

    assert messages.Delta is TokenDelta
    done = GenerationDone(
        text="ab",
        token_ids=[1, 2],
        finish_reason="length",
        stats=GenerationStats(engine="local", generation_tokens=2),
    )
    final = convert.final_stats(done, engine_reason="local: why")
    assert isinstance(final, FinalStats) and final.finish_reason == "length"
    assert final.engine_reason == "local: why" and final.generation_tokens == 2


# -- the catalogue ----------------------------------------------------------------------------------


def test_locate_bundled_model_by_name_and_by_path(tmp_path: Path) -> None:
    by_name = locate("macmesh-tiny", tmp_path)
    assert by_name.checkpoint == bundled_model_path() and by_name.remote_name == "macmesh-tiny"
    by_path = locate(str(bundled_model_path()), tmp_path)
    assert by_path.remote_name == str(bundled_model_path())
    with pytest.raises(NoCheckpointError, match=r"Qwen3\.6-27B"):
        locate("Qwen3.6-27B", tmp_path)


def test_list_models_shows_checkpoints_first_and_mtp_capability(tmp_path: Path) -> None:
    copy = tmp_path / "my-copy"
    shutil.copytree(bundled_model_path(), copy)
    entries = {e.id: e for e in list_models(tmp_path)}
    assert entries["macmesh-tiny"].source == "bundled"
    assert entries["macmesh-tiny"].native_mtp is not None
    assert entries["Qwen3.6-27B"].native_mtp.default_k == 2  # type: ignore[union-attr]
    assert entries["Qwen3.6-27B"].checkpoint is None
    assert entries["my-copy"].source == "checkpoint"
    assert entries["my-copy"].checkpoint == str(copy)
    assert list(entries).index("my-copy") < list(entries).index("Qwen3.6-27B")
    assert resolve_checkpoint_name("my-copy", tmp_path) == copy.resolve()
    assert resolve_card("my-copy", tmp_path).id == "my-copy"


def test_a_quantized_card_never_loads_the_full_precision_download(tmp_path: Path) -> None:
    # The weights of the card's source repo sit in the models dir at another precision: the
    # 8-bit card must not silently load them with an 8-bit memory plan.
    shutil.copytree(bundled_model_path(), tmp_path / "Qwen--Qwen3.6-27B")
    with pytest.raises(NoCheckpointError):
        locate("Qwen3.6-27B-8bit", tmp_path)
    # Asked for by its own directory name, the checkpoint is used as it is.
    found = locate("Qwen--Qwen3.6-27B", tmp_path)
    assert found.checkpoint == (tmp_path / "Qwen--Qwen3.6-27B").resolve()
