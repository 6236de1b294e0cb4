"""Native MTP across a pipeline (engine pipeline_mtp), against real stages in other processes.

The coordinator (this process) runs stage 0 in-process, as a daemon does; the other stages
are real daemons (``helpers.stage_nodes``). The last stage drafts with the checkpoint's MTP
head, K+1 verify tokens travel as one frame, and every stage commits the accepted prefix
when the next frame brings the verdict. Greedy output must equal mlx-lm's own target-only
generation token for token (dense and MoE, 2 and 3 nodes, K = 1..4, penalties), seeded
sampling must draw what single-node native MTP draws, and cancellation and a dead stage
must behave as in plain pipelines. The engine selector's opt-in and the planner's budget
for the head on the last stage are pure and tested directly.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from helpers import mlx_lm_reference
from helpers.daemons import wait_for
from helpers.mlx_lm_reference import checkpoint_greedy, mlx_lm_model
from helpers.pipeline_faults import cancelling_frees_caches, dead_stage_fails_with_unavailable
from helpers.stage_nodes import StageNodes

from node.checkpoints import PRESETS, ensure_checkpoint
from node.cluster.selector import choose_instance_engine, compatible, request_engine
from node.inference.codec import FrameError
from node.inference.events import GenerationDone, TokenDelta
from node.inference.loading import load_checkpoint
from node.inference.mtp.engine import MtpEngine
from node.inference.mtp.recovery import probe_mtp
from node.inference.pipeline import PipelineError, SimplePlacement
from node.inference.pipeline_mtp import PipelineMtpEngine
from node.inference.requests import GenerateRequest
from node.inference.sampling import SamplingParams
from node.inference.selector import pipeline_mtp_opt_in
from node.inference.stage_mtp import rewind
from node.proto.macmesh.v1 import stage_pb2 as pb

MODELS = {"dense": "dense-partial", "moe": "moe-high", "dense-high": "dense-high"}
PREFILL_STEP = 16  # several prefill pieces (the last stage feeds the head across them)
CHUNK_BYTES = 1024  # hidden states travel as several chunks
PROMPT = [(7 * i + 3) % 480 for i in range(41)]
NEW_TOKENS = 24
K_LIMITS = (2, 4)  # the checkpoints carry no card: allow K up to 4


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory):
    # node 3 is killed by the last test
    with StageNodes(tmp_path_factory.mktemp("stage-nodes"), count=3) as started:
        yield started


def _path(arch: str) -> Path:
    return ensure_checkpoint(PRESETS[MODELS[arch]])


def mlx_lm_greedy(arch: str, prompt: list[int], n: int) -> list[int]:
    return checkpoint_greedy(_path(arch), prompt, n, PREFILL_STEP)


def engine_for(arch: str, node_ids: list[str], nodes: StageNodes, **kwargs) -> PipelineMtpEngine:
    placement = SimplePlacement.even(PRESETS[MODELS[arch]].num_hidden_layers, node_ids)
    engine = PipelineMtpEngine(
        _path(arch),
        placement,
        nodes.addresses,
        local_node_id="coordinator",
        max_chunk_bytes=CHUNK_BYTES,
        prefill_step_size=PREFILL_STEP,
        mtp_k_limits=K_LIMITS,
        **kwargs,
    )
    engine.load()
    return engine


def run(pipe: PipelineMtpEngine, prompt: list[int], n: int = NEW_TOKENS, **kw) -> GenerationDone:
    sampling = kw.pop("sampling", SamplingParams())
    request = GenerateRequest(
        prompt_ids=prompt, max_tokens=n, ignore_eos=True, sampling=sampling, **kw
    )
    events = list(pipe.generate(request))
    assert all(isinstance(e, TokenDelta) for e in events[:-1])
    done = events[-1]
    assert isinstance(done, GenerationDone)
    assert [t for e in events[:-1] for t in e.token_ids] == done.token_ids
    return done


def topology(nodes: StageNodes, count: int) -> list[str]:
    return ["coordinator", *[nodes[i].name for i in range(count - 1)]]


@pytest.mark.parametrize(("arch", "count"), [("dense", 2), ("dense", 3), ("moe", 2), ("moe", 3)])
def test_greedy_equals_mlx_lm_at_every_k(arch: str, count: int, nodes: StageNodes) -> None:
    expected = mlx_lm_greedy(arch, PROMPT, NEW_TOKENS)
    engine = engine_for(arch, topology(nodes, count), nodes)
    try:
        assert engine.shards[-1].has_mtp_head and engine.shards[-1].mtp_head_bytes > 0
        assert not any(s.has_mtp_head for s in engine.shards[:-1])
        accepted = 0
        for k in (1, 2, 3, 4, None):  # None: the K policy chooses (from this machine's costs)
            done = run(engine, PROMPT, mtp_k=k)
            assert done.token_ids == expected, f"K={k}"
            stats = done.stats
            assert stats.engine == "pipeline_mtp" and stats.drafter_kind == "native_mtp"
            assert stats.generation_tokens == NEW_TOKENS
            if k is not None:  # every cycle but the last ones (capped by max_tokens) at K
                assert stats.proposed_draft_tokens > 0
                assert stats.draft_k_histogram[k] >= max(stats.draft_k_histogram)
                accepted += stats.accepted_draft_tokens
        # the head drafts what the target says often enough for fewer traversals than tokens
        assert accepted > 0
        wait_for(lambda: engine.cached_requests() == [0] * count, 10, what="caches freed")
    finally:
        engine.close()


def test_a_head_that_never_agrees_is_still_exact(nodes: StageNodes) -> None:
    """Every draft rejected: each frame commits one position of K+1 on every stage."""
    path = ensure_checkpoint(PRESETS["dense-none"])
    expected = checkpoint_greedy(path, PROMPT, 16, PREFILL_STEP)
    placement = SimplePlacement.even(PRESETS["dense-none"].num_hidden_layers, topology(nodes, 3))
    engine = PipelineMtpEngine(
        path,
        placement,
        nodes.addresses,
        local_node_id="coordinator",
        prefill_step_size=PREFILL_STEP,
        mtp_k_limits=K_LIMITS,
    )
    engine.load()
    try:
        done = run(engine, PROMPT, 16, mtp_k=3)
        assert done.token_ids == expected
        assert done.stats.accepted_draft_tokens < done.stats.proposed_draft_tokens
    finally:
        engine.close()


def test_penalties_condition_each_verified_position(nodes: StageNodes) -> None:
    params = mlx_lm_reference.WINDOWED_PENALTIES
    expected = mlx_lm_reference.mlx_lm_greedy(
        mlx_lm_model(_path("dense")), PROMPT, 32, params, prefill_step_size=PREFILL_STEP
    )
    engine = engine_for("dense", topology(nodes, 3), nodes)
    try:
        for k in (1, 3):
            done = run(engine, PROMPT, 32, mtp_k=k, sampling=params)
            assert done.token_ids == expected, f"K={k}"
            assert done.stats.accepted_draft_tokens > 0
    finally:
        engine.close()


def test_seeded_sampling_draws_what_single_node_native_mtp_draws(nodes: StageNodes) -> None:
    """Same rules, same PRNG subkeys in the same order: the pipeline samples the tokens the
    single-node engine samples (and a different seed gives other tokens: not vacuous)."""
    # temperature 2: this checkpoint is peaked enough that 0.9 samples its argmax every time
    sampling = SamplingParams(temperature=2.0, top_p=0.95, repetition_penalty=1.2, seed=1234)
    single = MtpEngine(load_checkpoint(_path("moe")))
    expected = list(
        single.generate(
            GenerateRequest(
                prompt_ids=PROMPT,
                max_tokens=NEW_TOKENS,
                ignore_eos=True,
                sampling=sampling,
                mtp_k=2,
            )
        )
    )[-1].token_ids
    engine = engine_for("moe", topology(nodes, 3), nodes)
    try:
        done = run(engine, PROMPT, mtp_k=2, sampling=sampling)
        assert done.token_ids == expected
        # the coupled rule: a seed gives the text plain decode draws, at every K
        assert run(engine, PROMPT, mtp_k=3, sampling=sampling).token_ids == expected
        assert run(engine, PROMPT, engine="pipeline", sampling=sampling).token_ids == expected
        other = run(engine, PROMPT, mtp_k=2, sampling=sampling.model_copy(update={"seed": 7}))
        assert other.token_ids != expected
    finally:
        engine.close()


def test_engine_pipeline_runs_plain_decode_on_the_same_instance(nodes: StageNodes) -> None:
    engine = engine_for("dense", topology(nodes, 2), nodes)
    try:
        done = run(engine, PROMPT, engine="pipeline")
        assert done.token_ids == mlx_lm_greedy("dense", PROMPT, NEW_TOKENS)
        assert done.stats.engine == "pipeline" and done.stats.proposed_draft_tokens == 0
    finally:
        engine.close()


def test_concurrent_requests_are_all_correct(nodes: StageNodes) -> None:
    prompts = [[(13 * i + 5 * j + 1) % 480 for j in range(8 + 5 * i)] for i in range(4)]
    expected = [mlx_lm_greedy("dense", p, 16) for p in prompts]
    engine = engine_for("dense", topology(nodes, 3), nodes)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(prompts))

    def client(i: int) -> None:
        try:
            start.wait()
            results[i] = run(engine, prompts[i], 16, mtp_k=1 + i % 3).token_ids
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert [results[i] for i in range(len(prompts))] == expected
        wait_for(lambda: engine.cached_requests() == [0, 0, 0], 10, what="caches freed")
    finally:
        engine.close()


PENALTIES = SamplingParams(**mlx_lm_reference.PENALTIES)
SEEDED = SamplingParams(temperature=2.0, top_p=0.95, seed=99)


def reference(arch: str, prompt: list[int], n: int, params: SamplingParams) -> list[int]:
    """mlx-lm alone, target only, greedy with the request's processors."""
    return mlx_lm_reference.mlx_lm_greedy(
        mlx_lm_model(_path(arch)), prompt, n, params, prefill_step_size=PREFILL_STEP
    )


