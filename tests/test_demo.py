"""`macmesh demo` end to end, as a user runs it: a subprocess, three daemons, two requests."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import psutil
from helpers.daemons import macmesh_env


def test_demo_runs_both_engines_and_leaves_nothing_behind(tmp_path) -> None:
    began = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "node.cli", "demo", "--max-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard only
        # MACMESH_* settings of the caller must not leak into the demo cluster.
        env={**macmesh_env(tmp_path), "COLUMNS": "120", "MACMESH_NATIVE_MTP": "0"},
    )
    elapsed = time.monotonic() - began
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    print(f"the demo took {elapsed:.1f} s")  # speed is not asserted: a loaded CI box is slow

    pids = [int(p) for p in re.findall(r"started node\d \(pid (\d+)\)", text)]
    assert len(pids) == 3, text
    # Both instances, their engines and why, and the stats of both requests.
    assert "engine=pipeline" in text and "engine=native_mtp" in text
    assert "pipeline: the placement spans 3 nodes" in text
    # K is the policy's mean over the request's cycles (adaptive unless --mtp-k pins it).
    assert re.search(r"drafts\s+native_mtp K=[\d.]+ \(mean\): accepted \d+/\d+", text), text
    assert re.search(r"stages\s+node\d \[0, \d\) → node\d \[\d, \d\) → node\d \[\d, 4\)", text)
    assert re.search(r"stages\s+node2 \[0, 4\)", text), text  # the single-node instance
    assert "macmesh status" in text and "2 instances" in text
    assert "unloaded 2 instances" in text
    # Clean shutdown: every daemon exited 0 (SIGTERM, not SIGKILL) and none is left running.
    assert "stopped 3 nodes (node1 exit 0, node2 exit 0, node3 exit 0)" in text
    assert not [pid for pid in pids if psutil.pid_exists(pid)]
