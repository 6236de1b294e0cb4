"""Continuous batching through a real daemon and the gRPC API.

One ``macmesh run`` process (``--max-batch 3``, 5 requests admitted) serves tiny dense and MoE
checkpoints without an MTP head (``local`` engine). Concurrent Generate calls (prompts of 1 to
300 tokens, half with penalties) each get mlx-lm's own greedy output for their prompt alone; status shows the batch and the queue filling and
draining; admission answers RESOURCE_EXHAUSTED beyond the queue.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import threading

import grpc
import pytest
from helpers.cluster_client import launch, stub
from helpers.daemons import DaemonCluster, wait_for
from helpers.mlx_lm_reference import mlx_lm_greedy
from typer.testing import CliRunner

from node.checkpoints import PRESETS, ensure_checkpoint
from node.cli import app
from node.client import MacmeshClient
from node.inference.loading import load_checkpoint
from node.inference.sampling import SamplingParams
from node.proto.macmesh.v1 import inference_pb2 as pb

MAX_BATCH = 3
MAX_QUEUED = 5
PENALTIES = dict(repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.1)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    checkpoint = ensure_checkpoint(PRESETS["dense-stripped"])
    root = tmp_path_factory.mktemp("batching")
    with DaemonCluster(root) as cluster:
        node = cluster.start(
            "batcher",
            mdns=False,
            extra_args=["--max-batch", str(MAX_BATCH)],
            env={"MACMESH_MAX_QUEUED_REQUESTS": str(MAX_QUEUED)},
        )
        _, instance = launch(node.address, str(checkpoint))
        yield node, instance, checkpoint


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, 500) for _ in range(n)]


def request(model: str, prompt: list[int], max_tokens: int, penalties: bool) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(**PENALTIES) if penalties else pb.SamplingParams()
    return pb.GenerateRequest(
        model=model,
        prompt_ids=pb.TokenIds(ids=prompt),
        max_tokens=max_tokens,
        ignore_eos=True,
        sampling=sampling,
    )


def instance_status(address: str, instance_id: str) -> pb.Instance:
    channel, inference = stub(address)
    with channel:
        reply = inference.ClusterStatus(pb.ClusterStatusRequest(local_only=True), timeout=10)
    return next(i for i in reply.instances if i.instance_id == instance_id)


@pytest.mark.parametrize("preset", ["dense-stripped", "moe-stripped"])
def test_concurrent_requests_each_equal_mlx_lm_alone(daemon, preset: str) -> None:
    node, instance, checkpoint = daemon
    instance_id = instance.instance_id
    if preset != "dense-stripped":  # a second instance on the same daemon
        checkpoint = ensure_checkpoint(PRESETS[preset])
        _, other = launch(node.address, str(checkpoint))
        instance_id = other.instance_id
    model = load_checkpoint(checkpoint).model
    lengths = [1, 300, 7, 40, 90]  # no more than MAX_QUEUED
    cases = [(ids(n, s), 8 + 3 * s, s % 2 == 1) for s, n in enumerate(lengths)]
    results: dict[int, list] = {}

    def run(i: int) -> None:
        channel, inference = stub(node.address)
        with channel:
            results[i] = list(inference.Generate(request(instance_id, *cases[i]), timeout=300))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (prompt, budget, penalties) in enumerate(cases):
        params = SamplingParams(**PENALTIES) if penalties else None
        expected = mlx_lm_greedy(model, prompt, budget, params)
        got = [t for r in results[i] if r.HasField("delta") for t in r.delta.token_ids]
        final = results[i][-1].final
        assert got == expected, f"request {i} ({len(prompt)} prompt tokens)"
        assert final.engine == "local" and final.generation_tokens == budget
        assert final.time_to_first_token_seconds >= final.queue_seconds >= 0.0
        assert final.time_to_first_token_seconds > 0.0
    if instance_id != instance.instance_id:
        channel, inference = stub(node.address)
        with channel:
            inference.Unload(pb.UnloadRequest(instance_id=instance_id), timeout=60)


def test_status_shows_batch_and_queue_and_admission_refuses_beyond_it(daemon) -> None:
    node, instance, _ = daemon
    channel, inference = stub(node.address)
    long = [
        inference.Generate(request(instance.instance_id, ids(6, 50 + i), 3000, False), timeout=300)
        for i in range(MAX_QUEUED)
    ]
    try:
        for call in long:
            call.initial_metadata()  # accepted
        seen = wait_for(
            lambda: (
                (s := instance_status(node.address, instance.instance_id)).batch_size == MAX_BATCH
                and s.queued == MAX_QUEUED - MAX_BATCH
                and s
            ),
            timeout=60,
            what="a full batch and a queue",
        )
        assert seen.in_flight == MAX_QUEUED
        shown = CliRunner().invoke(app, ["status", "--node", node.address, "--json"])
        assert shown.exit_code == 0, shown.output
        mine = next(
            i
            for i in json.loads(shown.output)["instances"]
            if i["instance_id"] == instance.instance_id
        )
        assert (mine["batch_size"], mine["queued"]) == (MAX_BATCH, MAX_QUEUED - MAX_BATCH)
        table = CliRunner().invoke(app, ["status", "--node", node.address], env={"COLUMNS": "200"})
        assert "batch/q" in table.output
        assert f" {MAX_BATCH}/{MAX_QUEUED - MAX_BATCH} " in table.output, table.output
        with pytest.raises(grpc.RpcError) as refused:
            list(inference.Generate(request(instance.instance_id, [1, 2], 2, False), timeout=60))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(MAX_QUEUED) in refused.value.details()
    finally:
        for call in long:
            call.cancel()
        channel.close()
    wait_for(
        lambda: (
            (s := instance_status(node.address, instance.instance_id)).batch_size == 0
            and s.queued == 0
            and s.in_flight == 0
        ),
        timeout=60,
        what="cancelled requests leaving the batch",
    )


def cli_generate(address: str, model: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "node.cli", "generate", model, "--node", address, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_final_stats_carry_the_queue_wait_to_the_cli(daemon) -> None:
    """A request that waited behind a full batch reports the wait and its time to first token
    in `macmesh generate --json`; the stats line shows both."""
    node, instance, _ = daemon
    model = instance.instance_id
    channel, inference = stub(node.address)
    long = [
        inference.Generate(request(model, ids(6, 70 + i), 3000, False), timeout=300)
        for i in range(MAX_BATCH)
    ]
    try:
        for call in long:
            call.initial_metadata()
        wait_for(
            lambda: instance_status(node.address, model).batch_size == MAX_BATCH,
            timeout=60,
            what="a full batch",
        )
        queued = cli_generate(
            node.address,
            model,
            "--prompt-ids",
            "5,6,7",
            "--max-tokens",
            "3",
            "--ignore-eos",
            "--json",
        )
        wait_for(
            lambda: instance_status(node.address, model).queued == 1,
            timeout=60,
            what="the CLI's request in the queue",
        )
    finally:
        for call in long:
            call.cancel()
        channel.close()
    out, err = queued.communicate(timeout=120)
    assert queued.returncode == 0, err
    stats = json.loads(out)["stats"]
    assert stats["queue_seconds"] > 0.0
    assert stats["time_to_first_token_seconds"] >= stats["queue_seconds"]

    line = cli_generate(node.address, model, "--prompt-ids", "5,6,7", "--max-tokens", "3")
    _, err = line.communicate(timeout=120)
    assert line.returncode == 0, err
    assert re.search(r"first token \d+ ms \(queued \d+ ms\)", err), err


def test_generation_stays_within_the_memory_the_launch_budgeted(daemon) -> None:
    """A launch's context_length is the memory budget per sequence (x max_batch): a prompt
    beyond it is RESOURCE_EXHAUSTED naming the budget, a generation stops at it."""
    node, _, checkpoint = daemon
    with MacmeshClient(node.address, timeout=120) as client:
        events = list(client.launch(str(checkpoint), context_length=64))
    small = events[-1].instance.instance_id
    channel, inference = stub(node.address)
    with channel:
        with pytest.raises(grpc.RpcError) as refused:
            list(inference.Generate(request(small, ids(70, 1), 4, False), timeout=60))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "64 tokens per sequence x 3 sequences" in refused.value.details()
        final = list(inference.Generate(request(small, ids(50, 2), 100, False), timeout=120))[-1]
        assert (final.final.finish_reason, final.final.generation_tokens) == ("length", 14)
        assert inference.Unload(pb.UnloadRequest(instance_id=small), timeout=60).unloaded == 1
