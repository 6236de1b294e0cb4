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

Modes per workload: "off" (target-only decode), native MTP at every fixed K in ``--ks``
(K = 0 included: the MTP engine's plain decode cycle) and "auto" (the K policy, max_k
``--max-k``, with the cost table the engine measures on first use and refreshes live).

``--path batch`` (the default) runs every mode through the path a daemon serves requests on:
the instance's batch scheduler (``BatchScheduler``) with ``LocalBatchStep`` for "off" and
``MtpBatchStep`` (``max_batch`` 1: one stream) for the MTP modes; ``--path single`` runs the
single-sequence engines instead (``LocalEngine``, ``MtpEngine``: ``macmesh generate``).

``--seeded``: on the workloads in ``--seeded-workloads``, sampled requests (temperature
``--temperature``) at K = ``--seeded-k`` and auto, each once without a seed (the
probability-ratio rule) and once with one (the coupled rule, ``acceptance.coupled_accept_batch``,
which reproduces the local engine's seeded text at every K), interleaved with the rest: their
acceptance and tok/s side by side (sampled tokens are not compared with mlx-lm).

``--trace FILE``: the auto mode writes one JSON line per cycle (workload, round, K chosen,
the policy's per-depth acceptance estimate before the cycle, drafts accepted).
Every mode runs each round, modes and workloads interleaved, ``--repeats`` rounds; rates are
medians over rounds, in wall time and in process CPU time (one MLX worker thread, one BLAS
thread: CPU time counts this process's work and is the noise-robust cross-check on a machine
other processes share).  Every greedy run's tokens are checked identical to mlx-lm's ``generate_step``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _benchinfo import machine_info, reexec_with_openblas

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


def run_once(generate: Any, request: Any) -> dict[str, Any]:
    """Decode rates (the clocks start at the first token, which comes out of prefill)."""
    from node.inference.events import GenerationDone, TokenDelta

    out: list[int] = []
    clocks = None
    stats = None
    for event in generate(request):
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


def tracing_policy(step: Any, trace: list[dict[str, Any]]) -> None:
    """Record each cycle of ``step`` (an ``MtpBatchStep``): K, the estimate it came from and
    what the cycle accepted. A subclass of the step's own policy: the choice is unchanged."""
    from node.inference.mtp.kpolicy import BatchKPolicy

    class Traced(BatchKPolicy):
        def next_k(self, estimates: Any, costs: Any, bound: int, batch: int, **kw: Any) -> int:
            k = super().next_k(estimates, costs, bound, batch, **kw)
            rates = [round(r, 3) for r in estimates[0].rates()] if estimates else []
            priced = [round(costs.cycle_s(batch, j), 4) for j in range(min(bound, 2) + 1)]
            trace.append(
                {
                    "k": k,
                    "rates": rates,
                    "cycle_s": priced,  # the price of K = 0, 1, 2 this cycle was chosen at
                    "probe_interval": self.probe.interval,
                    **kw,
                }
            )
            return k

        def observe(self, k: int, rows: Any) -> None:
            super().observe(k, rows)
            if trace and k > 0:
                trace[-1]["accepted"] = [n for _, n in rows]

    step.policy = Traced(max_k=step.policy.max_k, start_k=step.policy.start_k)


def make_modes(
    loaded: Any, ks: list[int], path: str, clock: Any, trace: list[dict[str, Any]] | None
) -> dict[str, Any]:
    """Mode name -> a function from a request to its events. Auto's cost table is measured
    here, as an instance measures it before its first native-MTP request."""
    head = loaded.mtp_head()
    if path == "single":
        from node.inference.engine import LocalEngine
        from node.inference.mtp.engine import MtpEngine

        modes: dict[str, Any] = {"off": LocalEngine(loaded).generate}
        modes.update({f"K={k}": MtpEngine(loaded, head=head, fixed_k=k).generate for k in ks})
        auto = MtpEngine(loaded, head=head, clock=clock)
        auto.cost_table()
        modes["auto"] = auto.generate
        return modes | {"_costs": auto.cost_table()}

    from node.inference.batching.mtp_step import MtpBatchStep
    from node.inference.batching.scheduler import BatchScheduler
    from node.inference.batching.steps import LocalBatchStep

    def served(kind: str, step: Any) -> Any:
        scheduler = BatchScheduler({kind: step}, max_batch=1, name=f"bench-{kind}")
        return lambda request: scheduler.submit(request, kind, "bench")

    modes = {"off": served("local", LocalBatchStep(loaded, 1))}
    for k in ks:
        modes[f"K={k}"] = served(
            "native_mtp", MtpBatchStep(loaded, head, 1, fixed_k=k, clock=clock)
        )
    auto_step = MtpBatchStep(loaded, head, 1, clock=clock)
    if trace is not None:
        tracing_policy(auto_step, trace)
    modes["auto"] = served("native_mtp", auto_step)
    return modes | {"_costs": auto_step.cost_table()}


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
            row["all_acceptance"] = [r["acceptance"] for r in runs]
            row["mean_k"] = statistics.mean(r["mean_k"] for r in runs)
            hist = [sum(h) for h in zip(*(r["k_histogram"] for r in runs), strict=True)]
            row["k_histogram"] = hist
        rows.append(row)
    fixed = [r for r in rows if r["mode"].startswith("K=")]
    best = max(fixed, key=lambda r: r["tok_s"])
    best_cpu = max(fixed, key=lambda r: r["tok_cpu_s"])
    auto = next(r for r in rows if r["mode"] == "auto")
    by_mode = {r["mode"]: r for r in rows}
    seeded = {}
    for mode in by_mode:
        if mode.startswith("coupled "):
            ratio, coupled = by_mode["ratio " + mode.split(" ", 1)[1]], by_mode[mode]
            seeded[mode.split(" ", 1)[1]] = {
                "acceptance_ratio_rule": ratio["acceptance"],
                "acceptance_coupled_rule": coupled["acceptance"],
                "tok_s_coupled_vs_ratio": coupled["tok_s"] / ratio["tok_s"],
                "tok_cpu_s_coupled_vs_ratio": coupled["tok_cpu_s"] / ratio["tok_cpu_s"],
            }
    return {
        "seeded": seeded,
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
        f"{'mode':>12} {'tok/s':>6} {'speedup':>7} | {'tok/cpu-s':>9} {'speedup':>7} | "
        f"{'accept':>6} {'mean K':>6}  K histogram"
    )
    for row in summary["rows"]:
        line = (
            f"{row['mode']:>12} {row['tok_s']:>6.2f} {row['speedup']:>6.2f}x | "
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
    for k, row in summary["seeded"].items():
        ratio, coupled = row["acceptance_ratio_rule"], row["acceptance_coupled_rule"]
        print(
            f"sampled at {k}: acceptance ratio rule {ratio:.1%}, coupled rule (seeded) "
            f"{coupled:.1%}; tok/s coupled / ratio {row['tok_s_coupled_vs_ratio']:.3f} wall, "
            f"{row['tok_cpu_s_coupled_vs_ratio']:.3f} CPU"
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
    parser.add_argument("--path", choices=["batch", "single"], default="batch")
    parser.add_argument("--seeded", action="store_true", help="coupled vs ratio rule, sampled")
    parser.add_argument("--seeded-workloads", default="0.85")
    parser.add_argument("--seeded-k", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0, help="of the sampled modes")
    parser.add_argument("--trace", type=Path, default=None, help="auto's cycles, JSON lines")
    parser.add_argument("--no-preload", action="store_true", help="do not re-exec with OpenBLAS")
    args = parser.parse_args()

    reexec_with_openblas(args.no_preload)

    import random

    from node.checkpoints import count_parameters
    from node.inference.requests import GenerateRequest
    from node.inference.sampling import SamplingParams

    workloads = [w for w in args.workloads.split(",") if w]
    seeded_workloads = set(args.seeded_workloads.split(",")) if args.seeded else set()
    ks = [int(k) for k in args.ks.split(",")]
    rng = random.Random(0)
    prompt = [rng.randrange(0, 500) for _ in range(args.prompt_tokens)]
    # On this shared machine the policy times its cycles in process CPU time: what wall time
    # would be if the machine were this process's alone (--wall-clock-policy: not).
    clock = time.perf_counter if args.wall_clock_policy else time.process_time
    setups: dict[str, dict[str, Any]] = {}
    trace_lines: list[dict[str, Any]] = []
    for name in workloads:
        spec = workload_spec(name, args.params, args.block)
        loaded = load(spec, args.max_k)
        tokens = args.changing_tokens if name == "changing" else args.tokens
        trace: list[dict[str, Any]] | None = [] if args.trace else None
        modes = make_modes(loaded, ks, args.path, clock, trace)
        costs = modes.pop("_costs")
        greedy = GenerateRequest(prompt_ids=prompt, max_tokens=tokens, ignore_eos=True)
        requests = {mode: greedy for mode in modes}
        if name in seeded_workloads:
            # The same engines, sampled: no seed -> the ratio rule, a seed -> the coupled rule.
            for label, fixed in ((f"K={args.seeded_k}", args.seeded_k), ("auto", None)):
                for rule in ("ratio", "coupled"):
                    mode = f"{rule} {label}"
                    modes[mode] = modes["auto" if fixed is None else f"K={fixed}"]
                    requests[mode] = greedy.model_copy(
                        update={"sampling": SamplingParams(temperature=args.temperature)}
                    )
        reference = reference_tokens(loaded, prompt, tokens)
        for mode, generate in modes.items():  # warm-up: kernels, allocator
            run_once(generate, requests[mode].model_copy(update={"max_tokens": 8}))
        if trace is not None:
            trace.clear()
        setups[name] = {
            "spec": spec,
            "modes": modes,
            "requests": requests,
            "costs": costs,
            "trace": trace,
            "tokens": tokens,
            "reference": reference,
            "results": {m: [] for m in modes},
        }
        print(
            f"{name}: {spec.name()}, {count_parameters(spec, include_mtp=False) / 1e6:.0f}M "
            f"parameters, {spec.num_hidden_layers} layers; cost table (s) "
            f"verify {[round(v, 4) for v in costs.verify[1]]} "
            f"draft {[round(v, 4) for v in costs.draft[1]]}",
            flush=True,
        )

    for round_ in range(args.repeats):
        for name, setup in setups.items():
            for mode, generate in setup["modes"].items():
                request = setup["requests"][mode]
                if mode.startswith("coupled"):
                    seeded = request.sampling.model_copy(update={"seed": 1000 + round_})
                    request = request.model_copy(update={"sampling": seeded})
                if setup["trace"] is not None:
                    start = len(setup["trace"])
                result = run_once(generate, request)
                if request.sampling.is_greedy and result["tokens"] != setup["reference"]:
                    raise SystemExit(f"{name} {mode}: tokens differ from mlx-lm's: not exact")
                if setup["trace"] is not None and mode == "auto":
                    for i, line in enumerate(setup["trace"][start:]):
                        trace_lines.append(
                            {"workload": name, "round": round_ + 1, "cycle": i, **line}
                        )
                setup["results"][mode].append(result)
                print(
                    f"  round {round_ + 1} {name:>8} {mode:>12}: {result['tps']:.2f} tok/s, "
                    f"{result['cpu_tps']:.2f} tok/cpu-s, mean K {result['mean_k']:.2f}, "
                    f"acceptance {result['acceptance']}",
                    flush=True,
                )

    report: dict[str, Any] = {
        "machine": {**machine_info(), "load_average_end": os.getloadavg()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "path": args.path,
        "prompt_tokens": args.prompt_tokens,
        "repeats": args.repeats,
        "workloads": {},
    }
    for name, setup in setups.items():
        summary = summarize(setup["results"])
        print_table(name, summary)
        costs = setup["costs"]
        summary.update(
            model=setup["spec"].name(),
            generated_tokens=setup["tokens"],
            cost_table_s={"verify": costs.verify, "draft": costs.draft},
        )
        report["workloads"][name] = summary
    args.json.write_text(json.dumps(report, indent=2))
    if args.trace:
        args.trace.write_text("".join(json.dumps(line) + "\n" for line in trace_lines))
    print(f"\nload average {os.getloadavg()}; wrote {args.json}")


if __name__ == "__main__":
    main()
