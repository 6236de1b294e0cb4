#!/usr/bin/env python3
"""Benchmark pipelined decode on 1, 2 and 3 local nodes, with MLX's ring backend as the anchor.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python scripts/bench_pipeline.py --json bench_pipeline.json

(The script re-executes itself with that LD_PRELOAD when the library exists and it is not set.)

One checkpoint (``node.checkpoints.bench_spec``, ~270M fp32 parameters unless ``--params``) is
placed on 1, 2 and 3 nodes. The coordinator (this process) runs stage 0; the other nodes are
stage-server processes on 127.0.0.1. A machine with few cores stands in for several machines:
each node is pinned to its own core (round-robin when there are more nodes than cores) with
one BLAS thread, so one node never borrows another's core (``--no-pin`` turns this off).

Measured per node count: single-stream decode tok/s, aggregate decode tok/s with ``--streams``
concurrent streams, prefill tok/s, and (2+ nodes) the round trip of a decode-sized activation
(10 KB: 1 x 2560 fp32) through a stage's Forward stream (encode, hop, decode on the stage's
worker, re-encode, hop back, decode; per-hop = half of it), and the transfer rate of a prefill-
sized activation (8192 tokens x the model width). Anchors in the same run: the round trip of a
bare gRPC bidi echo (same server type, no codec, no worker) and of MLX's ring backend
(``mx.distributed`` send/recv between two processes over loopback). Prints a table, writes JSON.

``--batch``: pipeline batching. 1 and ``--batch-streams`` concurrent streams (prompts of
``--prompt-tokens``, ``--tokens`` each, all started at once) on each of ``--batch-nodes``,
interleaved ``--batch-repeats`` rounds, medians: aggregate tok/s over the whole wall time
(prefills included) and per CPU second of every node process, each against its own one
stream. Modes: the pipeline as it runs; the control, in the same run, with stage 0 prefilling
one request per drain (prefills not batched); with ``--mtp`` also pipeline_mtp at each
``--batch-ks`` and with its K policy (verify rows batched across requests). Exactness: each
mode's tokens against the control's.

``--mtp``: native MTP across the pipeline (``pipeline_mtp``) against the plain pipeline, on
the same loaded stages (a pipeline_mtp instance runs ``engine=pipeline`` requests as plain
pipelined decode), for each node count in ``--mtp-nodes`` and each simulated per-hop
latency in ``--hop-delays-ms`` (``MACMESH_TEST_HOP_DELAY_MS``, a test-only delay line on
every stage link; node.inference.link): single-stream decode tok/s of plain decode and of
pipeline_mtp at K = 1..4 and with the K policy, interleaved, ``--mtp-repeats`` rounds,
medians. The anchor, in the same run: single-node native MTP at its best K over single-node
target-only decode. The checkpoint's constructed head is dialled to ``--agreement``
(per-draft acceptance ~ that level).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
HOP_ELEMENTS = 2560  # 10 KB of float32

# ---- child processes: a bare gRPC echo server and one MLX ring rank ----


def serve_echo() -> None:
    """A bidi echo on the same kind of server the daemon runs: the gRPC floor."""
    from node import rpc
    from node.proto.macmesh.v1 import stage_pb2 as pb
    from node.proto.macmesh.v1 import stage_pb2_grpc as pb_grpc

    class Echo(pb_grpc.StageServiceServicer):
        def Forward(self, request_iterator, context):
            for frame in request_iterator:
                yield pb.ForwardResponse(request_id=frame.request_id, probe=frame.probe)

    server, _ = rpc.make_server()
    pb_grpc.add_StageServiceServicer_to_server(Echo(), server)
    port = rpc.bind(server, "127.0.0.1", 0)
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def ring_rank(repeats: int) -> None:
    """One rank of a 2-process ring: rank 0 sends 10 KB, rank 1 sends it back."""
    import mlx.core as mx

    group = mx.distributed.init(backend="ring", strict=True)
    rank = group.rank()
    x = mx.ones((HOP_ELEMENTS,), dtype=mx.float32)
    mx.eval(x)
    timings = []
    for i in range(repeats):
        x = mx.full((HOP_ELEMENTS,), float(i))  # a fresh activation each time, as in decode
        mx.eval(x)
        began = time.perf_counter()
        if rank == 0:
            mx.eval(mx.distributed.send(x, 1, group=group))
            mx.eval(mx.distributed.recv_like(x, 1, group=group))
        else:
            y = mx.distributed.recv_like(x, 0, group=group)
            mx.eval(y)
            mx.eval(mx.distributed.send(y, 0, group=group))
        timings.append(time.perf_counter() - began)
    if rank == 0:
        print(json.dumps(timings[repeats // 10 :]), flush=True)


# ---- the parent ----


def pin(core: int | None) -> None:
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OPENBLAS_NUM_THREADS"] = env.get("OPENBLAS_NUM_THREADS", "1")
    env["MACMESH_LOG_LEVEL"] = "warning"
    return env


def start_stage_servers(
    count: int, cores: list[int | None], workdir: Path
) -> list[tuple[subprocess.Popen, str]]:
    servers = []
    for i in range(count):
        port_file = workdir / f"stage{i + 1}.port"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node.inference.stage",
                "--port",
                "0",
                "--port-file",
                str(port_file),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(workdir / f"stage{i + 1}.log", "wb"),  # noqa: SIM115 - lives with the process
            env=child_env(),
            preexec_fn=(lambda core=cores[i + 1]: pin(core)),
        )
        servers.append((proc, port_file))
    started = []
    for proc, port_file in servers:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"stage server failed to start; see {port_file.with_suffix('.log')}"
                )
            time.sleep(0.05)
        started.append((proc, f"127.0.0.1:{port_file.read_text().strip()}"))
    return started


def ring_round_trips(repeats: int, workdir: Path, cores: list[int | None]) -> list[float]:
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    hostfile = workdir / "ring-hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--ring-rank", "--hop-repeats", str(repeats)],
            stdout=subprocess.PIPE,
            text=True,
            env={**child_env(), "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)},
            preexec_fn=(lambda core=cores[rank]: pin(core)),
        )
        for rank in range(2)
    ]
    out, _ = procs[0].communicate(timeout=300)
    procs[1].wait(timeout=60)
    return json.loads(out.strip().splitlines()[-1])


def grpc_echo_round_trips(repeats: int, cores: list[int | None]) -> list[float]:
    import queue

    from node import rpc
    from node.proto.macmesh.v1 import stage_pb2 as pb
    from node.proto.macmesh.v1 import stage_pb2_grpc as pb_grpc

    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-echo"],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
        preexec_fn=(lambda: pin(cores[1])),
    )
    try:
        port = int(proc.stdout.readline())
        channel = rpc.channel(f"127.0.0.1:{port}")
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        call = pb_grpc.StageServiceStub(channel).Forward(iter(outbox.get, None))
        frame = pb.ForwardRequest(
            request_id="e", probe=pb.Probe(tensor=pb.TensorChunk(data=b"\0" * HOP_ELEMENTS * 4))
        )
        timings = []
        for _ in range(repeats):
            began = time.perf_counter()
            outbox.put(frame)
            next(call)
            timings.append(time.perf_counter() - began)
        outbox.put(None)
        channel.close()
        return timings[repeats // 10 :]
    finally:
        proc.kill()


def measure_generation(engine: Any, prompt: list[int], tokens: int) -> dict[str, float]:
    from node.inference.requests import GenerateRequest

    began = time.perf_counter()
    done = list(
        engine.generate(GenerateRequest(prompt_ids=prompt, max_tokens=tokens, ignore_eos=True))
    )[-1]
    wall = time.perf_counter() - began
    return {
        "generation_tps": done.stats.generation_tps,
        "prompt_tps": done.stats.prompt_tps,
        "tokens": len(done.token_ids),
        "wall_tps": len(done.token_ids) / wall,
    }


def measure_streams(engine: Any, prompts: list[list[int]], tokens: int) -> dict[str, float]:
    """Aggregate decode of concurrent streams, counted only while every stream decodes.

    The window opens at the last stream's first token (every prefill is done) and closes at
    the first stream's last token (none has finished); only tokens that arrive inside it
    count, so neither the staggered prefills nor a stream running alone at the end inflate
    or deflate the figure."""
    from node.inference.requests import GenerateRequest

    arrivals: list[list[float]] = [[] for _ in prompts]
    barrier = threading.Barrier(len(prompts) + 1)

    def stream(i: int) -> None:
        barrier.wait()
        request = GenerateRequest(prompt_ids=prompts[i], max_tokens=tokens, ignore_eos=True)
        for event in engine.generate(request):
            if event.kind == "delta":
                now = time.perf_counter()
                arrivals[i].extend([now] * len(event.token_ids))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    barrier.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    ended = time.perf_counter()
    opens = max(times[0] for times in arrivals)
    closes = min(times[-1] for times in arrivals)
    inside = sum(1 for times in arrivals for t in times if opens < t <= closes)
    total = sum(len(times) for times in arrivals)
    return {
        "streams": len(prompts),
        "tokens": total,
        "wall_tps": total / (ended - began),
        "window_seconds": closes - opens,
        "window_tokens": inside,
        "decode_tps": inside / (closes - opens) if closes > opens else 0.0,
    }


def bench_nodes(
    n: int, args: argparse.Namespace, checkpoint: Path, addresses: list[str]
) -> dict[str, Any]:
    import mlx.core as mx

    from node.inference.pipeline import PipelineEngine, SimplePlacement
    from node.inference.probe import probe_round_trips

    names = ["coordinator", *[f"node{i}" for i in range(1, n)]]
    config = json.loads((checkpoint / "config.json").read_text())
    num_layers = config["text_config"]["num_hidden_layers"]
    width = config["text_config"]["hidden_size"]
    engine = PipelineEngine(
        checkpoint,
        SimplePlacement.even(num_layers, names),
        {name: addresses[i - 1] for i, name in enumerate(names) if i > 0},
        local_node_id="coordinator",
    )
    began = time.perf_counter()
    shards = engine.load()
    result: dict[str, Any] = {
        "nodes": n,
        "load_seconds": time.perf_counter() - began,
        "stages": [
            {
                "layers": [s.start_layer, s.end_layer],
                "weight_mb": s.weight_bytes / 2**20,
                "resident_mb": s.resident_bytes / 2**20,
            }
            for s in shards
        ],
    }
    try:
        prompt = [(7 * i + 3) % 480 for i in range(args.prompt_tokens)]
        measure_generation(engine, prompt, 4)  # warm-up: first-call allocations, connections
        runs = [measure_generation(engine, prompt, args.tokens) for _ in range(args.runs)]
        best = max(runs, key=lambda r: r["generation_tps"])
        result["single_stream"] = best
        result["ms_per_token"] = 1000 / best["generation_tps"]
        prompts = [
            [(7 * i + 3 + 11 * s) % 480 for i in range(args.prompt_tokens)]
            for s in range(args.streams)
        ]
        result["concurrent"] = measure_streams(engine, prompts, args.tokens)
        long_prompt = [(5 * i + 1) % 480 for i in range(args.prefill_tokens)]
        result["prefill"] = {
            "tokens": args.prefill_tokens,
            **measure_generation(engine, long_prompt, 1),
        }
        if n >= 2:
            small = mx.random.normal((1, 1, HOP_ELEMENTS))
            rtts = probe_round_trips(addresses[0], engine.instance_id, small, args.hop_repeats)[
                args.hop_repeats // 10 :
            ]
            result["hop_10kb"] = summarize(rtts)
            big = mx.random.normal((1, 8192, width))
            rtts = probe_round_trips(addresses[0], engine.instance_id, big, 4)[1:]
            result["prefill_transfer"] = {
                "shape": [1, 8192, width],
                "bytes": big.nbytes,
                "round_trip_ms": statistics.median(rtts) * 1000,
                "mb_per_s": 2 * big.nbytes / statistics.median(rtts) / 1e6,
            }
    finally:
        engine.close()
    return result


def _decode_tps(runner: Any, prompt: list[int], tokens: int, **request: Any) -> tuple[float, Any]:
    from node.inference.requests import GenerateRequest

    done = list(
        runner.generate(
            GenerateRequest(prompt_ids=prompt, max_tokens=tokens, ignore_eos=True, **request)
        )
    )[-1]
    return done.stats.generation_tps, done.stats


MTP_KS = (1, 2, 3, 4)


def bench_single_node_mtp(args: argparse.Namespace, checkpoint: Path) -> dict[str, Any]:
    """The anchor: native MTP on one node over target-only decode, interleaved, medians."""
    from node.inference.engine import LocalEngine
    from node.inference.loading import load_checkpoint
    from node.inference.mtp.engine import MtpEngine

    loaded = load_checkpoint(checkpoint)
    local, mtp = LocalEngine(loaded), MtpEngine(loaded, fixed_k=None)
    prompt = [(7 * i + 3) % 480 for i in range(args.prompt_tokens)]
    modes: dict[str, Any] = {"target_only": lambda: _decode_tps(local, prompt, args.tokens)}
    for k in MTP_KS:
        modes[f"K={k}"] = lambda k=k: _decode_tps(mtp, prompt, args.tokens, mtp_k=k)
    return _interleave(modes, args.mtp_repeats, "target_only")


def _interleave(modes: dict[str, Any], repeats: int, base: str) -> dict[str, Any]:
    for run in modes.values():  # warm-up
        run()
    samples: dict[str, list[float]] = {name: [] for name in modes}
    accept: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(repeats):
        for name, run in modes.items():
            tps, stats = run()
            samples[name].append(tps)
            if stats.acceptance_rate is not None:
                accept[name].append(stats.acceptance_rate)
    medians = {name: statistics.median(v) for name, v in samples.items()}
    return {
        name: {
            "tps_median": medians[name],
            "tps_samples": samples[name],
            "speedup": medians[name] / medians[base],
            "acceptance": statistics.median(accept[name]) if accept[name] else None,
        }
        for name in modes
    }


def bench_pipeline_mtp(args: argparse.Namespace, checkpoint: Path, cores: list[int | None]) -> list:
    from node.inference.pipeline import SimplePlacement
    from node.inference.pipeline_mtp import PipelineMtpEngine

    config = json.loads((checkpoint / "config.json").read_text())
    num_layers = config["text_config"]["num_hidden_layers"]
    prompt = [(7 * i + 3) % 480 for i in range(args.prompt_tokens)]
    out = []
    for delay in args.hop_delays_ms:
        os.environ["MACMESH_TEST_HOP_DELAY_MS"] = str(delay)  # the coordinator's links, and
        with tempfile.TemporaryDirectory(prefix="bench-pipeline-mtp-") as tmp:  # the servers'
            servers = start_stage_servers(max(args.mtp_nodes) - 1, cores, Path(tmp))
            try:
                addresses = [address for _, address in servers]
                for n in args.mtp_nodes:
                    names = ["coordinator", *[f"node{i}" for i in range(1, n)]]
                    engine = PipelineMtpEngine(
                        checkpoint,
                        SimplePlacement.even(num_layers, names),
                        {name: addresses[i - 1] for i, name in enumerate(names) if i > 0},
                        local_node_id="coordinator",
                        mtp_k_limits=(2, max(MTP_KS)),
                    )
                    engine.load()
                    try:
                        modes: dict[str, Any] = {
                            "pipeline": lambda e=engine: _decode_tps(
                                e, prompt, args.tokens, engine="pipeline"
                            )
                        }
                        for k in MTP_KS:
                            modes[f"K={k}"] = lambda e=engine, k=k: _decode_tps(
                                e, prompt, args.tokens, mtp_k=k
                            )
                        modes["policy"] = lambda e=engine: _decode_tps(e, prompt, args.tokens)
                        print(f"-- pipeline_mtp: {n} nodes, hop delay {delay} ms", flush=True)
                        out.append(
                            {
                                "nodes": n,
                                "hop_delay_ms": delay,
                                "modes": _interleave(modes, args.mtp_repeats, "pipeline"),
                            }
                        )
                    finally:
                        engine.close()
            finally:
                for proc, _ in servers:
                    proc.terminate()
                for proc, _ in servers:
                    proc.wait(timeout=30)
    os.environ.pop("MACMESH_TEST_HOP_DELAY_MS", None)
    return out


def run_streams(
    engine: Any, prompts: list[list[int]], tokens: int, pids: list[int], options: dict[str, Any]
):
    """S concurrent streams, one reading thread each, as bench_batch.py runs them: aggregate
    tok/s over the whole wall time (prefills included), CPU time of every node process, and
    the tokens (for the exactness check against the control)."""
    import psutil

    from node.inference.requests import GenerateRequest

    procs = [psutil.Process(pid) for pid in pids]

    def cpu_now() -> float:
        return time.process_time() + sum(p.cpu_times().user + p.cpu_times().system for p in procs)

    outs: list[list[int]] = [[] for _ in prompts]
    stats: list[Any] = [None] * len(prompts)
    before = [
        (st.frames_processed, st.batched_forwards, st.batched_prefills) for st in engine.status()
    ]
    began, cpu = time.perf_counter(), cpu_now()

    def stream(i: int) -> None:
        request = GenerateRequest(
            prompt_ids=prompts[i], max_tokens=tokens, ignore_eos=True, **options
        )
        for event in engine.generate(request):
            if event.kind == "delta":
                outs[i] += event.token_ids
            else:
                stats[i] = event.stats

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, used = time.perf_counter() - began, cpu_now() - cpu
    total = sum(len(o) for o in outs)
    proposed = sum(st.proposed_draft_tokens or 0 for st in stats if st is not None)
    accepted = sum(st.accepted_draft_tokens or 0 for st in stats if st is not None)
    return {
        "tokens": outs,
        "aggregate_tps": total / wall,
        "aggregate_cpu_tps": total / used,
        "wall_s": wall,
        "acceptance": accepted / proposed if proposed else None,
        "mean_k": statistics.mean(st.num_draft_tokens or 0 for st in stats if st is not None),
        "stage_forwards": [
            {
                "forwards": st.frames_processed - f,
                "batched": st.batched_forwards - b,
                "batched_prefills": st.batched_prefills - q,
            }
            for st, (f, b, q) in zip(engine.status(), before, strict=True)
        ],
    }


def bench_batching(args: argparse.Namespace, checkpoint: Path, cores: list[int | None]) -> list:
    """Pipeline batching: 1 and S concurrent streams on N nodes, interleaved rounds, medians.
    Modes: the pipeline as it runs (prefills that arrive together batched), the control with
    stage 0 prefilling one request per drain (``prefill_batch_tokens = 0``: the behaviour
    before ragged prefill batches), and with ``--mtp``, pipeline_mtp at each ``--batch-ks``
    (verify rows of the requests batched)."""
    from node.inference.pipeline import PipelineEngine, SimplePlacement
    from node.inference.pipeline_mtp import PipelineMtpEngine
    from node.inference.stage_batch import PREFILL_BATCH_TOKENS

    config = json.loads((checkpoint / "config.json").read_text())
    num_layers = config["text_config"]["num_hidden_layers"]
    counts = sorted({1, *args.batch_streams})
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-batch-") as tmp:
        servers = start_stage_servers(max(args.batch_nodes) - 1, cores, Path(tmp))
        try:
            addresses = [address for _, address in servers]
            pids = [proc.pid for proc, _ in servers]
            for n in args.batch_nodes:
                names = ["coordinator", *[f"node{i}" for i in range(1, n)]]
                where = {name: addresses[i - 1] for i, name in enumerate(names) if i > 0}
                placement = SimplePlacement.even(num_layers, names)
                batch = max(max(counts), 16)
                engine = (
                    PipelineMtpEngine(
                        checkpoint,
                        placement,
                        where,
                        local_node_id="coordinator",
                        mtp_k_limits=(2, max(MTP_KS)),
                        max_batch=batch,
                    )
                    if args.mtp
                    else PipelineEngine(
                        checkpoint, placement, where, local_node_id="coordinator", max_batch=batch
                    )
                )
                engine.load()
                stage0 = engine._local
                used = pids[: n - 1]  # the stage servers this engine runs on

                def plain(
                    prompts: list[list[int]], batched_prefill: bool, e=engine, s0=stage0, u=used
                ):
                    s0.prefill_batch_tokens = PREFILL_BATCH_TOKENS if batched_prefill else 0
                    try:
                        return run_streams(e, prompts, args.tokens, u, {"engine": "pipeline"})
                    finally:
                        s0.prefill_batch_tokens = PREFILL_BATCH_TOKENS

                modes: dict[str, Any] = {
                    "pipeline": lambda p: plain(p, True),
                    "prefill alone": lambda p: plain(p, False),
                }
                if args.mtp:
                    for k in args.batch_ks:
                        modes[f"mtp K={k}"] = lambda p, k=k, e=engine, u=used: run_streams(
                            e, p, args.tokens, u, {"mtp_k": k}
                        )
                    modes["mtp policy"] = lambda p, e=engine, u=used: run_streams(
                        e, p, args.tokens, u, {}
                    )
                print(f"-- pipeline batching: {n} nodes, streams {counts}", flush=True)
                for s in (1, max(counts)):  # warm-up
                    for run in modes.values():
                        run(_prompts(s, args.prompt_tokens, 77))
                samples: dict[str, dict[int, list[dict[str, Any]]]] = {m: {} for m in modes}
                try:
                    for round_ in range(args.batch_repeats):
                        for s in counts:
                            prompts = _prompts(s, args.prompt_tokens, s + 100 * round_)
                            for name, run in modes.items():
                                result = run(prompts)
                                samples[name].setdefault(s, []).append(result)
                                print(
                                    f"  round {round_ + 1} {name:>13} x{s:<2}: "
                                    f"{result['aggregate_tps']:7.2f} tok/s, "
                                    f"{result['aggregate_cpu_tps']:7.2f} per CPU s",
                                    flush=True,
                                )
                finally:
                    engine.close()
                out.append(
                    {"nodes": n, "summary": _batch_summary(samples, counts), "samples": samples}
                )
        finally:
            for proc, _ in servers:
                proc.terminate()
            for proc, _ in servers:
                proc.wait(timeout=30)
    return out


def _prompts(s: int, length: int, seed: int) -> list[list[int]]:
    return [[(7 * i + 3 + 11 * j + 13 * seed) % 480 for i in range(length)] for j in range(s)]


def _batch_summary(samples: dict[str, Any], counts: list[int]) -> dict[str, Any]:
    """Medians per (mode, streams); ratios to the mode's own one stream and to the plain
    pipeline; exactness = tokens equal the control's (prefill alone) in the same round."""
    summary: dict[str, Any] = {}
    for name, by_s in samples.items():
        one = statistics.median(r["aggregate_tps"] for r in by_s[1])
        one_cpu = statistics.median(r["aggregate_cpu_tps"] for r in by_s[1])
        rows = {}
        for s in counts:
            tps = statistics.median(r["aggregate_tps"] for r in by_s[s])
            cpu = statistics.median(r["aggregate_cpu_tps"] for r in by_s[s])
            plain = statistics.median(r["aggregate_tps"] for r in samples["pipeline"][s])
            control = samples["prefill alone"][s]
            exact = sum(
                a == b
                for r, c in zip(by_s[s], control, strict=True)
                for a, b in zip(r["tokens"], c["tokens"], strict=True)
            )
            accept = [r["acceptance"] for r in by_s[s] if r["acceptance"] is not None]
            mean_k = statistics.median(r["mean_k"] for r in by_s[s])
            rows[s] = {
                "aggregate_tps": tps,
                "x_one_stream": tps / one,
                "cpu_x_one_stream": cpu / one_cpu,
                "x_plain_pipeline": tps / plain,
                "exact_vs_control": f"{exact}/{sum(len(r['tokens']) for r in by_s[s])}",
                "acceptance": statistics.median(accept) if accept else None,
                "mean_k": mean_k,
                "stage_forwards": by_s[s][0]["stage_forwards"],
            }
        summary[name] = rows
    return summary


