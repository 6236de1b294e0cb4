"""Pipeline stages batch the decode steps of the requests in flight; each sequence stays exact.

The coordinator (this test process) runs stage 0 in-process; the other stages are separate
processes (``helpers.stage_nodes``). Requests of 1 to 310 prompt tokens, some with penalties
and logit bias, join while others decode and leave at different lengths (one is cancelled);
each one's greedy output must equal mlx-lm's own ``generate_step`` on its prompt alone, and
every stage must have run batched forwards. Memory: ``max_batch`` bounds the requests on the
stages (the rest wait), and a stage refuses what passes its budget with RESOURCE_EXHAUSTED.
The pure parts (which waiting jobs batch together, the batch caches) are tested directly.
"""

from __future__ import annotations

import random
import threading
from functools import cache
from pathlib import Path
from queue import SimpleQueue

import grpc
import mlx.core as mx
import pytest
from helpers.daemons import wait_for
from helpers.mlx_lm_reference import PENALTIES, mlx_lm_greedy
from helpers.stage_nodes import StageNodes
from mlx_lm.utils import load_model

from node import rpc
from node.checkpoints import PRESETS, ensure_checkpoint
from node.inference.events import GenerationDone, TokenDelta
from node.inference.link import ForwardLink
from node.inference.pipeline import PipelineEngine, PipelineError, SimplePlacement
from node.inference.requests import GenerateRequest
from node.inference.sampling import SamplingParams
from node.inference.shard import load_shard
from node.inference.stage_batch import BatchCaches, Job, Row, plan_drain
from node.proto.macmesh.v1 import stage_pb2 as pb
from node.proto.macmesh.v1 import stage_pb2_grpc as pb_grpc

# Random weights: every output depends on the whole context (a constructed-agreement model
# nearly follows its last token, and would hide a row given another row's caches).
MODELS = {"dense": "dense-hf", "moe": "moe-mlx-q4"}
PREFILL_STEP = 64


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory):
    with StageNodes(tmp_path_factory.mktemp("batch-nodes"), count=2) as started:
        yield started


def _path(arch: str) -> Path:
    return ensure_checkpoint(PRESETS[MODELS[arch]])


@cache
def _model(arch: str):
    return load_model(_path(arch))[0]


@cache
def reference(arch: str, prompt: tuple[int, ...], n: int, penalties: bool) -> list[int]:
    """mlx-lm alone on this prompt: the sequence's expected greedy output."""
    params = SamplingParams(**PENALTIES) if penalties else None
    return mlx_lm_greedy(_model(arch), prompt, n, params, prefill_step_size=PREFILL_STEP)


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, 480) for _ in range(n)]


def engine_for(arch: str, node_ids: list[str], nodes: StageNodes, **kwargs) -> PipelineEngine:
    placement = SimplePlacement.even(PRESETS[MODELS[arch]].num_hidden_layers, node_ids)
    engine = PipelineEngine(
        _path(arch),
        placement,
        nodes.addresses,
        local_node_id="coordinator",
        prefill_step_size=PREFILL_STEP,
        **kwargs,
    )
    engine.load()
    return engine


class Client(threading.Thread):
    """One request, read on its own thread; ``tokens`` fills as they stream."""

    def __init__(self, engine: PipelineEngine, prompt: list[int], n: int, penalties: bool):
        super().__init__(daemon=True)
        params = SamplingParams(**PENALTIES) if penalties else SamplingParams()
        self.request = GenerateRequest(
            prompt_ids=prompt, max_tokens=n, ignore_eos=True, sampling=params
        )
        self.engine = engine
        self.tokens: list[int] = []
        self.done: GenerationDone | None = None
        self.error: BaseException | None = None
        self.stop_after: int | None = None  # walk away after this many tokens (a cancel)
        self.got = threading.Condition()

    def run(self) -> None:
        stream = self.engine.generate(self.request)
        try:
            for event in stream:
                with self.got:
                    if isinstance(event, TokenDelta):
                        self.tokens += event.token_ids
                    elif isinstance(event, GenerationDone):
                        self.done = event
                    self.got.notify_all()
                if self.stop_after is not None and len(self.tokens) >= self.stop_after:
                    stream.close()
                    return
        except BaseException as exc:
            self.error = exc

    def wait_tokens(self, n: int, timeout: float = 120) -> None:
        with self.got:
            assert self.got.wait_for(lambda: len(self.tokens) >= n or self.error, timeout)