class Stream(threading.Thread):
    """One request read on its own thread; ``got_tokens`` is set at its first tokens."""

    def __init__(self, engine: PipelineMtpEngine, request: GenerateRequest) -> None:
        super().__init__(daemon=True)
        self.engine, self.request = engine, request
        self.tokens: list[int] = []
        self.done: GenerationDone | None = None
        self.error: BaseException | None = None
        self.got_tokens = threading.Event()

    def run(self) -> None:
        try:
            for event in self.engine.generate(self.request):
                if isinstance(event, TokenDelta):
                    self.tokens += event.token_ids
                    self.got_tokens.set()
                elif isinstance(event, GenerationDone):
                    self.done = event
        except BaseException as exc:
            self.error = exc
            self.got_tokens.set()


@pytest.mark.parametrize(("arch", "count"), [("dense", 2), ("dense", 3), ("moe", 2), ("moe", 3)])
def test_verify_frames_of_concurrent_requests_batch_and_each_stays_exact(
    arch: str, count: int, nodes: StageNodes
) -> None:
    """Requests that start together verify together: their verify rows ([B, K+1], the same
    K) go through every stage as one forward, each row accepts its own prefix and commits its
    own GatedDeltaNet states. Prompts of 1 to 60 tokens, K = 1..3, penalties, a seeded one,
    different lengths (they leave at different times) and one that joins the running batch:
    each greedy sequence equals mlx-lm's target-only output alone, the seeded one what it
    draws alone on the same instance."""
    # (prompt length, new tokens, K, sampling)
    specs = [
        (1, 14, 2, SamplingParams()),
        (9, 22, 2, SamplingParams()),
        (41, 12, 2, PENALTIES),
        (23, 16, 3, SamplingParams()),
        (17, 15, 2, SEEDED),
        (60, 10, 1, SamplingParams()),  # joins once the others decode
    ]
    prompts = [[(13 * i + 5 * j + 1) % 480 for j in range(n)] for i, (n, *_) in enumerate(specs)]
    requests = [
        GenerateRequest(prompt_ids=p, max_tokens=n, ignore_eos=True, mtp_k=k, sampling=sampling)
        for p, (_, n, k, sampling) in zip(prompts, specs, strict=True)
    ]
    engine = engine_for(arch, topology(nodes, count), nodes)
    stage0 = engine._local
    assert stage0 is not None
    try:
        alone = run(engine, prompts[4], specs[4][1], mtp_k=2, sampling=SEEDED).token_ids
        before = [s.batched_forwards for s in engine.status()]
        streams = [Stream(engine, r) for r in requests]
        with stage0._compute_lock:  # the worker waits until every request's frames queued
            for stream in streams[:-1]:
                stream.start()
            wait_for(
                lambda: sum(j.kind == "open" for j in list(stage0._jobs)) == len(streams) - 1,
                60,
                what="the first requests queued at stage 0",
            )
        assert streams[1].got_tokens.wait(120)
        streams[-1].start()
        for stream in streams:
            stream.join(180)
            assert not stream.is_alive() and stream.error is None, stream.error
        for i, (stream, (_, n, _, sampling)) in enumerate(zip(streams, specs, strict=True)):
            assert stream.done is not None and stream.done.token_ids == stream.tokens
            if sampling.seed is not None:
                assert stream.tokens == alone
            else:
                assert stream.tokens == reference(arch, prompts[i], n, sampling), i
        assert sum(s.done.stats.accepted_draft_tokens for s in streams) > 0
        for s, earlier in zip(engine.status(), before, strict=True):
            assert s.batched_forwards > earlier and s.max_batch_seen >= 3, (
                s
            )  # they verified together
        wait_for(lambda: engine.cached_requests() == [0] * count, 10, what="caches freed")
    finally:
        engine.close()