def print_batch_table(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(
        f"\n{m['cpu']}, {m['cores']} cores, BLAS {m['blas_preload'] or 'reference'}; load "
        f"average before/after {m['load_average'][0]:.1f}/{m['load_average_after'][0]:.1f}"
    )
    for run in results["pipeline_batching"]:
        print(f"{run['nodes']} nodes")
        rows = [
            ("mode", "streams", "tok/s", "x 1 stream", "CPU x 1", "x plain", "exact", "accept", "K")
        ]
        for name, by_s in run["summary"].items():
            for s, r in by_s.items():
                rows.append(
                    (
                        name,
                        str(s),
                        f"{r['aggregate_tps']:.2f}",
                        f"{r['x_one_stream']:.2f}x",
                        f"{r['cpu_x_one_stream']:.2f}x",
                        f"{r['x_plain_pipeline']:.2f}x",
                        r["exact_vs_control"],
                        "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}",
                        f"{r['mean_k']:.2f}",
                    )
                )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))


def print_mtp_table(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(
        f"\n{m['cpu']}, {m['cores']} cores, BLAS {m['blas_preload'] or 'reference'}; load "
        f"average before/after {m['load_average'][0]:.1f}/{m['load_average_after'][0]:.1f}"
    )
    single = results["single_node_mtp"]
    best = max((v["speedup"], k) for k, v in single.items() if k != "target_only")
    print(
        f"anchor: 1 node target-only {single['target_only']['tps_median']:.2f} tok/s; native MTP "
        + ", ".join(f"{k} {v['speedup']:.2f}x" for k, v in single.items() if k != "target_only")
        + f" (best {best[1]} {best[0]:.2f}x)"
    )
    names = ["pipeline", *[f"K={k}" for k in MTP_KS], "policy"]
    rows = [("nodes", "hop delay", *[f"{n} tok/s (x)" for n in names], "accept K=2")]
    for r in results["pipeline_mtp"]:
        modes = r["modes"]
        rows.append(
            (
                str(r["nodes"]),
                f"{r['hop_delay_ms']} ms",
                *[f"{modes[n]['tps_median']:.2f} ({modes[n]['speedup']:.2f})" for n in names],
                f"{modes['K=2']['acceptance']:.2f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))


def summarize(round_trips: list[float]) -> dict[str, float]:
    ordered = sorted(round_trips)
    median = statistics.median(ordered)
    return {
        "round_trip_us": median * 1e6,
        "per_hop_us": median * 1e6 / 2,
        "p10_round_trip_us": ordered[len(ordered) // 10] * 1e6,
        "p90_round_trip_us": ordered[len(ordered) * 9 // 10] * 1e6,
        "samples": len(ordered),
    }


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import mlx.core as mx

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_device": str(mx.default_device()),
        "blas_preload": os.environ.get("LD_PRELOAD", ""),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def print_table(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(
        f"\n{m['cpu']}, {m['cores']} cores, mlx {m['mlx']} {m['mlx_device']}, "
        f"BLAS {m['blas_preload'] or 'reference'}; load average before/after "
        f"{m['load_average'][0]:.1f}/{m['load_average_after'][0]:.1f}"
    )
    rows = [
        (
            "nodes",
            "ms/token",
            "1-stream tok/s",
            f"{results['args']['streams']}-stream agg tok/s",
            "agg / 1-stream",
            "prefill tok/s",
            "hop 10KB us",
            "8k prefill MB/s",
        )
    ]
    base = None
    for r in results["runs"]:
        single = r["single_stream"]["generation_tps"]
        agg = r["concurrent"]["decode_tps"]
        base = base or single
        rows.append(
            (
                str(r["nodes"]),
                f"{r['ms_per_token']:.1f}",
                f"{single:.2f} ({100 * single / base:.0f}%)",
                f"{agg:.2f}",
                f"{agg / single:.2f}x",
                f"{r['prefill']['prompt_tps']:.0f}",
                f"{r['hop_10kb']['per_hop_us']:.0f}" if "hop_10kb" in r else "-",
                f"{r['prefill_transfer']['mb_per_s']:.0f}" if "prefill_transfer" in r else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    print()
    for name in ("grpc_echo", "mlx_ring"):
        if name in results["anchors"]:
            a = results["anchors"][name]
            print(
                f"{name:10s} 10 KB round trip {a['round_trip_us']:.0f} us -> per hop {a['per_hop_us']:.0f} us"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=270e6, help="model size for bench_spec")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--tokens", type=int, default=32, help="tokens per decode run")
    parser.add_argument("--runs", type=int, default=2, help="single-stream runs (best kept)")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--hop-repeats", type=int, default=400)
    parser.add_argument("--no-pin", action="store_true", help="do not pin each node to a core")
    parser.add_argument("--no-ring", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("bench_pipeline.json"))
    parser.add_argument("--mtp", action="store_true", help="pipeline_mtp vs plain pipeline only")
    parser.add_argument("--mtp-nodes", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--hop-delays-ms", type=float, nargs="+", default=[0, 1, 5])
    parser.add_argument("--mtp-repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--agreement", type=float, default=0.85, help="--mtp: head agreement")
    parser.add_argument(
        "--batch", action="store_true", help="pipeline batching only (1 vs --batch-streams)"
    )
    parser.add_argument("--batch-nodes", type=int, nargs="+", default=[2])
    parser.add_argument("--batch-streams", type=int, nargs="+", default=[8])
    parser.add_argument("--batch-repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--batch-ks", type=int, nargs="+", default=[1, 2], help="with --mtp")
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ring-rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_echo:
        serve_echo()
        return 0
    if args.ring_rank:
        ring_rank(args.hop_repeats)
        return 0
    if Path(OPENBLAS).exists() and OPENBLAS not in os.environ.get("LD_PRELOAD", ""):
        env = {**os.environ, "LD_PRELOAD": OPENBLAS, "OPENBLAS_NUM_THREADS": "1"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    from node.checkpoints import bench_spec, count_parameters, ensure_checkpoint
    from node.logging import configure_logging

    configure_logging("warning")
    cores = os.cpu_count() or 1
    max_nodes = max(
        args.nodes + (args.mtp_nodes if args.mtp else []) + (args.batch_nodes if args.batch else [])
    )
    node_cores: list[int | None] = [
        None if args.no_pin else i % cores for i in range(max(max_nodes, 2))
    ]
    pin(node_cores[0])
    spec = (
        bench_spec(params=args.params, agreement_level=args.agreement)
        if args.mtp
        else bench_spec(params=args.params)
    )
    print(
        f"checkpoint: {spec.num_hidden_layers} layers, {count_parameters(spec, include_mtp=False) / 1e6:.0f}M parameters, fp32",
        flush=True,
    )
    checkpoint = ensure_checkpoint(spec)
    results: dict[str, Any] = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        "checkpoint": {
            "path": str(checkpoint),
            "layers": spec.num_hidden_layers,
            "parameters": count_parameters(spec, include_mtp=False),
            "hidden_size": spec.hidden_size,
        },
        "pinning": "one core per node, round-robin" if not args.no_pin else "none",
        "runs": [],
        "anchors": {},
    }
    if args.batch or args.mtp:
        if args.batch:
            results["pipeline_batching"] = bench_batching(args, checkpoint, node_cores)
        else:
            results["single_node_mtp"] = bench_single_node_mtp(args, checkpoint)
            results["pipeline_mtp"] = bench_pipeline_mtp(args, checkpoint, node_cores)
        results["machine"]["load_average_after"] = os.getloadavg()
        (print_batch_table if args.batch else print_mtp_table)(results)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        workdir = Path(tmp)
        servers = start_stage_servers(max_nodes - 1, node_cores, workdir) if max_nodes > 1 else []
        try:
            addresses = [address for _, address in servers]
            for n in args.nodes:
                print(f"-- {n} node(s)", flush=True)
                results["runs"].append(bench_nodes(n, args, checkpoint, addresses))
        finally:
            for proc, _ in servers:
                proc.terminate()
            for proc, _ in servers:
                proc.wait(timeout=30)
        results["anchors"]["grpc_echo"] = summarize(
            grpc_echo_round_trips(args.hop_repeats, node_cores)
        )
        if not args.no_ring:
            results["anchors"]["mlx_ring"] = summarize(
                ring_round_trips(args.hop_repeats, workdir, node_cores)
            )
    results["machine"]["load_average_after"] = (
        os.getloadavg() if hasattr(os, "getloadavg") else None
    )
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