TOPOLOGIES = {2: ["coordinator", "n1"], 3: ["coordinator", "n1", "n2"]}


@pytest.mark.parametrize(("arch", "stages"), [("dense", 2), ("dense", 3), ("moe", 2), ("moe", 3)])
def test_each_sequence_in_a_batch_equals_its_output_alone(
    arch: str, stages: int, nodes: StageNodes
) -> None:
    node_ids = ["coordinator", *[nodes[i].name for i in range(stages - 1)]]
    # (prompt length, new tokens, penalties): different lengths, so they leave at different times
    specs = [(1, 14, False), (40, 22, True), (7, 10, False), (310, 12, False), (120, 16, True)]
    prompts = [ids(n, seed) for seed, (n, _, _) in enumerate(specs)]
    engine = engine_for(arch, node_ids, nodes)
    try:
        clients = [Client(engine, p, n, pen) for p, (_, n, pen) in zip(prompts, specs, strict=True)]
        quitter = Client(engine, ids(25, 99), 3000, False)
        quitter.stop_after = 6  # leaves (cancelled) while the others decode
        for c in [*clients[:3], quitter]:
            c.start()
        clients[0].wait_tokens(3)  # the long prompts join a running batch
        clients[3].start()
        clients[3].wait_tokens(1)
        clients[4].start()
        for c in [*clients, quitter]:
            c.join(180)
            assert not c.is_alive() and c.error is None, c.error
        for c, prompt, (_, n, pen) in zip(clients, prompts, specs, strict=True):
            assert c.done is not None and c.done.token_ids == c.tokens
            assert c.tokens == reference(arch, tuple(prompt), n, pen), (len(prompt), pen)
        assert len(quitter.tokens) >= 6
        statuses = engine.status()
        for s in statuses:  # the decode steps went through every stage batched
            assert s.batched_forwards > 0 and s.max_batch_seen >= 2, s
        wait_for(lambda: engine.cached_requests() == [0] * stages, 10, what="caches freed")
    finally:
        engine.close()


@pytest.mark.parametrize(("arch", "stages"), [("dense", 2), ("moe", 3)])
def test_prompts_that_arrive_together_prefill_together_and_stay_exact(
    arch: str, stages: int, nodes: StageNodes
) -> None:
    """Five requests start at once (stage 0's worker held until all their frames wait):
    their prefill chunks of different lengths go through every stage as ragged batched
    forwards, and each sequence's output is still its output alone."""
    node_ids = ["coordinator", *[nodes[i].name for i in range(stages - 1)]]
    specs = [(1, 8, False), (5, 9, True), (40, 7, False), (130, 6, True), (310, 5, False)]
    prompts = [ids(n, 200 + seed) for seed, (n, _, _) in enumerate(specs)]
    engine = engine_for(arch, node_ids, nodes)
    stage0 = engine._local
    assert stage0 is not None
    try:
        clients = [Client(engine, p, n, pen) for p, (_, n, pen) in zip(prompts, specs, strict=True)]
        with stage0._compute_lock:  # the worker waits; every request's frames queue up
            for c in clients:
                c.start()
            opens = len(clients)
            wait_for(
                lambda: sum(j.kind == "open" for j in list(stage0._jobs)) == opens,
                60,
                what="every request queued at stage 0",
            )
        for c in clients:
            c.join(180)
            assert not c.is_alive() and c.error is None, c.error
        for c, prompt, (_, n, pen) in zip(clients, prompts, specs, strict=True):
            assert c.tokens == reference(arch, tuple(prompt), n, pen), (len(prompt), pen)
        for s in engine.status():
            assert s.batched_prefills > 0, s
        wait_for(lambda: engine.cached_requests() == [0] * stages, 10, what="caches freed")
    finally:
        engine.close()