def test_cancelling_mid_stream_frees_caches_on_every_stage(nodes: StageNodes) -> None:
    engine = engine_for("dense", topology(nodes, 3), nodes)
    try:
        cancelling_frees_caches(engine, PROMPT, mtp_k=2)
        assert run(engine, PROMPT, mtp_k=3).token_ids == mlx_lm_greedy("dense", PROMPT, NEW_TOKENS)
    finally:
        engine.close()


def test_a_dead_stage_fails_its_requests_with_unavailable(nodes: StageNodes) -> None:
    victim = nodes[2]
    engine = engine_for("dense", ["coordinator", victim.name], nodes)
    try:
        dead_stage_fails_with_unavailable(engine, victim, PROMPT, mtp_k=2)
    finally:
        engine.close()


# ---- pure parts: the opt-in, the frame bookkeeping ----


def test_the_engine_is_pipeline_unless_the_launch_opts_in() -> None:
    probe = probe_mtp(_path("dense"))
    plain = choose_instance_engine(num_stages=2, probe=probe, card=None, native_mtp_enabled=True)
    assert plain.engine == "pipeline"
    assert plain.reason == "pipeline: the placement spans 2 nodes (native MTP needs one)"
    opted = choose_instance_engine(
        num_stages=3, probe=probe, card=None, native_mtp_enabled=True, mtp_across_pipeline=True
    )
    assert opted.engine == "pipeline_mtp"
    assert "--mtp-across-pipeline opted in" in opted.reason and "3 nodes" in opted.reason
    by_env = pipeline_mtp_opt_in(False, {"MACMESH_PIPELINE_MTP": "1"})
    assert by_env == (True, "MACMESH_PIPELINE_MTP=1")
    assert pipeline_mtp_opt_in(False, {"MACMESH_PIPELINE_MTP": "0"}) == (False, "")
    assert pipeline_mtp_opt_in(True, {}) == (True, "--mtp-across-pipeline")
    env_choice = choose_instance_engine(
        num_stages=2,
        probe=probe,
        card=None,
        native_mtp_enabled=True,
        mtp_across_pipeline=True,
        opted_in_by=by_env[1],
    )
    assert "MACMESH_PIPELINE_MTP=1 opted in" in env_choice.reason
    # a checkpoint without a recoverable head stays a plain pipeline, saying why
    stripped = probe_mtp(ensure_checkpoint(PRESETS["dense-high-stripped"]))
    fallback = choose_instance_engine(
        num_stages=2, probe=stripped, card=None, native_mtp_enabled=True, mtp_across_pipeline=True
    )
    assert fallback.engine == "pipeline"
    assert "asked for native MTP across the pipeline, but" in fallback.reason
    # a card without native MTP says so
    card = SimpleNamespace(id="no-mtp-card", native_mtp=None)
    refused = choose_instance_engine(
        num_stages=2, probe=probe, card=card, native_mtp_enabled=True, mtp_across_pipeline=True
    )
    assert refused.engine == "pipeline" and "no-mtp-card" in refused.reason


