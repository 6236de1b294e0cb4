"""The files that run the daemon at boot (launchd plist, systemd unit) and the benchmark plots.

The service files are checked the way their consumers read them (plistlib for launchd's XML,
configparser for systemd's INI) and their command line is run through the real ``macmesh`` CLI,
so a renamed command or a bad setting fails here rather than on somebody's Mac at boot.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import plistlib
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from node.cli import app
from node.config import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
PLIST = REPO / "scripts" / "macmesh.launchd.plist"
UNIT = REPO / "scripts" / "macmesh.service"
PLOT_SCRIPT = REPO / "scripts" / "plot_benchmarks.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- launchd


def _plist() -> dict[str, Any]:
    return plistlib.loads(PLIST.read_bytes())


def test_plist_runs_macmesh_run_and_keeps_it_alive() -> None:
    plist = _plist()
    args = plist["ProgramArguments"]
    assert Path(args[0]).name == "macmesh" and Path(args[0]).is_absolute()
    assert args[1] == "run"
    assert plist["Label"] and plist["RunAtLoad"] is True
    # restarted after a failure, not after a clean stop (macmesh run exits 0 on SIGTERM)
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ThrottleInterval"] >= 5


def test_plist_paths_are_absolute_since_launchd_expands_neither_tilde_nor_variables() -> None:
    plist = _plist()
    paths = [
        plist["ProgramArguments"][0],
        plist["StandardOutPath"],
        plist["StandardErrorPath"],
        plist["WorkingDirectory"],
        *plist["EnvironmentVariables"]["PATH"].split(":"),
    ]
    for path in paths:
        assert path.startswith("/"), path
        assert "~" not in path and "$" not in path, path
    assert plist["StandardErrorPath"].endswith(".log")  # logs go to stderr


# ----------------------------------------------------------------------------- systemd


def _unit() -> configparser.ConfigParser:
    # systemd allows repeated keys (Environment=); strict=False keeps the last, which is enough
    # to check the file is INI systemd can read. No interpolation: % means something else there.
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def _unit_environment() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if line.startswith("Environment="):
            for item in shlex.split(line.removeprefix("Environment=")):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def test_unit_runs_macmesh_run_restarting_on_failure_as_a_dedicated_user() -> None:
    unit = _unit()
    assert set(unit.sections()) >= {"Unit", "Service", "Install"}
    service = unit["Service"]
    command = shlex.split(service["ExecStart"])
    assert Path(command[0]).is_absolute() and Path(command[0]).name == "macmesh"
    assert command[1] == "run"
    assert service["Restart"] == "on-failure"
    assert service["User"] not in ("", "root")
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    # mDNS needs multicast on IPv4/IPv6 sockets; psutil lists interface addresses over netlink
    families = service["RestrictAddressFamilies"].split()
    assert {"AF_INET", "AF_INET6", "AF_NETLINK"} <= set(families)
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in unit["Unit"]["After"]


# ----------------------------------------------------------------------------- both files


@pytest.mark.parametrize("source", ["plist", "unit"])
def test_service_command_line_is_accepted_by_the_real_cli(source: str) -> None:
    if source == "plist":
        args = _plist()["ProgramArguments"][1:]
    else:
        args = shlex.split(_unit()["Service"]["ExecStart"])[1:]
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Start this machine's node" in result.output


@pytest.mark.parametrize("source", ["plist", "unit"])
def test_service_environment_names_real_settings_with_valid_values(
    source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _plist()["EnvironmentVariables"] if source == "plist" else _unit_environment()
    macmesh_env = {k: v for k, v in env.items() if k.startswith("MACMESH_")}
    assert macmesh_env, "expected at least one MACMESH_ setting"
    known = {f"MACMESH_{name.upper()}" for name in Settings.model_fields} | {"MACMESH_CONFIG"}
    assert set(macmesh_env) <= known, set(macmesh_env) - known
    for key in [k for k in os.environ if k.startswith("MACMESH_")]:
        monkeypatch.delenv(key)  # the test sees only what the service file sets
    for key, value in macmesh_env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()  # raises SettingsError naming any bad value
    if "MACMESH_STATE_DIR" in macmesh_env:
        assert settings.state_dir == Path(macmesh_env["MACMESH_STATE_DIR"])
    if "MACMESH_LOG_FORMAT" in macmesh_env:
        assert settings.log_format == macmesh_env["MACMESH_LOG_FORMAT"]


# ----------------------------------------------------------------------------- benchmark plots


def _plot_module() -> Any:
    spec = importlib.util.spec_from_file_location("plot_benchmarks", PLOT_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _mtp_report(acceptance: tuple[float, ...] = (0.8, 0.7, 0.6)) -> dict[str, Any]:
    """The shape scripts/bench_mtp.py writes: baseline rows, then one row per rollback and K."""
    rows: list[dict[str, Any]] = [
        {"mode": "off", "tok_s": 10.0, "tok_s_median": 9.5, "speedup": 1.0},
        {"mode": "mlx-lm", "tok_s": 9.8, "tok_s_median": 9.4, "speedup": 0.98},
    ]
    for method, scale in (("capture", 1.0), ("replay", 0.8)):
        for k, acc in enumerate(acceptance, start=1):
            speedup = scale * (1 + acc * k) / (1 + 0.3 * k)
            rows.append(
                {
                    "mode": f"{method}:{k}",
                    "tok_s": 10 * speedup,
                    "tok_s_median": 10 * speedup,
                    "speedup": speedup,
                    "k": k,
                    "acceptance": acc,
                    "tokens_per_cycle": 1 + acc * k,
                    "predicted_speedup": speedup * 1.1,
                    "efficiency": 0.9,
                }
            )
    return {
        "machine": {"processor": "x86_64", "cpus": 2, "mlx": "0.32.4", "device": "cpu"},
        "model": {"name": "bench", "parameters": 2.8e8, "layers": 12},
        "rows": rows,
    }


def _pipeline_report(nodes: tuple[int, ...] = (3, 1, 2)) -> dict[str, Any]:
    """The shape scripts/bench_pipeline.py writes (runs in any order)."""
    runs = [
        {
            "nodes": n,
            "single_stream": {"generation_tps": 12.0 - n, "prompt_tps": 100.0},
            "concurrent": {"streams": 4, "decode_tps": 10.0 * n, "wall_tps": 9.0 * n},
            "ms_per_token": 1000 / (12.0 - n),
        }
        for n in nodes
    ]
    return {
        "machine": {"cpu": "Test CPU", "cores": 2, "mlx": "0.32.4", "mlx_device": "cpu"},
        "checkpoint": {"parameters": 2.7e8},
        "pinning": "one core per node, round-robin",
        "runs": runs,
    }


def test_mtp_series_groups_by_rollback_and_skips_the_baselines() -> None:
    plot = _plot_module()
    series = plot.mtp_series(_mtp_report((0.9, 0.5)))
    assert set(series) == {"capture", "replay"}
    assert [p.k for p in series["capture"]] == [1, 2]
    assert [p.acceptance for p in series["replay"]] == [0.9, 0.5]
    assert series["capture"][1].speedup == pytest.approx((1 + 0.5 * 2) / (1 + 0.3 * 2))
    with pytest.raises(plot.BadReport, match="no native-MTP rows"):
        plot.mtp_series({"rows": [{"mode": "off", "speedup": 1.0}]})
    with pytest.raises(plot.BadReport, match="'rows'"):
        plot.mtp_series({"runs": []})


def test_pipeline_series_sorts_by_node_count_and_reads_both_rates() -> None:
    plot = _plot_module()
    points = plot.pipeline_series(_pipeline_report())
    assert [p.nodes for p in points] == [1, 2, 3]
    assert [p.single_tps for p in points] == [11.0, 10.0, 9.0]
    assert [p.aggregate_tps for p in points] == [10.0, 20.0, 30.0]
    assert {p.streams for p in points} == {4}
    with pytest.raises(plot.BadReport, match="generation_tps"):
        plot.pipeline_series({"runs": [{"nodes": 2, "single_stream": {}}]})


def _run_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """The script's ``main`` in this process (one matplotlib import for the whole session)."""
    code = _plot_module().main([*args, "--out", str(tmp_path / "img")])
    out, err = capsys.readouterr()
    return code, out, err


