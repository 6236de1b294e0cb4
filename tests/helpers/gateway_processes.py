"""Start the processes the gateway and client tests talk to: an InferenceService node and a
``macmesh gateway``, each a real OS process on 127.0.0.1.

The node is, for now, the test double in ``fake_inference.py`` (real local engine on a tiny
checkpoint). ``InferenceNode`` is all tests rely on, so a handle on a real daemon with the same
four members replaces it without touching the tests.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

HELPERS = Path(__file__).resolve().parent
REPO = HELPERS.parent.parent
FAKE_MODEL_ID = "tiny-mtp"
STARTUP_SECONDS = 90.0  # a loaded 2-core machine can be slow to import MLX and build a model


class InferenceNode(Protocol):
    address: str  # HOST:PORT of InferenceService
    model_id: str  # a launched model with native MTP

    def wait_for_event(self, event: str, request_id: str, timeout: float = 10.0) -> dict: ...

    def stop(self) -> None: ...


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _read_line_matching(
    process: subprocess.Popen[str], pattern: str, timeout: float, log: Path
) -> re.Match[str]:
    """Wait for a stdout line matching ``pattern``; fail with the process's log if it dies."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    stdout: IO[str] = process.stdout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stdout], [], [], 0.2)
        if ready:
            line = stdout.readline()
            if match := re.search(pattern, line):
                return match
            if not line and process.poll() is not None:
                break
        elif process.poll() is not None:
            break
    process.kill()
    raise RuntimeError(f"process did not print {pattern!r}; its log:\n{log.read_text()[-4000:]}")


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    if process.stdout is not None:
        process.stdout.close()


@dataclass
class FakeNode:
    """A running ``fake_inference.py`` (the HTTP-layer test double)."""

    process: subprocess.Popen[str]
    address: str
    model_id: str
    events_path: Path

    def events(self) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines() if line]

    def wait_for_event(self, event: str, request_id: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.events():
                if record["event"] == event and record["request_id"] == request_id:
                    return record
            time.sleep(0.05)
        seen = [(r["event"], r["request_id"]) for r in self.events()][-10:]
        raise AssertionError(f"no {event!r} event for {request_id!r} in {timeout}s; last: {seen}")

    def request_as_received(self, request_id: str) -> dict[str, Any]:
        return self.wait_for_event("started", request_id)["request"]

    def stop(self) -> None:
        _stop(self.process)


def start_fake_node(work_dir: Path, checkpoint: Path, *, max_in_flight: int = 4) -> FakeNode:
    """Start the test double serving a tiny checkpoint (written there first if absent)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    events = work_dir / "events.jsonl"
    log = work_dir / "fake_node.log"
    command = [
        sys.executable,
        str(HELPERS / "fake_inference.py"),
        "--checkpoint",
        str(checkpoint),
        "--write-checkpoint",
        "--model-id",
        FAKE_MODEL_ID,
        "--events",
        str(events),
        "--max-in-flight",
        str(max_in_flight),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=_env(), cwd=REPO
    )
    port = _read_line_matching(process, r"READY (\d+)", STARTUP_SECONDS, log).group(1)
    return FakeNode(process, f"127.0.0.1:{port}", FAKE_MODEL_ID, events)


@dataclass
class Gateway:
    process: subprocess.Popen[str]
    url: str  # http://127.0.0.1:PORT

    @property
    def api(self) -> str:
        return f"{self.url}/v1"

    def stop(self) -> None:
        _stop(self.process)


def start_gateway(work_dir: Path, node_address: str, *extra: str) -> Gateway:
    """Run ``macmesh gateway --port 0 --node ADDRESS`` and wait until it listens."""
    work_dir.mkdir(parents=True, exist_ok=True)
    log = work_dir / f"gateway-{node_address.replace(':', '_')}.log"
    command = [
        sys.executable,
        "-m",
        "node.cli",
        "gateway",
        "--port",
        "0",
        "--node",
        node_address,
        *extra,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=_env(), cwd=REPO
    )
    url = _read_line_matching(process, r"(http://\S+)", STARTUP_SECONDS, log).group(1)
    return Gateway(process, url)


def dead_address() -> str:
    """A loopback HOST:PORT nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"
