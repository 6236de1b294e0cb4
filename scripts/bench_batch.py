#!/usr/bin/env python3
"""Benchmark continuous batching on one node against mlx-lm's own BatchGenerator.

    nice python scripts/bench_batch.py --json bench_batch.json --plot docs/img/batch_tps.png

(The script re-executes itself with OpenBLAS preloaded and OPENBLAS_NUM_THREADS=1 unless set,
when the library exists and is not preloaded.)

The model is built on the fly (cached): ``node.checkpoints.bench_spec``, a ~200M-parameter fp32
qwen3_5. For each number of concurrent streams S (default 1, 2, 4, 8, 16) one round runs S
greedy requests with different prompts, all submitted at once, through

- ``macmesh``: the instance's batch scheduler (``LocalRunner.submit``, ``max_batch`` = the
  largest S), i.e. what a daemon instance runs, detokenization and stats included;
- ``native-mtp``: the same scheduler on a second runner with native MTP on (auto K:
  ``MtpBatchStep``, the batch drafts and verifies together, K from the policy and the cost
  table measured at load), same prompts;
- ``mlx-lm``: ``mlx_lm.generate.BatchGenerator`` on the same model (the anchor), inserting the
  same prompts and stepping until every sequence is done.

Aggregate tok/s = generated tokens of all streams / wall time from submission to the last
token; per-stream tok/s = the median over streams of tokens / that stream's own wall time.
Decode tok/s = the sum over streams of each stream's tokens after its first / its time after
its first token (the engine's ``generation_tps``): the rate of the decode steps alone, which
is what the [S, 1] forward-cost ceiling below speaks of. The aggregate includes the prompts'
prefill, a compute-bound forward that costs about S times one prompt's whether batched or not
(S 32-token prompts = one [S, 32] forward), so it scales less than decode does.
Modes and stream counts are interleaved across ``--repeats`` rounds and medians are reported:
the machine is shared, other processes only ever slow a round down, and interleaving spreads
that over every mode. Peak memory (MLX's allocator) is recorded per round.

- ``pipeline`` (with ``--pipeline``, the default): the same model as a 2-node pipeline, stage 0
  in this process (the coordinator, as a daemon runs it) and the other half of the layers in a
  stage server process (``python -m node.inference.stage``, one BLAS thread), requests read on
  one thread each through ``PipelineEngine.generate`` (``max_batch`` = the largest S); its
  scaling is against its own one stream.

Forward costs (the anchor of the scaling targets): at the start of each round, the CPU time
of a [S, 1] forward (one decode step of S streams), a [S, 3] verify forward and a 2-token draft
for S rows, relative to a [1, 1] forward, measured in the same process
(``node.inference.mtp.costs.measure_costs``). S / cost([S, 1]) is the ceiling of plain batching
on this machine at this load; the table reports each scaling against it.

Time to first token of a newcomer: a request with a ``--newcomer-tokens`` prompt submitted to
an idle instance, and the same request submitted while 8 other streams are decoding (it joins
their batch: ``max_batch`` 16), interleaved, medians of the TTFT its final stats report.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _benchinfo import machine_info, reexec_with_openblas


def prompts_for(streams: int, length: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(0, 500) for _ in range(length)] for _ in range(streams)]


def run_macmesh(
    runner: Any, prompts: list[list[int]], tokens: int, engine: str = "local"
) -> dict[str, Any]:
    import mlx.core as mx

    from node.inference.requests import GenerateRequest

    mx.reset_peak_memory()
    began, cpu = time.perf_counter(), time.process_time()
    streams = [
        runner.submit(
            GenerateRequest(prompt_ids=p, max_tokens=tokens, ignore_eos=True, engine=engine)
        )
        for p in prompts
    ]
    finished: list[float] = []
    decode: list[float] = []
    outputs: list[list[int]] = []
    mean_k: list[float] = []
    for stream in streams:  # the worker never waits for a reader: reading in turn is fair
        done = list(stream)[-1]
        finished.append(time.perf_counter())
        outputs.append(done.token_ids)
        mean_k.append(done.stats.num_draft_tokens)
        # The engine's own clock: tokens after the first over the time after the first.
        decode.append(done.stats.generation_tps)
    wall = max(finished) - began
    # A stream's own rate: its tokens over the time from submission to its last token.
    per_stream = [len(o) / (t - began) for o, t in zip(outputs, finished, strict=True)]
    cpu_s = time.process_time() - cpu
    result = _result(outputs, wall, cpu_s, per_stream, mx.get_peak_memory(), decode)
    result["mean_k"] = statistics.mean(mean_k)
    return result


def run_mlx_lm(model: Any, prompts: list[list[int]], tokens: int) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    mx.reset_peak_memory()
    began, cpu = time.perf_counter(), time.process_time()
    generator = BatchGenerator(
        model,
        max_tokens=tokens,
        completion_batch_size=len(prompts),
        prefill_batch_size=len(prompts),
        prefill_step_size=256,
    )
    uids = generator.insert(prompts, max_tokens=[tokens] * len(prompts))
    outputs: dict[int, list[int]] = {u: [] for u in uids}
    finished: dict[int, float] = {}
    firsts: dict[int, float] = {}
    while len(finished) < len(uids):
        for response in generator.next_generated():
            outputs[response.uid].append(response.token)
            firsts.setdefault(response.uid, time.perf_counter())
            if response.finish_reason is not None:
                finished[response.uid] = time.perf_counter()
    generator.close()
    wall = max(finished.values()) - began
    per_stream = [len(outputs[u]) / (finished[u] - began) for u in uids]
    outs = [outputs[u] for u in uids]
    decode = decode_rates(outs, [firsts[u] for u in uids], [finished[u] for u in uids])
    return _result(outs, wall, time.process_time() - cpu, per_stream, mx.get_peak_memory(), decode)


def start_stage_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    """A stage server process on 127.0.0.1 (the pipeline's second node)."""
    port_file = workdir / "stage.port"
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
        stderr=open(workdir / "stage.log", "wb"),  # noqa: SIM115 - lives with the process
        env={**os.environ, "MACMESH_LOG_LEVEL": "warning"},
    )
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"stage server failed to start; see {workdir / 'stage.log'}")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{port_file.read_text().strip()}"


