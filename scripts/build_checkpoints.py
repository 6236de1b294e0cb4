#!/usr/bin/env python3
"""Build tiny deterministic Qwen3.5 checkpoints (node.checkpoints presets) and print a table.

    python scripts/build_checkpoints.py                       # every preset, into the cache
    python scripts/build_checkpoints.py dense-high moe-sidecar --out /tmp/ckpts --measure
    python scripts/build_checkpoints.py --levels 0.25,0.5,0.75,0.9 --measure   # dialled heads
    python scripts/build_checkpoints.py --bench --params 270e6 --level 0.8 --out /tmp/bench

Without ``--out`` checkpoints go to the cache (``$MACMESH_CHECKPOINT_CACHE`` or
``<repo>/.cache/checkpoints``) and are reused; with ``--out DIR`` each is rebuilt into
``DIR/<preset>``. ``--measure`` loads each checkpoint with mlx_lm.load, reads its MTP head back
with the reference head and measures greedy per-draft acceptance (depth 1..4) over a few
prompts, plus the target's diversity (distinct tokens out of 48, greedy period).
``--json FILE`` writes the rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm import load

from node.checkpoints import (
    PRESETS,
    CheckpointSpec,
    bench_spec,
    build_checkpoint,
    count_parameters,
    ensure_checkpoint,
)
from node.checkpoints.reference_mtp import load_reference_mtp, measure_agreement

PROMPTS = (
    "<|im_start|>user\nTell me about the cluster.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time",
    "def add(a, b):",
)


def _size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _measure(path: Path, n_tokens: int) -> dict:
    model, tokenizer = load(str(path))
    try:
        mtp = load_reference_mtp(path, model)
    except FileNotFoundError:
        return {"per_depth": None}
    reports = [
        measure_agreement(model, mtp, tokenizer.encode(p), n_tokens, depth=4) for p in PROMPTS
    ]
    depth = len(reports[0].per_depth)
    per_depth = []
    for j in range(depth):
        proposed = sum(r.counts[j] for r in reports)
        accepted = sum(r.per_depth[j] * r.counts[j] for r in reports)
        per_depth.append(accepted / proposed if proposed else 0.0)
    periods = [r.period for r in reports]
    return {
        "per_depth": per_depth,
        "distinct": min(r.distinct_tokens for r in reports),
        "min_period": min((p for p in periods if p is not None), default=None),
    }


def _row(name: str, spec: CheckpointSpec, out: Path | None, measure: bool, n_tokens: int) -> dict:
    start = time.perf_counter()
    path = build_checkpoint(spec, out / name) if out else ensure_checkpoint(spec)
    seconds = time.perf_counter() - start
    row = {
        "name": name,
        "arch": spec.arch,
        "layout": spec.layout,
        "agreement": spec.agreement,
        "agreement_level": spec.agreement_level,
        "full_attention_interval": spec.full_attention_interval,
        "layers": spec.num_hidden_layers,
        "dtype": spec.dtype,
        "quant_bits": spec.quant_bits,
        "parameters": count_parameters(spec),
        "bytes": _size_bytes(path),
        "build_seconds": round(seconds, 2),
        "path": str(path),
    }
    if measure:
        row.update(_measure(path, n_tokens))
        mx.clear_cache()
    return row


def _format(rows: list[dict], measured: bool) -> str:
    headers = ["name", "arch", "layout", "agree", "fa/n", "dtype", "q", "params", "MB", "build s"]
    if measured:
        headers += ["accept d1..d4", "distinct", "period"]
    lines = []
    for r in rows:
        agree = r["agreement"] + (
            f"@{r['agreement_level']:g}" if r["agreement_level"] is not None else ""
        )
        cells = [
            r["name"],
            r["arch"],
            r["layout"],
            agree,
            f"{r['full_attention_interval']}/{r['layers']}",
            r["dtype"],
            str(r["quant_bits"] or "-"),
            f"{r['parameters'] / 1e6:.2f}M",
            f"{r['bytes'] / 1e6:.2f}",
            f"{r['build_seconds']:.2f}",
        ]
        if measured:
            if r.get("per_depth") is None:
                cells += ["(no head)", "-", "-"]
            else:
                cells += [
                    " ".join(f"{x:.2f}" for x in r["per_depth"]),
                    str(r["distinct"]),
                    str(r["min_period"] or "none"),
                ]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in lines]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "presets", nargs="*", help=f"preset names (default: all): {', '.join(PRESETS)}"
    )
    parser.add_argument("--out", type=Path, help="rebuild into OUT/<name> instead of the cache")
    parser.add_argument("--measure", action="store_true", help="measure MTP agreement")
    parser.add_argument("--tokens", type=int, default=48, help="greedy tokens per prompt")
    parser.add_argument(
        "--levels", help="comma-separated agreement_level values on top of dense-high"
    )
    parser.add_argument("--bench", action="store_true", help="build bench_spec() instead")
    parser.add_argument("--params", type=float, default=270e6, help="bench model size")
    parser.add_argument("--level", type=float, default=0.8, help="bench agreement_level")
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    args = parser.parse_args(argv)

    specs: dict[str, CheckpointSpec] = {}
    if args.bench:
        specs[f"bench-{args.params / 1e6:.0f}m-lvl{args.level:g}"] = bench_spec(
            args.params, args.level
        )
    for level in args.levels.split(",") if args.levels else []:
        specs[f"dense-high@{level}"] = dataclasses.replace(
            PRESETS["dense-high"], agreement_level=float(level)
        )
    unknown = [n for n in args.presets if n not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; known: {sorted(PRESETS)}")
    if args.presets or not specs:
        specs.update({n: PRESETS[n] for n in (args.presets or PRESETS)})

    rows = []
    for name, spec in specs.items():
        rows.append(_row(name, spec, args.out, args.measure, args.tokens))
        print(f"built {name}: {rows[-1]['path']}", file=sys.stderr, flush=True)
    print(_format(rows, args.measure))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
