"""Real macmesh daemons as separate processes, for tests. Reuse it; do not mock the cluster.

Every daemon runs ``python -m node.cli run`` with its own state dir under the test's tmp dir, a
free gRPC port picked by the daemon itself (``--grpc-port 0``), ``--interface 127.0.0.1`` (so
mDNS and gRPC never leave loopback) and a cluster name unique to the ``DaemonCluster`` (so
parallel test runs never see each other). Everything started is torn down on exit, even when the
test fails.

    from helpers.daemons import DaemonCluster, wait_for

    def test_three_nodes(tmp_path):
        with DaemonCluster(tmp_path) as cluster:
            a, b, c = cluster.start_many(3)           # started in parallel, ready on return
            cluster.wait_connected([a, b, c], timeout=3)
            nodes = a.view().nodes                    # ClusterView over gRPC
            c.kill()                                  # SIGKILL; c.terminate() = clean SIGTERM
            c = cluster.restart(c)                    # same state dir, so the same node id

``start(name, peers=[...], mdns=False, extra_args=[...], env={...})`` adds one daemon; extra
arguments go to ``macmesh run`` (e.g. ``["--models-dir", str(path)]``), ``env`` to its
environment. ``DaemonProcess.address`` is what a client on this machine dials;
``DaemonProcess.log_text()`` is its stdout+stderr (put it in assertion messages).
``command_prefix`` (e.g. ``["ip", "netns", "exec", "ns1"]``) runs daemons elsewhere;
``view()`` then asks through the same prefix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from node.discovery.client import cluster_view
from node.discovery.models import ClusterView, PeerState

# Every wait in the daemon tests is a hang guard, never a speed claim: what takes 0.1 s on an
# idle machine can take many times that on a loaded 2-core box (a fresh-clone CI run at load
# 12 saw a daemon take over 20 s to start serving). The tests assert order and outcome; how
# fast things happen is printed here and measured in the benchmarks. A guard only costs time
# when something really hangs, so it is set far above anything a slow machine needs.
PATIENCE_S = 60.0
READY_TIMEOUT_S = 120.0  # a daemon's start: imports MLX, binds, writes daemon.json
T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll ``predicate`` until it returns something truthy; return it, or fail after ``timeout``.

    Exceptions inside the predicate count as "not yet" (a daemon may be restarting), except
    ``AssertionError``, which fails at once. ``timeout`` is raised to ``PATIENCE_S``: every
    wait here is a hang guard (see above), so a caller's smaller figure is never a limit."""
    timeout = max(timeout, PATIENCE_S)
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except AssertionError:
            raise
        except Exception as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise TimeoutError(f"{what} not reached within {timeout:g} s{detail}")
        time.sleep(interval)


def wait_heartbeat_rounds(daemons: Sequence[DaemonProcess], rounds: int = 2) -> None:
    """Wait until each daemon has heard again from every peer it knows, ``rounds`` times over:
    an event to wait for before asserting that something did *not* happen."""
    for _ in range(rounds):
        since = {d.name: {n.id: n.last_seen_unix_ms for n in d.view().nodes[1:]} for d in daemons}

        def heard_again(since=since) -> bool:
            return all(
                n.last_seen_unix_ms > since[d.name].get(n.id, 0)
                for d in daemons
                for n in d.view().nodes[1:]
            )

        wait_for(heard_again, timeout=PATIENCE_S, what="a heartbeat round")