def test_requests_choose_between_the_two_pipeline_engines() -> None:
    reason = "pipeline_mtp: ..."
    assert request_engine("auto", "pipeline_mtp", reason, 2).engine == "pipeline_mtp"
    assert request_engine("pipeline", "pipeline_mtp", reason, 2).engine == "pipeline"
    assert compatible("pipeline", "pipeline_mtp") and compatible("pipeline_mtp", "pipeline_mtp")
    assert not compatible("pipeline_mtp", "pipeline") and not compatible("local", "pipeline_mtp")
    with pytest.raises(Exception, match="--mtp-across-pipeline"):
        request_engine("pipeline_mtp", "pipeline", "pipeline: ...", 2)
    with pytest.raises(Exception, match="spans 2 nodes"):
        request_engine("native_mtp", "pipeline_mtp", reason, 2)


def test_a_verdict_moves_the_position_back_to_the_accepted_prefix() -> None:
    inbound = SimpleNamespace(position=40, verify_positions=0, mtp=True)  # all but its last token

    def frame(start: int, n: int, keep: int | None) -> pb.Activation:
        act = pb.Activation(start_position=start, token_ids=list(range(n)), sample=True)
        if keep is not None:
            act.verify.CopyFrom(pb.Verify(keep_previous=keep, draft_k=2))
        return act

    rewind("r", inbound, frame(40, 1, 0))  # the prompt's last token: the first verify frame
    assert (inbound.position, inbound.verify_positions) == (40, 1)
    inbound.position += 1  # the session accepts the frame's positions
    rewind("r", inbound, frame(41, 4, 1))
    assert (inbound.position, inbound.verify_positions) == (41, 4)
    inbound.position += 4
    rewind("r", inbound, frame(43, 3, 2))  # 1 of 3 drafts accepted: keep 2 of the 4 positions
    assert inbound.position == 43
    inbound.position += 3
    for bad, match in [
        (frame(46, 1, None), "waits for its verdict"),
        (frame(46, 1, 4), r"outside 1\.\.3"),
        (frame(46, 1, 0), r"outside 1\.\.3"),
    ]:
        with pytest.raises(FrameError, match=match):
            rewind("r", SimpleNamespace(**vars(inbound)), bad)
    with pytest.raises(FrameError, match="no verify frame is pending"):
        rewind("r", SimpleNamespace(position=3, verify_positions=0, mtp=True), frame(3, 2, 2))
    # a request opened without OpenRequest.mtp never carries a verify, in a batch row neither
    row = pb.BatchRow(request_id="p", start_position=3, token_ids=[1], sample=True)
    row.verify.CopyFrom(pb.Verify(keep_previous=0, draft_k=1))
    with pytest.raises(FrameError, match="not opened for pipeline MTP"):
        rewind("p", SimpleNamespace(position=3, verify_positions=0, mtp=False), row)
    row.sample = False  # a verify frame samples: its verdict comes from its logits
    with pytest.raises(FrameError, match="must sample"):
        rewind("p", SimpleNamespace(position=3, verify_positions=0, mtp=True), row)