def run_pipeline(
    engine: Any, prompts: list[list[int]], tokens: int, stage_pid: int
) -> dict[str, Any]:
    """S streams through the 2-node pipeline, one reading thread each. CPU time counts both
    processes (this one, with stage 0 and the coordinator, and the stage server)."""
    import threading

    import mlx.core as mx
    import psutil

    stage = psutil.Process(stage_pid)

    def cpu_now() -> float:
        times = stage.cpu_times()
        return time.process_time() + times.user + times.system

    from node.inference.events import GenerationDone, TokenDelta
    from node.inference.requests import GenerateRequest

    mx.reset_peak_memory()
    outs: list[list[int]] = [[] for _ in prompts]
    walls = [0.0] * len(prompts)
    decode = [0.0] * len(prompts)
    before = [(st.frames_processed, st.batched_forwards) for st in engine.status()]
    began, cpu = time.perf_counter(), cpu_now()

    def stream(i: int) -> None:
        request = GenerateRequest(prompt_ids=prompts[i], max_tokens=tokens, ignore_eos=True)
        for event in engine.generate(request):
            if isinstance(event, TokenDelta):
                outs[i] += event.token_ids
            elif isinstance(event, GenerationDone):
                decode[i] = event.stats.generation_tps  # the engine's clock, as run_macmesh
        walls[i] = time.perf_counter() - began

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    per_stream = [len(o) / w for o, w in zip(outs, walls, strict=True)]
    result = _result(outs, wall, cpu_now() - cpu, per_stream, mx.get_peak_memory(), decode)
    # What each stage computed: forwards (prefill chunks included) and how many were batched.
    result["stage_forwards"] = [
        {"forwards": st.frames_processed - f, "batched": st.batched_forwards - b}
        for st, (f, b) in zip(engine.status(), before, strict=True)
    ]
    return result


