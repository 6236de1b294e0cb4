#!/usr/bin/env python3
"""Draw the benchmark plots from the JSON the benchmark scripts write.

    python scripts/bench_mtp.py --json bench_mtp.json
    python scripts/bench_pipeline.py --json bench_pipeline.json
    python scripts/plot_benchmarks.py --mtp bench_mtp.json --pipeline bench_pipeline.json

writes into ``docs/img/`` (``--out``):

- ``mtp_speedup.png``: native-MTP decode speed-up over target-only decode against K, one line
  per rollback method, with the measured draft acceptance on a second axis;
- ``pipeline_tps.png``: pipelined decode tok/s against the number of nodes, single stream and
  the aggregate of concurrent streams.

A missing or unreadable input skips its plot with a message; the exit code is 1 only when
nothing could be plotted. matplotlib is a development dependency, not a runtime one.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MTP_PNG = "mtp_speedup.png"
PIPELINE_PNG = "pipeline_tps.png"
ROLLBACK_LABELS = {
    "capture": "keep per-position GatedDeltaNet state",
    "replay": "snapshot + replay",
}


class BadReport(ValueError):
    """A benchmark JSON file without the fields a plot needs; the message says which."""


# ----------------------------------------------------------------------------- reading (pure)


@dataclass(frozen=True)
class MtpPoint:
    k: int
    speedup: float
    acceptance: float | None
    predicted_speedup: float | None


@dataclass(frozen=True)
class PipelinePoint:
    nodes: int
    single_tps: float
    aggregate_tps: float | None
    streams: int | None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def mtp_series(report: dict[str, Any]) -> dict[str, list[MtpPoint]]:
    """Rollback method -> points sorted by K, from ``bench_mtp.py``'s ``rows``.

    A row with a ``k`` is a native-MTP run; its method is ``rollback`` or the part of ``mode``
    before the colon (``capture:2``). Rows without K (target-only, mlx-lm) are the baseline."""
    rows = report.get("rows")
    if not isinstance(rows, list):
        raise BadReport("no 'rows' list")
    series: dict[str, list[MtpPoint]] = {}
    for row in rows:
        if not isinstance(row, dict) or _number(row.get("k")) is None:
            continue
        # bench_mtp.py writes wall_* (wall clock) and cpu_* columns; older reports: speedup.
        speedup = _number(row.get("wall_speedup", row.get("speedup")))
        if speedup is None:
            raise BadReport(f"row {row.get('mode')!r} has K but no numeric 'speedup'")
        method = row.get("rollback") or str(row.get("mode", "mtp")).split(":")[0]
        series.setdefault(method, []).append(
            MtpPoint(
                k=int(row["k"]),
                speedup=speedup,
                acceptance=_number(row.get("acceptance")),
                predicted_speedup=_number(
                    row.get("wall_predicted_speedup", row.get("predicted_speedup"))
                ),
            )
        )
    if not series:
        raise BadReport("no native-MTP rows (rows with a 'k')")
    return {method: sorted(points, key=lambda p: p.k) for method, points in series.items()}


def pipeline_series(report: dict[str, Any]) -> list[PipelinePoint]:
    """Points sorted by node count, from ``bench_pipeline.py``'s ``runs``."""
    runs = report.get("runs")
    if not isinstance(runs, list):
        raise BadReport("no 'runs' list")
    points = []
    for run in runs:
        if not isinstance(run, dict):
            continue
        nodes = _number(run.get("nodes"))
        single = _number((run.get("single_stream") or {}).get("generation_tps"))
        if nodes is None or single is None:
            raise BadReport(
                f"run {run.get('nodes')!r} lacks 'nodes' or single_stream.generation_tps"
            )
        concurrent = run.get("concurrent") or {}
        streams = _number(concurrent.get("streams"))
        points.append(
            PipelinePoint(
                nodes=int(nodes),
                single_tps=single,
                aggregate_tps=_number(concurrent.get("decode_tps")),
                streams=int(streams) if streams is not None else None,
            )
        )
    if not points:
        raise BadReport("no runs")
    return sorted(points, key=lambda p: p.nodes)


def describe_machine(report: dict[str, Any]) -> str:
    """A short machine line for a caption: CPU, cores, MLX device, BLAS."""
    m = report.get("machine")
    if not isinstance(m, dict):
        return ""
    cpu = m.get("cpu") or m.get("processor") or ""
    cores = m.get("cores") or m.get("cpus")
    device = m.get("mlx_device") or m.get("device") or ""
    blas = "OpenBLAS" if "openblas" in str(m.get("blas_preload", "")).lower() else ""
    parts = [
        str(cpu),
        f"{cores} cores" if cores else "",
        f"mlx {m['mlx']} {device}".strip() if m.get("mlx") else str(device),
        blas,
    ]
    return ", ".join(p for p in parts if p)