def test_max_batch_bounds_the_requests_on_the_stages(nodes: StageNodes) -> None:
    """Four requests, max_batch 2: two at a time reach the stages, the others wait; all exact.
    (Two requests on two stages may never meet at stage 0 — each stage works on one while the
    other works on the other — so the bound is what is asserted, not that they batched.)"""
    engine = engine_for("dense", ["coordinator", nodes[0].name], nodes, max_batch=2)
    prompts = [ids(9 + 4 * i, 50 + i) for i in range(4)]
    try:
        clients = [Client(engine, p, 24, False) for p in prompts]
        for c in clients:
            c.start()
        wait_for(lambda: engine.queued == 2, 60, what="two requests waiting for a place")
        for c in clients:
            c.join(180)
            assert c.error is None, c.error
        for c, p in zip(clients, prompts, strict=True):
            assert c.tokens == reference("dense", tuple(p), 24, False)
        for s in engine.status():
            assert s.max_batch == 2 and 1 <= s.max_batch_seen <= 2, s
        wait_for(lambda: engine.cached_requests() == [0, 0], 10, what="caches freed")
    finally:
        engine.close()


def test_a_prompt_beyond_the_budgeted_context_is_resource_exhausted(nodes: StageNodes) -> None:
    engine = engine_for("dense", ["coordinator", nodes[0].name], nodes, context_tokens=32)
    try:
        with pytest.raises(PipelineError) as refused:
            list(engine.generate(GenerateRequest(prompt_ids=ids(40, 1), max_tokens=4)))
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "32 tokens per sequence" in str(refused.value)
        # generation stops at the budget: 30 prompt tokens leave room for 2
        request = GenerateRequest(prompt_ids=ids(30, 2), max_tokens=50, ignore_eos=True)
        done = list(engine.generate(request))[-1]
        assert isinstance(done, GenerationDone) and len(done.token_ids) == 2
    finally:
        engine.close()


def test_a_stage_refuses_sequences_beyond_its_budget(nodes: StageNodes) -> None:
    """A last stage loaded for max_batch 1 x 16 tokens, driven by hand on a real stream."""
    path = ensure_checkpoint(PRESETS["dense-high"])
    address = nodes[1].address
    with rpc.channel(address) as channel:
        stub = pb_grpc.StageServiceStub(channel)
        stub.LoadShard(
            pb.LoadShardRequest(
                instance_id="budget",
                model=str(path),
                start_layer=0,
                end_layer=6,
                position=0,
                num_stages=1,
                max_batch=1,
                context_tokens=16,
            ),
            timeout=120,
        )
        replies: SimpleQueue = SimpleQueue()
        link = ForwardLink(channel, "budget", replies.put, lambda e: None)
        try:
            for rid in ("a", "b"):
                link.send(pb.ForwardRequest(request_id=rid, open=pb.OpenRequest()))
            reply = replies.get(timeout=30)
            assert (reply.request_id, reply.WhichOneof("kind")) == ("b", "error")
            assert reply.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "max_batch 1" in reply.error.message
            act = pb.Activation(start_position=0, token_ids=list(range(17)), sample=True)
            link.send(pb.ForwardRequest(request_id="a", activation=act))
            reply = replies.get(timeout=30)
            assert reply.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "16 tokens per sequence" in reply.error.message
        finally:
            link.cancel()
            stub.UnloadShard(pb.UnloadShardRequest(instance_id="budget"), timeout=30)