def test_the_planner_budgets_the_head_and_its_embedding_on_the_last_stage() -> None:
    from node.placement import NodeCapacity, PlanOptions, get_card, plan

    gib = 1 << 30
    card = get_card("Qwen3.5-122B-A10B-4bit")
    nodes = [
        NodeCapacity(id="mbp", available_memory_bytes=64 * gib),
        NodeCapacity(id="studio", available_memory_bytes=60 * gib),
    ]
    plain = plan(card, nodes)
    opted = plan(card, nodes, PlanOptions(mtp_across_pipeline=True))
    assert len(plain.stages) == len(opted.stages) == 2
    assert not plain.mtp_head_included and not any(s.has_mtp_head for s in plain.stages)
    assert opted.mtp_head_included
    assert [s.has_mtp_head for s in opted.stages] == [False, True]
    # The last stage carries the head, its KV cache, and (untied) an embedding copy; the other
    # stages carry nothing more than a plain pipeline's stage with the same layers.
    last = opted.stages[-1]
    tokens, seqs = opted.context_length, opted.max_concurrent_sequences
    kv_layer = card.kv_bytes_per_token // card.layer_types.count("full_attention")
    extra = card.native_mtp.head_bytes + card.native_mtp.num_layers * kv_layer * tokens * seqs
    if not card.tie_word_embeddings:
        extra += card.embedding_bytes
    same_split = plan(
        card,
        nodes,
        PlanOptions(layer_counts={s.node_id: s.num_layers for s in opted.stages}),
    )
    assert last.bytes == same_split.stages[-1].bytes + extra
    assert opted.stages[0].bytes == same_split.stages[0].bytes
    assert "MTP head" in opted.explanation and "lives on the last stage" in opted.explanation
    assert "MTP head" not in plain.explanation


