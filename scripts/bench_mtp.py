#!/usr/bin/env python3
"""Benchmark native MTP's K policy against every fixed K and against MTP off.

    nice python scripts/bench_mtp.py --json bench_mtp.json

(The script re-executes itself with LD_PRELOAD=OpenBLAS and OPENBLAS_NUM_THREADS=1 unless set,
when the library exists and is not preloaded.)

Workloads: the bench model (``node.checkpoints.bench_spec``, ~280M-parameter fp32 qwen3_5)
with its constructed MTP head at agreement 0.85, 0.5 and 0.25 (steady: acceptance does not
depend on the text), and "changing": the "alternating" head, which agrees on alternate blocks
of ``--block`` tokens along the constructed target's cycle and disagrees on the others, so a
request's text moves between drafts that are always accepted and drafts that never are.

Modes per workload: "off" (the local engine, target-only decode), native MTP at every fixed K
in ``--ks`` (K = 0 included: the MTP engine's plain decode cycle) and "auto" (the K policy,
max_k ``--max-k``, with the cost table the engine measures on first use and refreshes live).
Every mode runs each round, modes and workloads interleaved, ``--repeats`` rounds; rates are
medians over rounds, in wall time and in process CPU time (one MLX worker thread, one BLAS
thread: CPU time counts this process's work and is the noise-robust cross-check on a machine
other processes share).  Every run's tokens are checked identical to mlx-lm's ``generate_step``.
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

from _benchinfo import machine_info

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
STEADY = {"0.85": 0.85, "0.5": 0.5, "0.25": 0.25}


class Clocks:
    """Wall and process-CPU time together."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def since(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def workload_spec(name: str, params: float, block: int) -> Any:
    from node.checkpoints import bench_spec

    if name == "changing":
        return bench_spec(
            params=params, agreement="alternating", agreement_level=None, agreement_block=block
        )
    return bench_spec(params=params, agreement_level=STEADY[name])


def load(spec: Any, max_k: int) -> Any:
    from node.checkpoints import ensure_checkpoint
    from node.inference.loading import load_checkpoint
    from node.placement import card_from_checkpoint

    path = ensure_checkpoint(spec)
    loaded = load_checkpoint(path)
    card = loaded.card or card_from_checkpoint(path)
    # A card-less checkpoint gets the fallback max_k; the bench lets the policy go deeper.
    loaded.card = card.model_copy(
        update={"native_mtp": card.native_mtp.model_copy(update={"max_k": max_k})}
    )
    loaded.mtp_head()
    return loaded