def decode_rates(outputs: list[list[int]], firsts: list[float], ends: list[float]) -> list[float]:
    """Each stream's decode rate: the tokens after its first over the time after its first
    (prefill left out: a prompt's forward is compute-bound and does not batch like decode).
    For mlx-lm's anchor; our engines report the same figure as ``generation_tps``."""
    return [
        (len(o) - 1) / (e - f) if len(o) > 1 and e > f else 0.0
        for o, f, e in zip(outputs, firsts, ends, strict=True)
    ]


def _result(
    outputs: list[list[int]],
    wall: float,
    cpu: float,
    per_stream: list[float],
    peak: int,
    decode: list[float],
) -> dict[str, Any]:
    """CPU time (this process, every thread) is the cross-check on a shared machine: it
    counts the work done, not the moments other processes held the cores.  ``decode_tps``:
    the sum of the streams' decode rates (they decode at the same time), the figure the
    [S, 1] forward-cost ceiling speaks of."""
    total = sum(len(o) for o in outputs)
    return {
        "tokens": outputs,
        "decode_tps": sum(decode),
        "aggregate_tps": total / wall,
        "aggregate_cpu_tps": total / cpu,
        "per_stream_tps": statistics.median(per_stream),
        "wall_s": wall,
        "peak_memory_bytes": int(peak),
    }


def newcomer_ttft(runner: Any, prompt: list[int], background: int) -> float:
    """TTFT of ``prompt`` submitted while ``background`` long streams decode (0: idle)."""
    from node.cluster.live import CancelToken
    from node.inference.requests import GenerateRequest

    cancels = [CancelToken() for _ in range(background)]
    running = [
        runner.submit(GenerateRequest(prompt_ids=p, max_tokens=100_000, ignore_eos=True), cancel)
        for p, cancel in zip(prompts_for(background, 16, seed=9), cancels, strict=True)
    ]
    try:
        for stream in running:
            next(stream)  # every background stream is decoding now
        done = list(runner.submit(GenerateRequest(prompt_ids=prompt, max_tokens=2)))[-1]
        return done.stats.time_to_first_token_seconds
    finally:
        for cancel in cancels:
            cancel.set()
        for stream in running:
            for _ in stream:  # drain until the scheduler dropped it
                pass
        while runner.batch_size:  # the cancelled ones leave at the next step
            time.sleep(0.01)


def forward_costs(loaded: Any, counts: list[int]) -> dict[int, dict[str, float]]:
    """This machine's batching costs now, in CPU seconds (``mtp.costs.measure_costs``: the
    fastest of a few timed forwards at a 32-token context), relative to a [1, 1] forward:
    ``decode`` = a [S, 1] forward (S streams' decode step; S over it is the throughput
    ceiling of plain batching), ``verify_k2`` = a [S, 3] verify forward and ``draft_k2`` =
    drafting 2 tokens for S rows (a K = 2 cycle costs their sum)."""
    from node.inference.mtp.costs import measure_costs

    table = measure_costs(
        loaded, loaded.mtp_head(), 2, repeats=3, clock=time.process_time, batch_sizes=counts
    )
    unit = table.verify[1][0]
    out = {}
    for s in counts:
        out[s] = {
            "decode": table.verify[s][0] / unit,
            "verify_k2": table.verify[s][2] / unit,
            "draft_k2": table.draft[s][2] / unit,
        }
    return out