def test_a_dead_stage_fails_the_whole_batch_and_frees_every_place(nodes: StageNodes) -> None:
    """Runs last of the cluster tests: it kills a node. Two requests decode, a third waits for
    a place; the stage dies: all three end with UNAVAILABLE (the waiting one once it gets its
    place), none hangs, and the coordinator holds no place and no request afterwards."""
    victim = nodes[1]
    engine = engine_for("dense", ["coordinator", victim.name], nodes, max_batch=2)
    try:
        clients = [Client(engine, ids(10, 70 + i), 3000, False) for i in range(3)]
        for c in clients:
            c.start()
        wait_for(lambda: engine.queued == 1 and engine.batch_size == 2, 60, what="a full batch")
        clients[0].wait_tokens(2)
        victim.kill()
        for c in clients:
            c.join(120)
            assert not c.is_alive()
            assert isinstance(c.error, PipelineError), c.error
            assert c.error.code == grpc.StatusCode.UNAVAILABLE
        assert (engine.batch_size, engine.queued, engine.in_flight) == (0, 0, [])
    finally:
        engine.close()


# ---- the pure parts ----


def _rows_job(session: int, rid: str, count: int, sample: bool) -> Job:
    return Job("rows", session, rows=[Row(rid, 0, list(range(count)), sample)])


def test_waiting_decode_rows_batch_and_prefill_chunks_of_newcomers_run_together() -> None:
    jobs = [
        Job("open", 1, "new"),
        _rows_job(1, "a", 1, True),
        _rows_job(1, "new", 64, False),  # a newcomer's prefill chunk
        _rows_job(1, "b", 1, True),
        _rows_job(1, "new", 64, False),
        _rows_job(1, "new", 1, True),  # its last prompt token: after its chunks
        _rows_job(1, "c", 3, True),  # a row of 3 positions: a forward of its own T
        _rows_job(2, "d", 1, True),  # another stream: never batched with the first
        Job("release", 1, "b"),  # gone: its pending row does not run
        _rows_job(1, "other", 9, False),  # another newcomer's chunk: prefilled with "new"
        _rows_job(2, "e", 5, False),  # another stream's chunk: waits for its own drain
    ]
    plan = plan_drain(jobs)
    assert [j.kind for j in plan.now] == ["open", "release"]
    assert [[e.row.rid for e in batch] for batch in plan.batches] == [["a"], ["c"], ["d"]]
    # newcomers' pieces in waves: first pieces together, "new"'s second one after them
    waves = [[(e.row.rid, len(e.row.token_ids)) for e in w] for w in plan.prefill]
    assert waves == [[("new", 64), ("other", 9)], [("new", 64)]]
    assert [e.job for e in plan.prefill[1]] == [jobs[4]]
    assert plan.chunk is None
    assert plan.requeue == [jobs[5], jobs[10]]  # its first sampled row: the next drain
    # the held-back rows of one request keep their order against its release
    x = [_rows_job(1, "x", 8, False), _rows_job(1, "x", 8, False)]
    later = plan_drain([*x, Job("release", 1, "x"), Job("end", 1)], 10)
    assert later.now == [] and [e.job for w in later.prefill for e in w] == x[:1]
    assert [j.kind for j in later.requeue] == ["rows", "release", "end"]
    # a request released while its prefill rows wait: they do not run
    gone = plan_drain([*x, Job("release", 1, "x")])
    assert [j.kind for j in gone.now] == ["release"] and gone.prefill == []
    # at most PREFILL_BATCH_TOKENS padded positions per drain; a longer row still runs alone
    big = plan_drain([_rows_job(1, "p", 600, False), _rows_job(1, "q", 600, False)], 1024)
    assert [[e.row.rid for e in w] for w in big.prefill] == [["p"]] and len(big.requeue) == 1
    huge = plan_drain([_rows_job(1, "h", 5000, False)], 1024)
    assert [[e.row.rid for e in w] for w in huge.prefill] == [["h"]]
    # padding counts: 2 rows of 100 and 10 cost 200 padded positions, not 110
    padded = plan_drain([_rows_job(1, "s", 100, False), _rows_job(1, "t", 10, False)], 150)
    assert [[e.row.rid for e in w] for w in padded.prefill] == [["s"]]
    # a batch frame's rows split across drains when they pass the budget, in their order
    job = Job("rows", 1, rows=[Row(r, 0, [1] * 400, False, i) for i, r in enumerate("uvw")])
    split = plan_drain([job], 1000)
    assert [e.row.rid for w in split.prefill for e in w] == ["u", "v"]
    ((rest,),) = [split.requeue]
    assert [(r.rid, r.index) for r in rest.rows] == [("w", 2)] and rest.tensor is job.tensor


