"""`macmesh place`: offline plans from a nodes file, JSON fields, messages and exit codes.

Most cases run the typer app in-process; two run the installed entry point as a subprocess.
"""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from node.checkpoints import PRESETS, ensure_checkpoint
from node.cli import app

GIB = 1 << 30
runner = CliRunner()


def nodes_file(tmp_path: Path, nodes: object, name: str = "nodes.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(nodes))
    return path


MACS = [
    {"id": "studio", "available_memory_bytes": 192 * GIB, "memory_bandwidth_gbps": 800},
    {"id": "mbp", "available_memory_bytes": 64 * GIB, "chip": "Apple M4 Max"},
    {"id": "mini", "available_memory_bytes": 36 * GIB},
]


def place(*args: str):
    return runner.invoke(app, ["place", *args])


def test_json_placement_has_the_stage_fields(tmp_path: Path) -> None:
    result = place(
        "Qwen3.6-35B-A3B", "--nodes", str(nodes_file(tmp_path, MACS)), "--min-nodes", "3", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model_id"] == "Qwen3.6-35B-A3B"
    assert data["single_node"] is False
    stages = data["stages"]
    assert [s["node_id"] for s in stages] == ["studio", "mbp", "mini"]
    assert stages[0]["start_layer"] == 0 and stages[-1]["end_layer"] == 40
    for a, b in itertools.pairwise(stages):
        assert a["end_layer"] == b["start_layer"]
    for stage in stages:
        assert 0 < stage["bytes"] <= stage["node_usable_bytes"]
    assert data["total_bytes"] == sum(s["bytes"] for s in stages)
    assert data["explanation"]


def test_single_node_table_and_explanation(tmp_path: Path) -> None:
    result = place("Qwen3.6-27B-8bit", "--nodes", str(nodes_file(tmp_path, MACS)))
    assert result.exit_code == 0, result.output
    assert "studio" in result.stdout and "0-63" in result.stdout
    assert "% of node" in result.stdout
    assert "native MTP can draft K=2" in result.stdout


def test_context_and_headroom_options_reach_the_planner(tmp_path: Path) -> None:
    path = str(
        nodes_file(
            tmp_path, [{"id": f"m{i}", "available_memory_bytes": 44 * GIB} for i in range(2)]
        )
    )
    short = json.loads(place("Qwen3.6-27B-8bit", "--nodes", path, "--json").stdout)
    assert short["single_node"] and short["context_length"] == 8192
    long = json.loads(
        place("Qwen3.6-27B-8bit", "--nodes", path, "--context", "262144", "--json").stdout
    )
    assert len(long["stages"]) == 2 and long["context_length"] == 262144
    tight = json.loads(
        place("Qwen3.6-27B-8bit", "--nodes", path, "--headroom", "0.5", "--json").stdout
    )
    assert tight["headroom_fraction"] == 0.5 and len(tight["stages"]) == 2


def test_a_bundled_tiny_checkpoint_can_be_placed_by_path(tmp_path: Path) -> None:
    checkpoint = ensure_checkpoint(PRESETS["dense-mlx"])
    tiny = [
        {"id": "a", "available_memory_bytes": 900_000},
        {"id": "b", "available_memory_bytes": 900_000},
    ]
    path = str(nodes_file(tmp_path, tiny))
    result = place(str(checkpoint), "--nodes", path, "--context", "64", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [(s["start_layer"], s["end_layer"]) for s in data["stages"]] == [(0, 2), (2, 4)]


def test_a_model_that_does_not_fit_exits_1_with_needed_and_offered(tmp_path: Path) -> None:
    small = [{"id": "air", "available_memory_bytes": 16 * GIB}]
    result = place("Qwen3.6-27B", "--nodes", str(nodes_file(tmp_path, small)))
    assert result.exit_code == 1
    assert "Qwen3.6-27B does not fit" in result.output
    assert "needed" in result.output and "cluster offers 14.4 GiB usable" in result.output


@pytest.mark.parametrize(
    ("args", "nodes", "message"),
    [
        (["nope-model"], MACS, "unknown model 'nope-model'"),
        (["Qwen3.6-27B"], [], "the cluster has no nodes"),
        (["Qwen3.6-27B"], [{"id": "a", "available_memory_bytes": -5}], "available_memory_bytes=-5"),
        (["Qwen3.6-27B"], [{"available_memory_bytes": 5}], "id="),
        (["Qwen3.6-27B"], {"id": "a"}, "must hold a JSON list of nodes"),
        (["Qwen3.6-27B", "--min-nodes", "4"], MACS, "min_nodes 4 is above the cluster size 3"),
        (["Qwen3.6-27B", "--min-nodes", "0"], MACS, "must be >= 1, got 0"),
        (["Qwen3.6-27B", "--headroom", "1.5"], MACS, "must be in [0, 1), got 1.5"),
        (["Qwen3.6-27B", "--context", "999999"], MACS, "context length 999999 is above"),
        (["Qwen3.6-27B"], [{"id": "a", "available_memory_bytes": 1}] * 2, "listed twice"),
    ],
)
def test_bad_input_exits_2_naming_the_bad_value(tmp_path: Path, args, nodes, message: str) -> None:
    result = place(*args, "--nodes", str(nodes_file(tmp_path, nodes)))
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.replace("│", " ").split())
    assert message in flat


def test_a_status_style_file_keeps_only_live_nodes(tmp_path: Path) -> None:
    view = {
        "cluster": "home",
        "nodes": [
            {"id": "down-big", "available_memory_bytes": 512 * GIB, "state": "down"},
            {
                "id": "up-small",
                "available_memory_bytes": 64 * GIB,
                "state": "up",
                "total_memory_bytes": 0,
            },
        ],
    }
    result = place("Qwen3.6-27B-4bit", "--nodes", str(nodes_file(tmp_path, view)), "--json")
    assert result.exit_code == 0, result.output
    assert [s["node_id"] for s in json.loads(result.stdout)["stages"]] == ["up-small"]


def test_unreadable_nodes_file_is_named(tmp_path: Path) -> None:
    missing = place("Qwen3.6-27B", "--nodes", str(tmp_path / "absent.json"))
    assert missing.exit_code == 2 and "absent.json" in missing.output
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{nope")
    result = place("Qwen3.6-27B", "--nodes", str(garbage))
    assert result.exit_code == 2 and "is not JSON" in result.output


def test_a_malformed_daemon_address_is_named() -> None:
    result = place("Qwen3.6-27B", "--node", "localhost")
    assert result.exit_code == 2 and "'localhost' is not HOST:PORT" in result.output


def unused_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def macmesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_entry_point_plans_offline_from_a_nodes_file(tmp_path: Path) -> None:
    out = macmesh(
        "place", "Qwen3.5-122B-A10B-4bit", "--nodes", str(nodes_file(tmp_path, MACS)), "--json"
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["single_node"] and data["stages"][0]["node_id"] == "studio"
    assert (data["stages"][0]["start_layer"], data["stages"][0]["end_layer"]) == (0, 48)


def test_without_a_nodes_file_it_asks_the_daemon_and_says_when_none_answers() -> None:
    address = f"127.0.0.1:{unused_loopback_port()}"
    out = macmesh("place", "Qwen3.6-27B", "--node", address)
    assert out.returncode == 1
    assert f"no macmesh daemon reachable at {address}" in out.stderr
    assert "pass --nodes FILE to plan offline" in out.stderr


def test_without_a_nodes_file_it_plans_on_the_live_cluster(tmp_path: Path) -> None:
    from helpers.daemons import DaemonCluster

    with DaemonCluster(tmp_path) as cluster:
        a = cluster.start("alpha", mdns=False)
        b = cluster.start("beta", mdns=False, peers=[a.address])
        cluster.wait_connected([a, b], timeout=20)
        out = macmesh(
            "place", "tiny-qwen3.5-dense", "--node", a.address, "--min-nodes", "2", "--json"
        )
        assert out.returncode == 0, out.stderr + a.log_text()
    data = json.loads(out.stdout)
    assert {s["node_id"] for s in data["stages"]} == {a.node_id, b.node_id}
    for stage in data["stages"]:
        assert 0 < stage["bytes"] <= stage["node_usable_bytes"] < stage["node_available_bytes"]
