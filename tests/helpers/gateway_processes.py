"""Start the processes the gateway and client tests talk to: an InferenceService node and a
``macmesh gateway``, each a real OS process on 127.0.0.1.

The node is a real daemon (``start_daemon_node``: ``macmesh run`` with the tiny checkpoint
launched, the real servicer with batching on); its request log (``request ended`` lines with
the caller's ``request_id``) tells tests what became of each request. ``InferenceNode`` is
all tests rely on.
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

    def wait_for_event(self, event: str, request_id: str, timeout: float = 30.0) -> dict: ...

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
class DaemonNode:
    """A real ``macmesh run`` daemon with ``model_id`` launched on it."""

    cluster: Any  # helpers.daemons.DaemonCluster
    daemon: Any  # helpers.daemons.DaemonProcess
    address: str
    model_id: str

    def records(self) -> list[dict[str, Any]]:
        """The daemon's JSON log lines about finished requests."""
        out = []
        for line in self.daemon.log_text().splitlines():
            if line.startswith("{") and '"request ended"' in line:
                out.append(json.loads(line))
        return out

    def wait_for_event(self, event: str, request_id: str, timeout: float = 30.0) -> dict:
        """The log record of ``request_id`` ending with outcome ``event`` (finished, cancelled,
        failed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.records():
                if record["request_id"] == request_id and record["outcome"] == event:
                    return record
            time.sleep(0.05)
        seen = [(r["outcome"], r["request_id"]) for r in self.records()][-10:]
        raise AssertionError(f"no {event!r} record for {request_id!r} in {timeout}s; last: {seen}")

    def stop(self) -> None:
        self.cluster.stop_all()


def start_daemon_node(
    work_dir: Path, *, max_in_flight: int = 4, model_id: str = FAKE_MODEL_ID
) -> DaemonNode:
    """A daemon serving the tiny native-MTP checkpoint as ``model_id``, admitting
    ``max_in_flight`` requests (RESOURCE_EXHAUSTED beyond)."""
    sys.path.insert(0, str(HELPERS.parent))
    from helpers.cluster_client import launch
    from helpers.daemons import DaemonCluster
    from helpers.tiny_checkpoint import write_tiny_checkpoint

    work_dir.mkdir(parents=True, exist_ok=True)
    write_tiny_checkpoint(work_dir / "models" / model_id)  # the daemons' models directory
    cluster = DaemonCluster(work_dir)
    try:
        daemon = cluster.start(
            "node",
            mdns=False,
            env={
                "MACMESH_MAX_QUEUED_REQUESTS": str(max_in_flight),
                "MACMESH_LOG_FORMAT": "json",
            },
        )
        launch(daemon.address, model_id)
    except BaseException:
        cluster.stop_all()
        raise
    return DaemonNode(cluster, daemon, daemon.address, model_id)


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