def test_a_ragged_prefill_batch_computes_what_each_prompt_computes_alone() -> None:
    """Prompts of 1, 6 and 23 tokens (one already 4 tokens in) prefill as one right-padded
    forward (mlx-lm's prepare/finalize), then decode together, split, and go on alone: the
    same greedy tokens as each alone (and hidden states within the cross-shape noise)."""
    spec = PRESETS[MODELS["dense"]]
    shard = load_shard(ensure_checkpoint(spec), 0, spec.num_hidden_layers)
    prompts = {"a": ids(1, 11), "b": ids(6, 12), "c": ids(23, 13)}
    caches = BatchCaches(shard.make_cache)
    alone = {}
    for rid in prompts:
        caches.open((1, rid))
        alone[rid] = shard.make_cache()
    # "c" had a first chunk of 4 on its own
    shard.forward(mx.array([prompts["c"][:4]]), caches.solo((1, "c")))
    shard.forward(mx.array([prompts["c"][:4]]), alone["c"])
    pieces = {"a": prompts["a"], "b": prompts["b"], "c": prompts["c"][4:]}
    order, cache = caches.batch([(1, r) for r in pieces])
    lengths = [len(pieces[k[1]]) for k in order]
    width = max(lengths)
    for c in cache:
        c.prepare(lengths=lengths, right_padding=[width - n for n in lengths])
    x = mx.array([pieces[k[1]] + [0] * (width - len(pieces[k[1]])) for k in order])
    h = shard.forward(x, cache)
    for c in cache:
        c.finalize()
    for i, k in enumerate(order):
        own = shard.forward(mx.array([pieces[k[1]]]), alone[k[1]])
        n = lengths[i]
        assert mx.allclose(h[i, n - 1], own[0, -1], atol=1e-4).item(), k
        assert int(mx.argmax(shard.logits(h[i, n - 1])).item()) == int(
            mx.argmax(shard.logits(own[0, -1])).item()
        )
    current = {}
    for i, k in enumerate(order):
        current[k[1]] = int(mx.argmax(shard.logits(h[i, lengths[i] - 1])).item())
    for step in range(5):
        if step == 3:  # "b" goes on alone: the group is taken apart
            tok = current.pop("b")
            hb = shard.forward(mx.array([[tok]]), caches.solo((1, "b")))
            ha = shard.forward(mx.array([[tok]]), alone["b"])
            assert int(mx.argmax(shard.logits(hb[0, -1])).item()) == int(
                mx.argmax(shard.logits(ha[0, -1])).item()
            )
        order, cache = caches.batch([(1, r) for r in current])
        hb = shard.forward(mx.array([[current[k[1]]] for k in order]), cache)
        nxt = {}
        for i, k in enumerate(order):
            ha = shard.forward(mx.array([[current[k[1]]]]), alone[k[1]])
            assert mx.allclose(hb[i, -1], ha[0, -1], atol=1e-4).item(), (step, k)
            nxt[k[1]] = int(mx.argmax(shard.logits(ha[0, -1])).item())
            assert int(mx.argmax(shard.logits(hb[i, -1])).item()) == nxt[k[1]], (step, k)
        current = nxt