def test_plot_script_writes_both_pngs_from_benchmark_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    (tmp_path / "bench_mtp.json").write_text(json.dumps(_mtp_report()))
    (tmp_path / "bench_pipeline.json").write_text(json.dumps(_pipeline_report()))
    monkeypatch.chdir(tmp_path)  # the defaults: both JSON files in the working directory
    code, out, err = _run_plot(tmp_path, capsys)
    assert code == 0, err
    for name in ("mtp_speedup.png", "pipeline_tps.png"):
        png = tmp_path / "img" / name
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
        assert str(png) in out


def test_plot_script_skips_missing_or_malformed_input_and_fails_only_with_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    pipeline, broken, absent = (tmp_path / n for n in ("pipeline.json", "broken.json", "absent"))
    pipeline.write_text(json.dumps(_pipeline_report((1, 2))))
    broken.write_text("{not json")
    code, _, err = _run_plot(tmp_path, capsys, "--mtp", str(absent), "--pipeline", str(pipeline))
    assert code == 0, err
    assert f"{absent}: file not found" in err
    assert (tmp_path / "img" / "pipeline_tps.png").read_bytes().startswith(PNG_MAGIC)
    assert not (tmp_path / "img" / "mtp_speedup.png").exists()

    code, _, err = _run_plot(tmp_path, capsys, "--mtp", str(broken), "--pipeline", str(absent))
    assert code == 1
    assert f"{broken}: not JSON" in err


def test_plot_script_runs_as_a_script() -> None:
    result = subprocess.run(
        [sys.executable, str(PLOT_SCRIPT), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "--mtp" in result.stdout and "--pipeline" in result.stdout