def load_report(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadReport("file not found") from None
    except OSError as exc:
        raise BadReport(f"cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise BadReport(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadReport(f"expected a JSON object, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- drawing


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        sys.exit(
            "plot_benchmarks.py needs matplotlib (a development dependency): "
            "pip install -e '.[dev]' or pip install matplotlib"
        )
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_mtp(report: dict[str, Any], out: Path) -> Path:
    plt = _pyplot()
    series = mtp_series(report)
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=150)
    acc_ax = ax.twinx()
    ks: set[int] = set()
    for method, points in series.items():
        xs = [p.k for p in points]
        ks.update(xs)
        label = ROLLBACK_LABELS.get(method, method)
        (line,) = ax.plot(xs, [p.speedup for p in points], marker="o", label=f"speed-up: {label}")
        for p in points:
            ax.annotate(
                f"{p.speedup:.2f}x",
                (p.k, p.speedup),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=8,
                color=line.get_color(),
            )
    # Output is exact whatever the rollback, so acceptance is one curve: the mean over methods.
    acceptance: dict[int, list[float]] = {}
    for points in series.values():
        for p in points:
            if p.acceptance is not None:
                acceptance.setdefault(p.k, []).append(p.acceptance)
    if acceptance:
        xs = sorted(acceptance)
        ys = [100 * sum(acceptance[k]) / len(acceptance[k]) for k in xs]
        acc_ax.plot(xs, ys, color="0.45", linestyle="--", marker="s", label="draft acceptance")
    acc_ax.set_ylim(0, 105)
    acc_ax.set_ylabel("accepted drafts (%)")
    ax.axhline(1.0, color="0.6", linewidth=0.8)
    ax.set_xticks(sorted(ks))
    ax.set_xlabel("K (draft tokens per step)")
    ax.set_ylabel("decode speed-up over target-only")
    top = max(p.speedup for points in series.values() for p in points)
    ax.set_ylim(0, max(2.0, top * 1.2))
    handles, labels = ax.get_legend_handles_labels()
    acc_handles, acc_labels = acc_ax.get_legend_handles_labels()
    ax.legend(handles + acc_handles, labels + acc_labels, loc="lower right", fontsize=8)
    model = report.get("model") or {}
    title = "Native MTP: speed-up and acceptance against K"
    if isinstance(model, dict) and _number(model.get("parameters")):
        title += f" ({model['parameters'] / 1e6:.0f}M-parameter qwen3_5)"
    ax.set_title(title, fontsize=10)
    _caption(fig, report)
    return _save(fig, plt, out / MTP_PNG)


def plot_pipeline(report: dict[str, Any], out: Path) -> Path:
    plt = _pyplot()
    points = pipeline_series(report)
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=150)
    xs = [p.nodes for p in points]
    ax.plot(xs, [p.single_tps for p in points], marker="o", label="single stream")
    aggregate = [p for p in points if p.aggregate_tps is not None]
    if aggregate:
        streams = {p.streams for p in aggregate if p.streams}
        label = f"{streams.pop()} concurrent streams (sum)" if len(streams) == 1 else "aggregate"
        ax.plot(
            [p.nodes for p in aggregate],
            [p.aggregate_tps for p in aggregate],
            marker="s",
            label=label,
        )
    for p in points:
        ax.annotate(
            f"{p.single_tps:.1f}",
            (p.nodes, p.single_tps),
            textcoords="offset points",
            xytext=(0, 7),
            ha="center",
            fontsize=8,
        )
    ax.set_xticks(xs)
    ax.set_xlabel("nodes in the pipeline")
    ax.set_ylabel("decode tokens per second")
    top = max([p.single_tps for p in points] + [p.aggregate_tps or 0.0 for p in points])
    ax.set_ylim(0, top * 1.2)
    ax.legend(loc="best", fontsize=8)
    checkpoint = report.get("checkpoint") or {}
    title = "Pipelined decode: tok/s against node count"
    if isinstance(checkpoint, dict) and _number(checkpoint.get("parameters")):
        title += f" ({checkpoint['parameters'] / 1e6:.0f}M parameters)"
    ax.set_title(title, fontsize=10)
    _caption(fig, report, extra=report.get("pinning"))
    return _save(fig, plt, out / PIPELINE_PNG)


def _caption(fig: Any, report: dict[str, Any], extra: Any = None) -> None:
    text = "; ".join(str(t) for t in (describe_machine(report), extra) if t)
    if text:
        fig.text(0.01, 0.01, text, fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.04 if text else 0, 1, 1))


def _save(fig: Any, plt: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mtp", type=Path, default=Path("bench_mtp.json"), help="bench_mtp.py JSON"
    )
    parser.add_argument(
        "--pipeline",
        type=Path,
        default=Path("bench_pipeline.json"),
        help="bench_pipeline.py JSON",
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img", help="PNG directory")
    args = parser.parse_args(argv)

    written = []
    for name, path, plot in (
        ("MTP", args.mtp, plot_mtp),
        ("pipeline", args.pipeline, plot_pipeline),
    ):
        try:
            written.append(plot(load_report(path), args.out))
        except BadReport as exc:
            print(f"skipped the {name} plot: {path}: {exc}", file=sys.stderr)
    for path in written:
        print(f"wrote {path}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