def _pipeline_row(
    results: dict[tuple[str, int], list[dict[str, Any]]],
    s: int,
    first: int,
    reference: list[list[int]],
) -> dict[str, Any]:
    """The pipeline column of one row: medians, scaling against its own one stream."""

    def median(n: int, key: str) -> float:
        return statistics.median(r[key] for r in results[("pipeline", n)])

    keys = ("aggregate_tps", "aggregate_cpu_tps", "per_stream_tps", "decode_tps")
    ours = {k: median(s, k) for k in keys}
    ours["scaling"] = ours["aggregate_tps"] / median(first, "aggregate_tps")
    ours["decode_scaling"] = ours["decode_tps"] / median(first, "decode_tps")
    ours["cpu_scaling"] = ours["aggregate_cpu_tps"] / median(first, "aggregate_cpu_tps")
    ours["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in results[("pipeline", s)])
    ours["stage_forwards"] = results[("pipeline", s)][0]["stage_forwards"]  # the first round's
    ours["exact_streams"] = sum(
        a == b for a, b in zip(results[("pipeline", s)][0]["tokens"], reference, strict=True)
    )
    return ours


def print_table(rows: list[dict[str, Any]], ttft: dict[str, Any]) -> None:
    print()
    print(
        f"{'streams':>7} | {'macmesh tok/s':>13} | {'per stream':>10} | {'x 1 stream':>10} | "
        f"{'mlx-lm tok/s':>12} | {'per stream':>10} | {'x mlx-lm':>8} | "
        f"{'cpu: x 1':>8} | {'cpu: x mlx':>10} | {'peak MB':>8} | exact"
    )
    print("-" * 136)
    for r in rows:
        print(
            f"{r['streams']:>7} | {r['macmesh']['aggregate_tps']:>13.1f} | "
            f"{r['macmesh']['per_stream_tps']:>10.1f} | {r['scaling']:>9.2f}x | "
            f"{r['mlx_lm']['aggregate_tps']:>12.1f} | {r['mlx_lm']['per_stream_tps']:>10.1f} | "
            f"{r['vs_mlx_lm']:>7.2f}x | {r['cpu_scaling']:>7.2f}x | {r['cpu_vs_mlx_lm']:>9.2f}x | "
            f"{r['macmesh']['peak_memory_bytes'] / 2**20:>8.0f} | "
            f"{r['exact_streams']}/{r['streams']}"
        )
    print()
    print(
        f"{'streams':>7} | {'[S,1] x [1,1]':>13} | {'ceiling':>7} | {'cpu: x 1 / ceiling':>18} | "
        f"{'K=2 cycle in steps':>18}"
    )
    print("-" * 75)
    for r in rows:
        c = r["forward_cost"]
        print(
            f"{r['streams']:>7} | {c['decode']:>12.2f}x | {c['ceiling']:>6.2f}x | "
            f"{r['cpu_scaling'] / c['ceiling']:>18.2f} | {c['k2_cycle_in_steps']:>17.2f}x"
        )
    print()
    print(
        f"{'streams':>7} | {'native MTP tok/s':>16} | {'per stream':>10} | {'x local':>8} | "
        f"{'x local (rounds)':>16} | {'cpu: x local':>12} | {'mean K':>6} | {'peak MB':>8} | exact"
    )
    print("-" * 110)
    for r in rows:
        m = r["native_mtp"]
        print(
            f"{r['streams']:>7} | {m['aggregate_tps']:>16.1f} | {m['per_stream_tps']:>10.1f} | "
            f"{m['vs_local']:>7.2f}x | {m['vs_local_rounds']:>15.2f}x | "
            f"{m['cpu_vs_local']:>11.2f}x | {m['mean_k']:>6.2f} | "
            f"{m['peak_memory_bytes'] / 2**20:>8.0f} | {m['exact_streams']}/{r['streams']}"
        )
    print()
    print(
        f"{'streams':>7} | {'decode tok/s: local':>19} | {'x 1 stream':>10} | {'/ ceiling':>9} | "
        f"{'mlx-lm':>7} | {'x mlx-lm':>8} | {'native MTP':>10} | {'x local':>7}"
        + (f" | {'pipeline':>8} | {'x 1 stream':>10}" if "pipeline" in rows[0] else "")
    )
    print("-" * 120)
    for r in rows:
        m, c = r["native_mtp"], r["forward_cost"]
        line = (
            f"{r['streams']:>7} | {r['macmesh']['decode_tps']:>19.1f} | "
            f"{r['decode_scaling']:>9.2f}x | {r['decode_scaling'] / c['ceiling']:>9.2f} | "
            f"{r['mlx_lm']['decode_tps']:>7.1f} | {r['decode_vs_mlx_lm']:>7.2f}x | "
            f"{m['decode_tps']:>10.1f} | {m['decode_vs_local']:>6.2f}x"
        )
        if "pipeline" in r:
            p = r["pipeline"]
            line += f" | {p['decode_tps']:>8.1f} | {p['decode_scaling']:>9.2f}x"
        print(line)
    print()
    print(
        f"newcomer TTFT ({ttft['prompt_tokens']}-token prompt): alone "
        f"{ttft['alone_s'] * 1e3:.0f} ms, into a running batch of {ttft['background']} "
        f"{ttft['into_batch_s'] * 1e3:.0f} ms ({ttft['ratio']:.2f}x)"
    )
    if "pipeline" in rows[0]:
        print_pipeline_table(rows)


def print_pipeline_table(rows: list[dict[str, Any]]) -> None:
    print()
    print(
        f"{'streams':>7} | {'2-node pipeline tok/s':>21} | {'per stream':>10} | "
        f"{'x 1 stream':>10} | {'cpu: x 1':>8} | {'x local':>7} | {'stage-0 peak MB':>15} | exact"
    )
    print("-" * 104)
    for r in rows:
        p = r["pipeline"]
        print(
            f"{r['streams']:>7} | {p['aggregate_tps']:>21.1f} | {p['per_stream_tps']:>10.1f} | "
            f"{p['scaling']:>9.2f}x | {p['cpu_scaling']:>7.2f}x | "
            f"{p['aggregate_tps'] / r['macmesh']['aggregate_tps']:>6.2f}x | "
            f"{p['peak_memory_bytes'] / 2**20:>15.0f} | {p['exact_streams']}/{r['streams']}"
        )


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    streams = [r["streams"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(streams, [r["macmesh"]["aggregate_tps"] for r in rows], "o-", label="macmesh")
    ax.plot(streams, [r["mlx_lm"]["aggregate_tps"] for r in rows], "s--", label="mlx-lm")
    ax.plot(streams, [r["native_mtp"]["aggregate_tps"] for r in rows], "^-", label="native MTP")
    one = rows[0]["macmesh"]["aggregate_tps"]
    ax.plot(
        streams,
        [one * r["forward_cost"]["ceiling"] for r in rows],
        "k:",
        label="ceiling (1 stream x S / cost of [S,1])",
    )
    ax.plot(
        streams,
        [r["macmesh"]["per_stream_tps"] for r in rows],
        "o:",
        label="macmesh, per stream",
    )
    ax.set_xscale("log", base=2)
    ax.set_xticks(streams, [str(s) for s in streams])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("tok/s")
    ax.set_title("Continuous batching on one node (aggregate tok/s, wall clock)")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=200e6, help="model size")
    parser.add_argument("--streams", default="1,2,4,8,16")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=48, help="generated tokens per stream")
    parser.add_argument("--newcomer-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--json", type=Path, default=Path("bench_batch.json"))
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    parser.add_argument("--no-preload", action="store_true", help="do not re-exec with OpenBLAS")
    parser.add_argument(
        "--pipeline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the 2-node pipeline column (a stage server process on 127.0.0.1)",
    )
    args = parser.parse_args()

    reexec_with_openblas(args.no_preload)

    import mlx.core as mx

    from node.checkpoints import bench_spec, count_parameters, ensure_checkpoint
    from node.inference.loading import load_checkpoint
    from node.inference.runner import LocalRunner

    spec = bench_spec(params=args.params)
    print(
        f"model: {spec.name()}, {count_parameters(spec, include_mtp=False) / 1e6:.0f}M "
        f"parameters, {spec.num_hidden_layers} layers, fp32",
        flush=True,
    )
    loaded = load_checkpoint(ensure_checkpoint(spec))
    counts = [int(s) for s in args.streams.split(",")]
    runner = LocalRunner(loaded, native_mtp_enabled=False, max_batch=max(max(counts), 16))
    # Native MTP (auto K) on the same weights: its own instance runner, as a daemon has.
    mtp_runner = LocalRunner(loaded, max_batch=max(max(counts), 16))
    weights = mx.get_active_memory()

    pipeline: Any = None
    stage_proc: Any = None
    if args.pipeline:
        import tempfile

        from node.inference.pipeline import PipelineEngine, SimplePlacement

        stage_proc, address = start_stage_server(Path(tempfile.mkdtemp(prefix="bench-batch-")))
        pipeline = PipelineEngine(
            ensure_checkpoint(spec),
            SimplePlacement.even(spec.num_hidden_layers, ["here", "stage"]),
            {"stage": address},
            local_node_id="here",
            max_batch=max(max(counts), 16),
        )
        pipeline.load()
    modes = ("macmesh", "native-mtp", "mlx-lm", *(("pipeline",) if pipeline is not None else ()))
    # Warm-up at every stream count: MLX's CPU backend builds kernels for each new shape (the
    # first [8, 1] forward took seconds more than the next), the allocator, MTP's cost table.
    for s in counts:
        run_macmesh(runner, prompts_for(s, args.prompt_tokens), 4)
        run_macmesh(mtp_runner, prompts_for(s, args.prompt_tokens), 4, "native_mtp")
        run_mlx_lm(loaded.model, prompts_for(s, args.prompt_tokens), 4)
        if pipeline is not None:
            run_pipeline(pipeline, prompts_for(s, args.prompt_tokens), 4, stage_proc.pid)
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    ttfts: dict[str, list[float]] = {"alone": [], "into_batch": []}
    costs: list[dict[int, dict[str, float]]] = []
    for round_ in range(args.repeats):
        costs.append(forward_costs(loaded, sorted({1, *counts})))
        print(
            f"  round {round_ + 1} forward costs (x [1,1]): "
            + ", ".join(f"[{s},1] {c['decode']:.2f}" for s, c in costs[-1].items()),
            flush=True,
        )
        for s in counts:
            # Prompts of their own each round: the instances' prompt caches would serve the
            # macmesh columns a repeat's prefill (mlx-lm's anchor has no cache).
            prompts = prompts_for(s, args.prompt_tokens, seed=1000 * (round_ + 1) + s)
            for mode in modes:
                if mode == "macmesh":
                    result = run_macmesh(runner, prompts, args.tokens)
                elif mode == "native-mtp":
                    result = run_macmesh(mtp_runner, prompts, args.tokens, "native_mtp")
                elif mode == "pipeline":
                    result = run_pipeline(pipeline, prompts, args.tokens, stage_proc.pid)
                else:
                    result = run_mlx_lm(loaded.model, prompts, args.tokens)
                results.setdefault((mode, s), []).append(result)
                print(
                    f"  round {round_ + 1} {mode:>8} x{s:<2}: {result['aggregate_tps']:7.1f} "
                    f"tok/s aggregate, {result['per_stream_tps']:6.1f} per stream",
                    flush=True,
                )
        # A prompt of its own each time: the instance's prompt cache would serve a repeat.
        alone, into = prompts_for(2, args.newcomer_tokens, seed=100 + round_)
        ttfts["alone"].append(newcomer_ttft(runner, alone, 0))
        ttfts["into_batch"].append(newcomer_ttft(runner, into, 8))
        print(
            f"  round {round_ + 1} newcomer TTFT: alone {ttfts['alone'][-1] * 1e3:.0f} ms, "
            f"into 8 {ttfts['into_batch'][-1] * 1e3:.0f} ms",
            flush=True,
        )
    runner.close()
    mtp_runner.close()
    if pipeline is not None:
        pipeline.close()
    if stage_proc is not None:
        stage_proc.terminate()
        stage_proc.wait(timeout=30)

    def median(mode: str, s: int, key: str) -> float:
        return statistics.median(r[key] for r in results[(mode, s)])

    rows = []
    base = median("macmesh", counts[0], "aggregate_tps")
    decode_base = median("macmesh", counts[0], "decode_tps")
    cpu_base = median("macmesh", counts[0], "aggregate_cpu_tps")
    for s in counts:
        ours, anchor = (
            {
                k: median(mode, s, k)
                for k in (
                    "aggregate_tps",
                    "aggregate_cpu_tps",
                    "per_stream_tps",
                    "wall_s",
                    "decode_tps",
                )
            }
            for mode in ("macmesh", "mlx-lm")
        )
        ours["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in results[("macmesh", s)])
        anchor["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in results[("mlx-lm", s)])
        mtp = {
            k: median("native-mtp", s, k)
            for k in (
                "aggregate_tps",
                "aggregate_cpu_tps",
                "per_stream_tps",
                "wall_s",
                "mean_k",
                "decode_tps",
            )
        }
        mtp["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in results[("native-mtp", s)])
        reference = results[("mlx-lm", s)][0]["tokens"]
        mtp["exact_streams"] = sum(
            a == b for a, b in zip(results[("native-mtp", s)][0]["tokens"], reference, strict=True)
        )
        mtp["vs_local"] = mtp["aggregate_tps"] / ours["aggregate_tps"]
        mtp["cpu_vs_local"] = mtp["aggregate_cpu_tps"] / ours["aggregate_cpu_tps"]
        mtp["decode_vs_local"] = statistics.median(
            m["decode_tps"] / loc["decode_tps"]
            for m, loc in zip(results[("native-mtp", s)], results[("macmesh", s)], strict=True)
        )
        # Per round (interleaved, so both saw the same load): the median of the ratios.
        mtp["vs_local_rounds"] = statistics.median(
            m["aggregate_tps"] / loc["aggregate_tps"]
            for m, loc in zip(results[("native-mtp", s)], results[("macmesh", s)], strict=True)
        )
        exact = sum(
            a == b for a, b in zip(results[("macmesh", s)][0]["tokens"], reference, strict=True)
        )
        cost = {
            key: statistics.median(c[s][key] for c in costs)
            for key in ("decode", "verify_k2", "draft_k2")
        }
        # Plain batching's ceiling: S streams for the price of one [S, 1] forward (per [1, 1]).
        cost["ceiling"] = s / cost["decode"]
        # A K = 2 cycle's price in [S, 1] decode steps (verify + draft), as measured here.
        cost["k2_cycle_in_steps"] = (cost["verify_k2"] + cost["draft_k2"]) / cost["decode"]
        rows.append(
            {
                "streams": s,
                "forward_cost": cost,
                "macmesh": ours,
                "native_mtp": mtp,
                "mlx_lm": anchor,
                "scaling": ours["aggregate_tps"] / base,
                "decode_scaling": ours["decode_tps"] / decode_base,
                "decode_vs_mlx_lm": ours["decode_tps"] / anchor["decode_tps"],
                "cpu_scaling": ours["aggregate_cpu_tps"] / cpu_base,
                "vs_mlx_lm": ours["aggregate_tps"] / anchor["aggregate_tps"],
                "cpu_vs_mlx_lm": ours["aggregate_cpu_tps"] / anchor["aggregate_cpu_tps"],
                "exact_streams": exact,
            }
        )
        if pipeline is not None:
            rows[-1]["pipeline"] = _pipeline_row(results, s, counts[0], reference)
    alone, into = statistics.median(ttfts["alone"]), statistics.median(ttfts["into_batch"])
    ttft = {
        "prompt_tokens": args.newcomer_tokens,
        "background": 8,
        "alone_s": alone,
        "into_batch_s": into,
        "ratio": into / alone,
        "rounds": ttfts,
    }
    print_table(rows, ttft)
    report = {
        "machine": {**machine_info(), "load_average": os.getloadavg()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": {
            "name": spec.name(),
            "parameters": count_parameters(spec, include_mtp=False),
            "layers": spec.num_hidden_layers,
            "weights_bytes": int(weights),
        },
        "settings": {
            "prompt_tokens": args.prompt_tokens,
            "tokens": args.tokens,
            "repeats": args.repeats,
        },
        "rows": rows,
        "newcomer_ttft": ttft,
    }
    args.json.write_text(json.dumps(report, indent=2))
    print(f"json: {args.json}")
    if args.plot is not None:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