# ---- the opt-in through real daemons ----


def test_launch_opts_in_per_launch_or_by_the_coordinators_environment(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """`macmesh launch --mtp-across-pipeline` and MACMESH_PIPELINE_MTP=1 on the coordinator give
    a 2-node instance pipeline_mtp; a launch without either is a plain pipeline. Status and
    each request's stats say which rule chose the engine, and both engines give the same
    greedy tokens."""
    from helpers.cluster_client import generate
    from helpers.daemons import DaemonCluster
    from typer.testing import CliRunner

    from node.cli import app
    from node.client import Launched, MacmeshClient

    model = "macmesh-tiny"
    with DaemonCluster(tmp_path_factory.mktemp("opt-in")) as daemons:
        node1 = daemons.start("node1", mdns=False)
        node2 = daemons.start(
            "node2", mdns=False, peers=[node1.address], env={"MACMESH_PIPELINE_MTP": "1"}
        )
        daemons.wait_connected([node1, node2], timeout=15)
        runner = CliRunner()
        flagged = runner.invoke(
            app,
            [
                "launch",
                model,
                "--min-nodes",
                "2",
                "--mtp-across-pipeline",
                "--node",
                node1.address,
                "--json",
            ],
        )
        assert flagged.exit_code == 0, flagged.output
        opted = json.loads(flagged.stdout)
        assert opted["engine"] == "pipeline_mtp", opted
        assert "--mtp-across-pipeline opted in" in opted["engine_reason"]
        with MacmeshClient(node1.address, timeout=120) as client:
            plain = next(
                e.instance for e in client.launch(model, min_nodes=2) if isinstance(e, Launched)
            )
        assert plain.engine == "pipeline"
        assert plain.engine_reason == "pipeline: the placement spans 2 nodes (native MTP needs one)"
        with MacmeshClient(node2.address, timeout=120) as client:
            by_env = next(
                e.instance for e in client.launch(model, min_nodes=2) if isinstance(e, Launched)
            )
        assert by_env.engine == "pipeline_mtp"
        assert "MACMESH_PIPELINE_MTP=1 opted in" in by_env.engine_reason

        shown = runner.invoke(app, ["status", "--node", node1.address, "--json"])
        assert shown.exit_code == 0, shown.output
        reasons = {
            i["instance_id"]: i["engine_reason"] for i in json.loads(shown.stdout)["instances"]
        }
        assert reasons[opted["instance_id"]] == opted["engine_reason"]
        assert reasons[plain.instance_id] == plain.engine_reason

        _, mtp_ids, mtp = generate(
            node1.address, model, engine="pipeline_mtp", max_tokens=24, mtp_k=3, ignore_eos=True
        )
        _, pipe_ids, pipe = generate(
            node1.address, model, engine="pipeline", max_tokens=24, ignore_eos=True
        )
        assert mtp.engine == "pipeline_mtp" and mtp.engine_reason == opted["engine_reason"]
        assert mtp.proposed_draft_tokens > 0 and mtp.drafter_kind == "native_mtp"
        assert pipe.engine == "pipeline"
        assert mtp_ids == pipe_ids and len(mtp_ids) == 24


def test_the_cost_model_counts_every_stage_and_every_hop() -> None:
    from node.inference.pipeline_mtp import pipeline_cost_table

    # one stage's verify of T = 1..4 positions (the T = 2 sample is another process's time)
    stage = [0.010, 0.015, 0.012, 0.014]
    near = pipeline_cost_table(stage, num_stages=2, hop_s=0.0002, layer_s=0.001)
    far = pipeline_cost_table(stage, num_stages=3, hop_s=0.005, layer_s=0.001)
    assert near.verify[1] == pytest.approx([2 * (s + 0.0002) for s in [0.010, 0.012, 0.012, 0.014]])
    assert far.verify[1] == pytest.approx([3 * (s + 0.005) for s in [0.010, 0.012, 0.012, 0.014]])
    assert near.draft[1] == pytest.approx([0.0, 0.002, 0.004, 0.006])
    # slow hops make a traversal dear, so deeper drafts pay: at 85% acceptance the policy's
    # choice goes up with the hop cost
    from node.inference.mtp.kpolicy import choose_k

    rates = [[0.85, 0.85, 0.85]]
    cheap = pipeline_cost_table(stage, 2, 0.0, layer_s=0.004)
    dear = pipeline_cost_table(stage, 2, 0.050, layer_s=0.004)
    assert choose_k(rates, dear, 3) >= choose_k(rates, cheap, 3)
    assert choose_k(rates, dear, 3) == 3
    # B requests verifying together: the batch's [B, T] forward, B requests' drafts. With the
    # [B, T] costs of DESIGN's batching facts ([8, 3] ~3.5x a [1, 1]) drafting pays alone and
    # not in a batch of 8 (each request's K is chosen at the batch it verifies in)
    one = [0.010, 0.012, 0.013, 0.014]
    batched = pipeline_cost_table(
        {1: one, 8: [0.0155, 0.025, 0.035, 0.045]}, 2, 0.0002, layer_s=0.0005
    )
    assert batched.verify[8] == pytest.approx(
        [2 * (s + 0.0002) for s in [0.0155, 0.025, 0.035, 0.045]]
    )
    assert batched.draft[8] == pytest.approx([0.0, 8 * 0.001, 8 * 0.002, 8 * 0.003])
    assert choose_k(rates, batched, 3, batch=1) >= 1
    assert choose_k(rates * 8, batched, 3, batch=8) == 0


def test_macmesh_place_plans_the_head_on_the_last_stage_when_asked(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from node.cli import app

    gib = 1 << 30
    nodes = tmp_path / "nodes.json"
    nodes.write_text(
        json.dumps(
            [
                {"id": "mbp", "available_memory_bytes": 64 * gib},
                {"id": "studio", "available_memory_bytes": 60 * gib},
            ]
        )
    )
    args = ["place", "Qwen3.5-122B-A10B-4bit", "--nodes", str(nodes), "--json"]
    plain = json.loads(CliRunner().invoke(app, args).stdout)
    opted = json.loads(CliRunner().invoke(app, [*args, "--mtp-across-pipeline"]).stdout)
    assert [s["has_mtp_head"] for s in plain["stages"]] == [False, False]
    assert [s["has_mtp_head"] for s in opted["stages"]] == [False, True]
    assert opted["stages"][-1]["bytes"] > plain["stages"][-1]["bytes"]
    assert "lives on the last stage" in opted["explanation"]


def test_a_verify_frame_with_foreign_drafts_fails_its_request_only(nodes: StageNodes) -> None:
    """The last stage only verifies the drafts it proposed: a coordinator that sends others
    gets INVALID_ARGUMENT for that request, and the instance serves the next one."""

    class Tampering(PipelineMtpEngine):
        tamper = True

        def _on_verdict(self, request, verdict):
            if self.tamper and len(verdict.drafts):
                verdict.drafts[0] = (verdict.drafts[0] + 1) % self.vocab_size
            return super()._on_verdict(request, verdict)

    placement = SimplePlacement.even(PRESETS[MODELS["dense"]].num_hidden_layers, topology(nodes, 2))
    engine = Tampering(
        _path("dense"),
        placement,
        nodes.addresses,
        local_node_id="coordinator",
        mtp_k_limits=K_LIMITS,
    )
    engine.load()
    try:
        with pytest.raises(PipelineError) as failure:
            run(engine, PROMPT, mtp_k=2)
        assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "this stage proposed" in str(failure.value)
        engine.tamper = False
        assert run(engine, PROMPT, mtp_k=2).token_ids == mlx_lm_greedy("dense", PROMPT, NEW_TOKENS)
        wait_for(lambda: engine.cached_requests() == [0, 0], 10, what="caches freed")
    finally:
        engine.close()