def macmesh_env(tmp_path: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a test daemon or CLI call: no user config, no stray MACMESH_* values."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACMESH_")}
    env["MACMESH_CONFIG"] = str(tmp_path / "no-config.toml")  # does not exist: defaults apply
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class DaemonProcess:
    name: str
    state_dir: Path
    log_path: Path
    args: list[str]
    proc: subprocess.Popen
    command_prefix: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    node_id: str = ""
    address: str = ""  # where a client on this machine (or in the same namespace) dials
    port: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def view(self, timeout: float = 3.0) -> ClusterView:
        """The cluster as this daemon sees it (``ClusterView`` RPC)."""
        if not self.command_prefix:
            return cluster_view(self.address, timeout_s=timeout)
        command = [sys.executable, "-m", "node.cli", "status", "--node", self.address]
        out = subprocess.run(
            [*self.command_prefix, *command, "--json", "--timeout", str(timeout)],
            capture_output=True,
            text=True,
            timeout=timeout + 30,
            env=self.env,
        )
        if out.returncode != 0:
            raise ConnectionError(f"status via {self.command_prefix} failed: {out.stderr.strip()}")
        return ClusterView.model_validate_json(out.stdout)

    def states(self, timeout: float = 3.0) -> dict[str, PeerState]:
        """node id -> state of every node this daemon knows (itself included)."""
        return {n.id: n.state for n in self.view(timeout).nodes}

    def sees_up(self, others: Sequence[DaemonProcess]) -> bool:
        states = self.states()
        return all(states.get(o.node_id) is PeerState.UP for o in others)

    def kill(self) -> None:
        """SIGKILL: no goodbye, peers must notice by silence."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM: clean shutdown with goodbyes; returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(
                f"daemon {self.name} ignored SIGTERM for {timeout} s:\n{self.log_text()}"
            ) from None


class DaemonCluster:
    """Starts daemons, remembers them, and stops every one of them on exit."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        cluster: str | None = None,
        interface: str | None = "127.0.0.1",
        command_prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.root = tmp_path
        self.cluster = cluster or f"t-{uuid.uuid4().hex[:12]}"
        self.interface = interface
        self.command_prefix = list(command_prefix)
        self.env = env or {}
        self.daemons: list[DaemonProcess] = []
        self._count = 0

    def __enter__(self) -> DaemonCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def spawn(
        self,
        name: str | None = None,
        *,
        peers: Sequence[str] = (),
        mdns: bool = True,
        cluster: str | None = None,
        interface: str | None = None,
        grpc_port: int = 0,
        state_dir: Path | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        command_prefix: Sequence[str] | None = None,
    ) -> DaemonProcess:
        """Start a daemon without waiting for it; call ``wait_ready`` (or use ``start``)."""
        self._count += 1
        name = name or f"node{self._count}"
        state_dir = state_dir or self.root / f"{name}-{self._count}"
        state_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "run",
            "--name",
            name,
            "--grpc-port",
            str(grpc_port),
            "--cluster",
            cluster or self.cluster,
            "--state-dir",
            str(state_dir),
            "--models-dir",
            str(self.root / "models"),
        ]
        interface = interface or self.interface
        if interface:
            args += ["--interface", interface]
        if not mdns:
            args.append("--no-mdns")
        for peer in peers:
            args += ["--peer", peer]
        args += list(extra_args)
        prefix = list(self.command_prefix if command_prefix is None else command_prefix)
        full_env = macmesh_env(self.root, {**self.env, **(env or {})})
        log_path = state_dir / f"daemon-{self._count}.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "node.cli", *args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
            )
        daemon = DaemonProcess(name, state_dir, log_path, args, proc, prefix, full_env)
        self.daemons.append(daemon)
        return daemon

    def wait_ready(self, daemon: DaemonProcess, timeout: float = READY_TIMEOUT_S) -> DaemonProcess:
        """Wait until the daemon serves (it writes ``daemon.json`` with its pid after binding)."""

        def ready() -> dict | None:
            if not daemon.alive():
                raise AssertionError(
                    f"daemon {daemon.name} exited with {daemon.proc.returncode}:\n"
                    + daemon.log_text()
                )
            try:
                data = json.loads((daemon.state_dir / "daemon.json").read_text())
            except (OSError, ValueError):
                return None
            return data if data.get("pid") == daemon.pid else None

        try:
            data = wait_for(ready, timeout, what=f"daemon {daemon.name} ready")
        except TimeoutError:
            raise AssertionError(
                f"daemon {daemon.name} not ready in {timeout} s:\n{daemon.log_text()}"
            ) from None
        daemon.node_id = data["node_id"]
        daemon.address = data["client_address"]
        daemon.port = data["port"]
        return daemon

    def start(self, name: str | None = None, **kwargs) -> DaemonProcess:
        """Start one daemon and wait until it serves. Keyword arguments as for ``spawn``."""
        return self.wait_ready(self.spawn(name, **kwargs))

    def start_many(self, count: int, **kwargs) -> list[DaemonProcess]:
        """Start ``count`` daemons in parallel (names node1..nodeN unless given)."""
        spawned = [self.spawn(**kwargs) for _ in range(count)]
        return [self.wait_ready(d) for d in spawned]

    def restart(self, daemon: DaemonProcess, **overrides) -> DaemonProcess:
        """Start a new process for the same node (same name and state dir, so the same id)."""
        if daemon.alive():
            daemon.terminate()
        options = _options_from_args(daemon.args)
        options.update(overrides)
        options.setdefault("command_prefix", daemon.command_prefix)
        return self.start(daemon.name, state_dir=daemon.state_dir, **options)

    def wait_connected(self, daemons: Sequence[DaemonProcess], timeout: float) -> float:
        """Wait until every daemon sees every other one ``up``; return the seconds it took."""
        start = time.monotonic()
        wait_for(
            lambda: all(d.sees_up([o for o in daemons if o is not d]) for d in daemons),
            timeout,
            interval=0.05,
            what=f"{len(daemons)} daemons seeing each other",
        )
        return time.monotonic() - start

    def stop_all(self) -> None:
        """SIGTERM everything still running, then SIGKILL what did not stop in 10 s."""
        for daemon in self.daemons:
            if daemon.alive():
                daemon.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for daemon in self.daemons:
            try:
                daemon.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait(timeout=10)


def _options_from_args(args: list[str]) -> dict:
    """Recover ``spawn`` options from a daemon's ``macmesh run`` arguments (for restarts)."""
    options: dict = {"peers": [], "mdns": True, "extra_args": []}
    i = 0
    while i < len(args):
        arg = args[i]
        value = args[i + 1] if i + 1 < len(args) else ""
        if arg in ("run",):
            i += 1
        elif arg == "--no-mdns":
            options["mdns"] = False
            i += 1
        elif arg == "--peer":
            options["peers"].append(value)
            i += 2
        elif arg == "--cluster":
            options["cluster"] = value
            i += 2
        elif arg == "--interface":
            options["interface"] = value
            i += 2
        elif arg in ("--name", "--state-dir", "--models-dir", "--grpc-port"):
            i += 2
        else:
            options["extra_args"].append(arg)
            i += 1
    return options
