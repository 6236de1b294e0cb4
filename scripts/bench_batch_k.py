#!/usr/bin/env python3
"""Batched native MTP at every fixed K and at auto K, per batch size, against local batching.

    nice python scripts/bench_batch_k.py --streams 1,4,8,16 --json bench_batch_k.json

(The script re-executes itself with OpenBLAS preloaded and OPENBLAS_NUM_THREADS=1 unless set.)

``scripts/bench_batch.py`` runs native MTP at auto K only; this one asks whether auto picks
well at each batch size: for S concurrent greedy streams (32-token prompts, ``--tokens``
each, submitted at once to the instance's batch scheduler) it runs the local engine, native
MTP with every K in ``--ks`` pinned (``mtp_k``) and native MTP at auto K, on the same weights
(one runner each, prompt caches off so every round prefills), modes interleaved over
``--repeats`` rounds with new prompts each round (the head's acceptance depends on the
text). Reported per mode: decode tok/s (each stream's tokens after its first over its time
after its first, summed over streams: the engines' own ``generation_tps``), its ratio to the
local engine in the same round (median over rounds), the mean K and the draft acceptance.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from _benchinfo import machine_info, reexec_with_openblas
from bench_batch import prompts_for


def run(runner: Any, prompts: list[list[int]], tokens: int, mode: str) -> dict[str, float]:
    from node.inference.requests import GenerateRequest

    engine = "local" if mode == "local" else "native_mtp"
    pin = int(mode[2:]) if mode.startswith("K=") else None
    streams = [
        runner.submit(
            GenerateRequest(
                prompt_ids=p, max_tokens=tokens, ignore_eos=True, engine=engine, mtp_k=pin
            )
        )
        for p in prompts
    ]
    finals = [list(s)[-1] for s in streams]
    return {
        "decode_tps": sum(f.stats.generation_tps for f in finals),
        "mean_k": statistics.mean(f.stats.num_draft_tokens for f in finals),
        "acceptance": statistics.mean(f.stats.acceptance_rate or 0.0 for f in finals),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=200e6, help="model size")
    parser.add_argument("--streams", default="1,4,8,16")
    parser.add_argument("--ks", default="1,2,3", help="fixed K to run (1 and up)")
    parser.add_argument("--tokens", type=int, default=48, help="generated tokens per stream")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--json", type=Path, default=Path("bench_batch_k.json"))
    parser.add_argument("--no-preload", action="store_true", help="do not re-exec with OpenBLAS")
    args = parser.parse_args()
    reexec_with_openblas(args.no_preload)

    from node.checkpoints import bench_spec, count_parameters, ensure_checkpoint
    from node.inference.loading import load_checkpoint
    from node.inference.runner import LocalRunner

    spec = bench_spec(params=args.params)
    print(
        f"model: {spec.name()}, {count_parameters(spec, include_mtp=False) / 1e6:.0f}M", flush=True
    )
    loaded = load_checkpoint(ensure_checkpoint(spec))
    counts = [int(s) for s in args.streams.split(",")]
    batch = max(counts)
    local = LocalRunner(loaded, native_mtp_enabled=False, max_batch=batch, prompt_cache_bytes=0)
    mtp = LocalRunner(loaded, max_batch=batch, prompt_cache_bytes=0)
    modes = ["local", *(f"K={k}" for k in args.ks.split(",")), "auto"]
    for s in counts:  # MLX's CPU backend builds kernels per new shape: warm every one up
        for mode in modes:
            run(local if mode == "local" else mtp, prompts_for(s, 32, seed=s), 8, mode)
    results: dict[tuple[int, str], list[dict[str, float]]] = {}
    for round_ in range(args.repeats):
        for s in counts:
            prompts = prompts_for(s, 32, seed=1000 * (round_ + 1) + s)  # new each round
            for mode in modes:
                r = run(local if mode == "local" else mtp, prompts, args.tokens, mode)
                results.setdefault((s, mode), []).append(r)
                base = results[(s, "local")][-1]["decode_tps"]
                r["x_local"] = r["decode_tps"] / base
                print(
                    f"  round {round_ + 1} x{s:<2} {mode:>5}: {r['decode_tps']:6.1f} tok/s "
                    f"({r['x_local']:.2f}x local), mean K {r['mean_k']:.2f}, "
                    f"acceptance {r['acceptance']:.2f}",
                    flush=True,
                )
    local.close()
    mtp.close()

    rows = []
    for s in counts:
        row: dict[str, Any] = {"streams": s}
        for mode in modes:
            rs = results[(s, mode)]
            row[mode] = {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        fixed = [m for m in modes if m.startswith("K=")]
        best = max(fixed, key=lambda m: row[m]["x_local"])
        row["best_fixed"] = best
        row["auto_vs_best_fixed"] = row["auto"]["x_local"] / row[best]["x_local"]
        rows.append(row)
    header = "streams | " + " | ".join(f"{m:>12}" for m in modes) + " | auto / best fixed"
    print("\ndecode tok/s x local (median of rounds), mean K in brackets\n" + header)
    print("-" * len(header))
    for row in rows:
        cells = [f"{row[m]['x_local']:5.2f}x ({row[m]['mean_k']:.1f})" for m in modes]
        print(
            f"{row['streams']:7d} | "
            + " | ".join(f"{c:>12}" for c in cells)
            + f" | {row['auto_vs_best_fixed']:.2f}x ({row['best_fixed']})"
        )
    report = {
        "machine": {**machine_info(), "load_average": os.getloadavg()},
        "model": spec.name(),
        "settings": vars(args) | {"json": str(args.json)},
        "rows": rows,
    }
    args.json.write_text(json.dumps(report, indent=2))
    print(f"json: {args.json}")


if __name__ == "__main__":
    main()
