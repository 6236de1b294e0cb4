"""A throwaway cluster of real daemons on this machine (what ``macmesh demo`` runs).

Each node is a ``macmesh run`` process on 127.0.0.1 with a free port, its own state directory
under ``root``, mDNS off (a demo must not advertise itself on the user's network) and the first
node as its static peer; the others learn about each other by gossip. The environment is
scrubbed of ``MACMESH_*`` settings and the user's config file, so the demo behaves the same on
every machine. ``stop()`` sends SIGTERM to every node (clean shutdown: instances unloaded,
goodbyes sent) and SIGKILLs only what is still alive after the grace period.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT_S = 30.0


class LocalClusterError(RuntimeError):
    """A node did not start or the nodes did not find each other; the message has its log."""


@dataclass
class LocalNode:
    name: str
    state_dir: Path
    log_path: Path
    proc: subprocess.Popen
    address: str = ""
    node_id: str = ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def node_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACMESH_")}
    env["MACMESH_CONFIG"] = str(root / "no-config.toml")  # absent on purpose: defaults apply
    env["PYTHONUNBUFFERED"] = "1"
    return env


class LocalCluster:
    def __init__(self, root: Path, size: int, *, models_dir: Path | None = None) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one node, got {size}")
        self.root = root
        self.size = size
        self.models_dir = models_dir or root / "models"
        self.cluster = f"demo-{uuid.uuid4().hex[:8]}"
        self.nodes: list[LocalNode] = []

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, index: int, peers: list[str]) -> LocalNode:
        name = f"node{index}"
        state_dir = self.root / name
        state_dir.mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable, "-m", "node.cli", "--log-level", "warning", "run",
            "--name", name, "--grpc-port", "0", "--interface", "127.0.0.1", "--no-mdns",
            "--cluster", self.cluster, "--state-dir", str(state_dir),
            "--models-dir", str(self.models_dir),
        ]  # fmt: skip
        for peer in peers:
            args += ["--peer", peer]
        log_path = state_dir / "daemon.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=node_env(self.root),
                start_new_session=True,  # a Ctrl-C meant for the demo is the demo's to handle
            )
        node = LocalNode(name, state_dir, log_path, proc)
        self.nodes.append(node)
        return node

    def _wait_ready(self, node: LocalNode, deadline: float) -> None:
        while True:
            if not node.alive():
                raise LocalClusterError(
                    f"{node.name} exited with code {node.proc.returncode}:\n{node.log_tail()}"
                )
            try:
                data = json.loads((node.state_dir / "daemon.json").read_text())
                if data.get("pid") == node.proc.pid:
                    node.address, node.node_id = data["client_address"], data["node_id"]
                    return
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise LocalClusterError(f"{node.name} did not start in time:\n{node.log_tail()}")
            time.sleep(0.05)

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> list[LocalNode]:
        """Start every node and return once each one sees all the others up."""
        from node.discovery.client import cluster_view

        deadline = time.monotonic() + timeout_s
        first = self._spawn(1, [])
        self._wait_ready(first, deadline)
        rest = [self._spawn(i, [first.address]) for i in range(2, self.size + 1)]
        for node in rest:
            self._wait_ready(node, deadline)
        while True:
            try:
                if all(len(cluster_view(n.address).live()) == self.size for n in self.nodes):
                    return self.nodes
            except ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise LocalClusterError(
                    f"the {self.size} nodes did not all see each other within {timeout_s:g} s"
                )
            time.sleep(0.1)

    def stop(self, grace_s: float = 15.0) -> dict[str, int | None]:
        """SIGTERM every node, wait, SIGKILL stragglers; returns each node's exit code."""
        for node in self.nodes:
            if node.alive():
                node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        codes: dict[str, int | None] = {}
        for node in self.nodes:
            try:
                codes[node.name] = node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(timeout=10)
                codes[node.name] = None  # did not stop cleanly
        return codes