def test_a_prefill_batch_is_not_the_same_as_a_wrongly_padded_one() -> None:
    """Negative control for the test above: without prepare/finalize the padding is read
    as tokens, and the short prompt's state differs beyond the noise floor."""
    spec = PRESETS[MODELS["dense"]]
    shard = load_shard(ensure_checkpoint(spec), 0, spec.num_hidden_layers)
    short, long = ids(3, 21), ids(12, 22)
    caches = BatchCaches(shard.make_cache)
    for rid in "sl":
        caches.open((1, rid))
    order, cache = caches.batch([(1, "s"), (1, "l")])
    x = mx.array([short + [0] * 9, long] if order[0] == (1, "s") else [long, short + [0] * 9])
    shard.forward(x, cache)  # no prepare: the padding is processed as tokens
    row = order.index((1, "s"))
    own = shard.make_cache()
    shard.forward(mx.array([short]), own)
    nxt = [ids(1, 23)[0]] * 2
    hb = shard.forward(mx.array([[t] for t in nxt]), cache)
    ha = shard.forward(mx.array([nxt[:1]]), own)
    assert not mx.allclose(hb[row, -1], ha[0, -1], atol=1e-4).item()


def test_batch_caches_step_rows_exactly_like_their_own_caches() -> None:
    """Requests of different lengths stepping as one batch (joining, a leaving one filtered
    out) compute what each computes alone, and the last one left continues on its own."""
    spec = PRESETS[MODELS["dense"]]
    shard = load_shard(ensure_checkpoint(spec), 0, spec.num_hidden_layers)
    prompts = {"a": ids(5, 1), "b": ids(17, 2), "c": ids(1, 3)}
    caches = BatchCaches(shard.make_cache)
    alone = {}
    for rid, prompt in prompts.items():
        key = (1, rid)
        caches.open(key)
        own = shard.make_cache()
        if len(prompt) > 1:
            shard.forward(mx.array([prompt[:-1]]), caches.solo(key))
            shard.forward(mx.array([prompt[:-1]]), own)
        alone[rid] = own

    def step_alone(rid: str, token: int) -> int:
        h = shard.forward(mx.array([[token]]), alone[rid])
        return int(mx.argmax(shard.logits(h[:, -1:, :])[0], -1).item())

    def step_batch(tokens: dict[str, int]) -> dict[str, int]:
        order, cache = caches.batch([(1, r) for r in tokens])
        h = shard.forward(mx.array([[tokens[k[1]]] for k in order]), cache)
        picks = mx.argmax(shard.logits(h[:, -1:, :]), -1)
        return {k[1]: int(picks[i, 0].item()) for i, k in enumerate(order)}

    current = {rid: p[-1] for rid, p in prompts.items()}
    for step in range(6):
        if step == 3:
            caches.release((1, "b"))
            del current["b"]
        batched = step_batch(current)
        expected = {rid: step_alone(rid, t) for rid, t in current.items()}
        assert batched == expected, step
        current = batched
    assert caches.groups() == [2]
    caches.release((1, "a"))
    assert caches.groups() == []  # "c" alone again, on its own caches
    h = shard.forward(mx.array([[current["c"]]]), caches.solo((1, "c")))
    assert int(mx.argmax(shard.logits(h[:, -1:, :])[0], -1).item()) == step_alone("c", current["c"])


def test_a_prompt_cache_snapshot_waits_for_the_pieces_before_it() -> None:
    """A ``snapshot`` job copies its request's caches as the jobs before it left them: when
    its prompt's last piece runs in this drain's waves, the snapshot (and the sampled row
    after it) wait for the next drain; with nothing of its request pending it runs now."""
    piece, last = _rows_job(1, "s", 64, False), _rows_job(1, "s", 1, True)
    snapshot = Job("snapshot", 1, "s")
    plan = plan_drain([Job("open", 1, "s"), piece, snapshot, last, Job("snapshot", 1, "idle")])
    assert [(j.kind, j.rid) for j in plan.now] == [("open", "s"), ("snapshot", "idle")]
    assert [e.job for w in plan.prefill for e in w] == [piece]
    assert plan.requeue == [snapshot, last]
    after = plan_drain(plan.requeue)
    assert after.now == [snapshot] and [[e.row.rid for e in b] for b in after.batches] == [["s"]]
