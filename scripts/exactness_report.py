#!/usr/bin/env python3
"""How exact native MTP is, counted over the exactness matrix of tests/test_mtp_engine.py.

    nice python scripts/exactness_report.py --tokens 32 --bf16-tokens 40   # both BLAS, ~25 min
    nice python scripts/exactness_report.py --blas openblas                # one of them

For every (model, prompt) of the matrix — the same prompts, lengths and models as the tests
(every layout, 4-bit, bf16, tied; dense and MoE partial / high / none agreement heads) — the
reference is mlx-lm's own target-only greedy generation (``mlx_lm.generate.generate_step`` with
an argmax sampler, stock: no upcast). At every generated position it records the gap between
the two largest log-probabilities mlx-lm took the argmax of, and counts near-ties (gap < 1e-4;
in bf16 the gap is 0 or at least one bf16 step, so ties are exact ties broken by token id).
Then our MtpEngine runs the same prompt for K = 1..4 and every run that differs from mlx-lm is
a divergence: its first differing position, and the reference's top-2 gap there (the tokens
after it continue a different text, so only the first difference counts).

bf16 checkpoints are also compared against mlx-lm with a float32 upcast before its log-softmax,
and our engine runs twice on them: as shipped (greedy log-softmax in the logits' dtype, like
mlx-lm) and with its logits upcast to float32 first (what node/inference/sampling.py did
before): which of the two gives the user stock mlx-lm's tokens.

``--blas both`` (default) runs the matrix once with OpenBLAS preloaded (as ./scripts/test does)
and once with MLX's reference BLAS (no preload), each in its own process, and writes one JSON
(docs/bench/exactness.json unless --json). ``--tokens`` caps the generated tokens of the long
cases (the slow tests use 200; the layout cases keep their 40). Run with nice on a shared box.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
NEAR_TIE = 1e-4
KS = (1, 2, 3, 4)


@dataclass
class Case:
    group: str
    model: str
    prompt_index: int
    prompt_len: int
    tokens: int


@dataclass
class Run:
    """One MtpEngine run against one reference."""

    k: int
    variant: str  # "shipped" or "float32" (bf16 only)
    reference: str  # "stock" or "upcast" (bf16 only)
    diverged_at: int | None
    gap_at_divergence: float | None


@dataclass
class CaseResult:
    case: Case
    positions: int
    near_ties: int  # stock reference, gap < NEAR_TIE (exact ties included)
    exact_ties: int
    min_gap: float
    upcast_near_ties: int | None = None  # bf16: the float32-upcast reference
    upcast_differs_at: int | None = None  # bf16: first token where upcast != stock mlx-lm
    runs: list[Run] = field(default_factory=list)


def matrix(tokens: int, bf16_tokens: int) -> list[Case]:
    """The cases of tests/test_mtp_engine.py, long ones capped at `tokens` generated tokens."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_mtp_engine import LAYOUTS, PROMPT_LENGTHS

    cases = [Case("layouts", name, i, 40, 40) for i, name in enumerate(LAYOUTS)]
    for name, count in (("dense-partial", 20), ("moe-partial", 12)):
        cases += [Case("partial", name, i, PROMPT_LENGTHS[i], tokens) for i in range(count)]
    cases += [Case("high", "dense-high", i, PROMPT_LENGTHS[i], tokens) for i in (10, 11, 12, 13)]
    cases += [Case("high", "moe-high", 3, PROMPT_LENGTHS[3], min(tokens, 48))]
    cases += [Case("none", name, 2, PROMPT_LENGTHS[2], 32) for name in ("dense-none", "moe-none")]
    # bf16 beyond the layout cases' one prompt per checkpoint: the full matrix's 20 prompts on
    # dense-hf-bf16 (dense-mlx-bf16 holds the same weights; MoE has no bf16 on MLX's CPU
    # backend: GatherMM is float32-only).
    cases += [Case("bf16", "dense-hf-bf16", i, PROMPT_LENGTHS[i], bf16_tokens) for i in range(20)]
    return cases