def reference_tokens(loaded: Any, prompt: list[int], tokens: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    steps = generate_step(
        mx.array(prompt), loaded.model, max_tokens=tokens, sampler=lambda x: mx.argmax(x, -1)
    )
    return [int(t) for t, _ in steps]


def run_once(engine: Any, prompt: list[int], tokens: int) -> dict[str, Any]:
    """Decode rates (the clocks start at the first token, which comes out of prefill)."""
    from node.inference.events import GenerationDone, TokenDelta
    from node.inference.requests import GenerateRequest

    request = GenerateRequest(prompt_ids=prompt, max_tokens=tokens, ignore_eos=True)
    out: list[int] = []
    clocks = None
    stats = None
    for event in engine.generate(request):
        if isinstance(event, TokenDelta):
            out.extend(event.token_ids)
            if clocks is None:
                clocks, first = Clocks(), len(out)
        elif isinstance(event, GenerationDone):
            stats = event.stats
    assert clocks is not None and stats is not None
    wall, cpu = clocks.since()
    decoded = len(out) - first
    return {
        "tps": decoded / wall,
        "cpu_tps": decoded / cpu,
        "tokens": out,
        "mean_k": stats.num_draft_tokens,
        "k_histogram": stats.draft_k_histogram,
        "acceptance": stats.acceptance_rate,
    }


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    rows = []
    off = statistics.median(r["tps"] for r in results["off"])
    off_cpu = statistics.median(r["cpu_tps"] for r in results["off"])
    for mode, runs in results.items():
        tps = statistics.median(r["tps"] for r in runs)
        cpu = statistics.median(r["cpu_tps"] for r in runs)
        row = {
            "mode": mode,
            "tok_s": tps,
            "tok_cpu_s": cpu,
            "speedup": tps / off,
            "cpu_speedup": cpu / off_cpu,
            "all_tok_s": [r["tps"] for r in runs],
        }
        if mode != "off":
            accepted = [r["acceptance"] for r in runs if r["acceptance"] is not None]
            row["acceptance"] = statistics.mean(accepted) if accepted else None
            row["mean_k"] = statistics.mean(r["mean_k"] for r in runs)
            hist = [sum(h) for h in zip(*(r["k_histogram"] for r in runs), strict=True)]
            row["k_histogram"] = hist
        rows.append(row)
    fixed = [r for r in rows if r["mode"].startswith("K=")]
    best = max(fixed, key=lambda r: r["tok_s"])
    best_cpu = max(fixed, key=lambda r: r["tok_cpu_s"])
    auto = next(r for r in rows if r["mode"] == "auto")
    return {
        "rows": rows,
        "best_fixed": best["mode"],
        "auto_vs_best_fixed": auto["tok_s"] / best["tok_s"],
        "auto_vs_off": auto["speedup"],
        "best_fixed_cpu": best_cpu["mode"],
        "auto_vs_best_fixed_cpu": auto["tok_cpu_s"] / best_cpu["tok_cpu_s"],
        "auto_vs_off_cpu": auto["cpu_speedup"],
    }


def print_table(name: str, summary: dict[str, Any]) -> None:
    print(f"\nworkload {name}")
    print(
        f"{'mode':>6} {'tok/s':>6} {'speedup':>7} | {'tok/cpu-s':>9} {'speedup':>7} | "
        f"{'accept':>6} {'mean K':>6}  K histogram"
    )
    for row in summary["rows"]:
        line = (
            f"{row['mode']:>6} {row['tok_s']:>6.2f} {row['speedup']:>6.2f}x | "
            f"{row['tok_cpu_s']:>9.2f} {row['cpu_speedup']:>6.2f}x |"
        )
        if "mean_k" in row:
            acc = f"{row['acceptance']:.1%}" if row["acceptance"] is not None else "-"
            line += f" {acc:>6} {row['mean_k']:>6.2f}  {row['k_histogram']}"
        print(line)
    print(
        f"auto / best fixed ({summary['best_fixed']}): {summary['auto_vs_best_fixed']:.3f} wall, "
        f"{summary['auto_vs_best_fixed_cpu']:.3f} CPU ({summary['best_fixed_cpu']}); "
        f"auto / off: {summary['auto_vs_off']:.3f} wall, {summary['auto_vs_off_cpu']:.3f} CPU"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=280e6, help="model size (250-300M)")
    parser.add_argument("--workloads", default="0.85,0.5,0.25,changing")
    parser.add_argument("--ks", default="0,1,2,3,4,5,6", help="fixed K modes")
    parser.add_argument("--max-k", type=int, default=8, help="the policy's bound")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens (steady)")
    parser.add_argument("--changing-tokens", type=int, default=128)
    parser.add_argument("--block", type=int, default=32, help="agreement block (changing)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--json", type=Path, default=Path("bench_mtp.json"))
    parser.add_argument("--wall-clock-policy", action="store_true", help="policy times in wall")
    parser.add_argument("--no-preload", action="store_true", help="do not re-exec with OpenBLAS")
    args = parser.parse_args()

    if (
        not args.no_preload
        and Path(OPENBLAS).exists()
        and OPENBLAS not in os.environ.get("LD_PRELOAD", "")
    ):
        # One BLAS thread: with two, a multi-row matmul waits on whichever thread another
        # process preempts (4-row matmuls 2.1x a 1-row one with 2 threads on a busy machine,
        # 1.03x with 1); single-row matmuls cost the same either way.
        env = {**os.environ, "LD_PRELOAD": OPENBLAS}
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))

    import random

    from node.checkpoints import count_parameters
    from node.inference.engine import LocalEngine
    from node.inference.mtp.engine import MtpEngine

    workloads = [w for w in args.workloads.split(",") if w]
    ks = [int(k) for k in args.ks.split(",")]
    rng = random.Random(0)
    prompt = [rng.randrange(0, 500) for _ in range(args.prompt_tokens)]
    setups: dict[str, dict[str, Any]] = {}
    for name in workloads:
        spec = workload_spec(name, args.params, args.block)
        loaded = load(spec, args.max_k)
        tokens = args.changing_tokens if name == "changing" else args.tokens
        head = loaded.mtp_head()
        engines: dict[str, Any] = {"off": LocalEngine(loaded)}
        engines.update({f"K={k}": MtpEngine(loaded, head=head, fixed_k=k) for k in ks})
        # On this shared machine the policy times its cycles in process CPU time: what wall
        # time would be if the machine were this process's alone (--wall-clock-policy: not).
        clock = time.perf_counter if args.wall_clock_policy else time.process_time
        auto = MtpEngine(loaded, head=head, clock=clock)
        auto.cost_table()  # measured at load, as an instance does on its first request
        engines["auto"] = auto
        reference = reference_tokens(loaded, prompt, tokens)
        for engine in engines.values():  # warm-up: kernels, allocator
            run_once(engine, prompt, 8)
        setups[name] = {
            "spec": spec,
            "engines": engines,
            "tokens": tokens,
            "reference": reference,
            "results": {m: [] for m in engines},
        }
        print(
            f"{name}: {spec.name()}, {count_parameters(spec, include_mtp=False) / 1e6:.0f}M "
            f"parameters, {spec.num_hidden_layers} layers; cost table (s) "
            f"verify {[round(v, 4) for v in auto.cost_table().verify[1]]} "
            f"draft {[round(v, 4) for v in auto.cost_table().draft[1]]}",
            flush=True,
        )

    for round_ in range(args.repeats):
        for name, setup in setups.items():
            for mode, engine in setup["engines"].items():
                result = run_once(engine, prompt, setup["tokens"])
                if result["tokens"] != setup["reference"]:
                    raise SystemExit(f"{name} {mode}: tokens differ from mlx-lm's: not exact")
                setup["results"][mode].append(result)
                print(
                    f"  round {round_ + 1} {name:>8} {mode:>5}: {result['tps']:.2f} tok/s, "
                    f"{result['cpu_tps']:.2f} tok/cpu-s, mean K {result['mean_k']:.2f}",
                    flush=True,
                )

    report: dict[str, Any] = {
        "machine": {**machine_info(), "load_average_end": os.getloadavg()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "prompt_tokens": args.prompt_tokens,
        "repeats": args.repeats,
        "workloads": {},
    }
    for name, setup in setups.items():
        summary = summarize(setup["results"])
        print_table(name, summary)
        auto = setup["engines"]["auto"]
        summary.update(
            model=setup["spec"].name(),
            generated_tokens=setup["tokens"],
            cost_table_s={"verify": auto.cost_table().verify, "draft": auto.cost_table().draft},
        )
        report["workloads"][name] = summary
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nload average {os.getloadavg()}; wrote {args.json}")


if __name__ == "__main__":
    main()