def measure(cases: list[Case]) -> list[CaseResult]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from test_mtp_engine import loaded, prompt

    import node.inference.engine as engine_module
    import node.inference.mtp.engine as mtp_module
    from node.inference.mtp.engine import MtpEngine
    from node.inference.requests import GenerateRequest

    def reference(
        model: Any, ids: list[int], n: int, upcast: bool
    ) -> tuple[list[int], list[float]]:
        gaps: list[mx.array] = []

        def sampler(logprobs: mx.array) -> mx.array:
            top2 = mx.sort(logprobs, axis=-1)[..., -2:]
            gaps.append((top2[..., 1] - top2[..., 0]).astype(mx.float32))
            return mx.argmax(logprobs, axis=-1)

        processors = [lambda _tokens, logits: logits.astype(mx.float32)] if upcast else None
        steps = generate_step(
            mx.array(ids), model, max_tokens=n, sampler=sampler, logits_processors=processors
        )
        tokens = [int(t) for t, _ in steps]
        mx.eval(gaps)
        # generate_step samples one token ahead of what it yields: drop the extra position.
        return tokens, [float(g.item()) for g in gaps[: len(tokens)]]

    shipped = mtp_module.processed_logprobs

    def upcast_first(logits: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        return shipped(logits.astype(mx.float32), *args, **kwargs)

    def ours(name: str, ids: list[int], n: int, k: int, variant: str) -> list[int]:
        patched = upcast_first if variant == "float32" else shipped
        # The first token comes from engine.next_token, the verified ones from the MTP loop.
        engine_module.processed_logprobs = mtp_module.processed_logprobs = patched
        try:
            request = GenerateRequest(prompt_ids=ids, max_tokens=n, mtp_k=k, ignore_eos=True)
            return list(MtpEngine(loaded(name)).generate(request))[-1].token_ids
        finally:
            engine_module.processed_logprobs = mtp_module.processed_logprobs = shipped

    def first_difference(a: list[int], b: list[int]) -> int | None:
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)

    results = []
    for number, case in enumerate(cases, 1):
        started = time.perf_counter()
        model = loaded(case.model).model
        ids = prompt(case.prompt_index, case.prompt_len)
        half = model.language_model.model.embed_tokens.weight.dtype == mx.bfloat16
        refs = {"stock": reference(model, ids, case.tokens, upcast=False)}
        if half:
            refs["upcast"] = reference(model, ids, case.tokens, upcast=True)
        stock_tokens, stock_gaps = refs["stock"]
        result = CaseResult(
            case=case,
            positions=len(stock_gaps),
            near_ties=sum(g < NEAR_TIE for g in stock_gaps),
            exact_ties=sum(g == 0.0 for g in stock_gaps),
            min_gap=min(stock_gaps),
        )
        if half:
            result.upcast_near_ties = sum(g < NEAR_TIE for g in refs["upcast"][1])
            result.upcast_differs_at = first_difference(refs["upcast"][0], stock_tokens)
        for variant in ("shipped", "float32") if half else ("shipped",):
            for k in KS:
                tokens = ours(case.model, ids, case.tokens, k, variant)
                for ref_name, (ref_tokens, ref_gaps) in refs.items():
                    at = first_difference(tokens, ref_tokens)
                    gap = None if at is None else ref_gaps[at]
                    result.runs.append(Run(k, variant, ref_name, at, gap))
        results.append(result)
        diverged = sum(r.diverged_at is not None for r in result.runs if r.reference == "stock")
        print(
            f"[{number}/{len(cases)}] {case.model} prompt {case.prompt_index} "
            f"({case.prompt_len}+{case.tokens}): near-ties {result.near_ties}, "
            f"runs off stock mlx-lm {diverged}, {time.perf_counter() - started:.1f}s",
            file=sys.stderr,
            flush=True,
        )
    return results


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts per group (and per bf16 variant × reference)."""
    groups: dict[str, dict[str, Any]] = {}
    for r in results:
        g = groups.setdefault(
            r["case"]["group"],
            {"cases": 0, "positions": 0, "near_ties": 0, "exact_ties": 0, "min_gap": None},
        )
        g["cases"] += 1
        g["positions"] += r["positions"]
        g["near_ties"] += r["near_ties"]
        g["exact_ties"] += r["exact_ties"]
        g["min_gap"] = r["min_gap"] if g["min_gap"] is None else min(g["min_gap"], r["min_gap"])
        for run in r["runs"]:
            key = f"{run['variant']} vs {run['reference']}"
            v = g.setdefault(
                key, {"runs": 0, "diverged": 0, "on_near_tie": 0, "first_positions": []}
            )
            v["runs"] += 1
            if run["diverged_at"] is not None:
                v["diverged"] += 1
                v["on_near_tie"] += run["gap_at_divergence"] < NEAR_TIE
                v["first_positions"].append(
                    [r["case"]["model"], r["case"]["prompt_index"], run["k"], run["diverged_at"]]
                )
        if r.get("upcast_near_ties") is not None:
            g["upcast_near_ties"] = g.get("upcast_near_ties", 0) + r["upcast_near_ties"]
            if r["upcast_differs_at"] is not None:
                g.setdefault("upcast_vs_stock_differs", []).append(
                    [r["case"]["model"], r["case"]["prompt_index"], r["upcast_differs_at"]]
                )
    return groups


def print_table(blas: str, groups: dict[str, Any]) -> None:
    print(f"\n{blas}")
    header = (
        f"{'group':<9} {'cases':>5} {'positions':>9} {'near-ties':>9} {'ties':>5} "
        f"{'min gap':>9}  {'engine vs mlx-lm':<19} {'runs':>5} {'diverged':>8} {'on tie':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, g in groups.items():
        runs = [(key, v) for key, v in g.items() if isinstance(v, dict)]
        for i, (key, v) in enumerate(runs):
            lead = (
                f"{name:<9} {g['cases']:>5} {g['positions']:>9} {g['near_ties']:>9} "
                f"{g['exact_ties']:>5} {g['min_gap']:>9.2e}"
                if i == 0
                else " " * 52
            )
            print(f"{lead}  {key:<19} {v['runs']:>5} {v['diverged']:>8} {v['on_near_tie']:>6}")
        if "upcast_near_ties" in g:
            differs = g.get("upcast_vs_stock_differs", [])
            print(
                f"{'':<9} mlx-lm with a float32 upcast: {g['upcast_near_ties']} near-ties; "
                f"differs from stock mlx-lm on {len(differs)} of {g['cases']} prompts {differs}"
            )


def child(blas: str, tokens: int, bf16_tokens: int, limit: int | None) -> dict[str, Any]:
    cases = matrix(tokens, bf16_tokens)[:limit]
    started = time.perf_counter()
    results = [asdict(r) for r in measure(cases)]
    return {
        "blas": blas,
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "seconds": round(time.perf_counter() - started, 1),
        "groups": summarize(results),
        "cases": results,
    }


def slim(report: dict[str, Any]) -> dict[str, Any]:
    """Per case, keep the counts and only the runs that diverged (the summary counts them all)."""
    cases = []
    for case in report["cases"]:
        runs = case["runs"]
        diverged = [run for run in runs if run["diverged_at"] is not None]
        cases.append({**case, "runs": len(runs), "diverged_runs": diverged})
    return {**report, "cases": cases}


def main() -> None:
    from _benchinfo import cpu_model  # scripts/ is on sys.path when this file runs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blas", choices=["both", "openblas", "reference"], default="both")
    parser.add_argument("--tokens", type=int, default=200, help="generated tokens, long cases")
    parser.add_argument("--bf16-tokens", type=int, default=40, help="generated tokens, bf16 cases")
    parser.add_argument("--limit", type=int, default=None, help="first N cases only (smoke run)")
    parser.add_argument("--json", type=Path, default=REPO / "docs/bench/exactness.json")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # where a child writes
    args = parser.parse_args()

    if args.child:
        args.child.write_text(
            json.dumps(child(args.blas, args.tokens, args.bf16_tokens, args.limit))
        )
        return

    reports = []
    for blas in ("openblas", "reference") if args.blas == "both" else (args.blas,):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
        env.pop("LD_PRELOAD", None)
        if blas == "openblas":
            if not Path(OPENBLAS).exists():
                sys.exit(
                    f"{OPENBLAS} not found: install libopenblas0-pthread or use --blas reference"
                )
            env["LD_PRELOAD"] = OPENBLAS
        part = args.json.with_suffix(f".{blas}.part")
        command = [sys.executable, __file__, "--child", str(part), "--blas", blas]
        command += ["--tokens", str(args.tokens), "--bf16-tokens", str(args.bf16_tokens)]
        if args.limit is not None:
            command += ["--limit", str(args.limit)]
        print(f"== {blas} BLAS", file=sys.stderr, flush=True)
        subprocess.run(command, env=env, check=True)
        reports.append(json.loads(part.read_text()))
        part.unlink()

    for report in reports:
        print_table(f"{report['blas']} BLAS ({report['seconds']}s)", report["groups"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "command": "python scripts/exactness_report.py " + " ".join(sys.argv[1:]),
                "machine": f"{platform.system()} {platform.machine()}, {cpu_model()}",
                "cpus": os.cpu_count(),
                "near_tie": NEAR_TIE,
                "tokens": args.tokens,
                "bf16_tokens": args.bf16_tokens,
                "reports": [slim(report) for report in reports],
            },
            indent=1,
        )
    )
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
