"""Nodes that host the pipeline StageService, as separate processes on 127.0.0.1.

Real ``macmesh run`` daemons (via ``helpers.daemons``) when the daemon hosts the StageService;
otherwise standalone stage servers (``python -m node.inference.stage``), which serve the very
same servicer without discovery. Either way every node is its own process.

    with StageNodes(tmp_path, count=2) as nodes:
        nodes.addresses        # {"node1": "127.0.0.1:PORT", ...}
        nodes.kind             # "daemon" or "stage-server"
        nodes[0].kill()
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from helpers.daemons import DaemonCluster, macmesh_env, wait_for

from node import rpc
from node.proto.macmesh.v1 import stage_pb2 as pb
from node.proto.macmesh.v1 import stage_pb2_grpc as pb_grpc

READY_TIMEOUT_S = 30.0
# Whether `macmesh run` daemons host the StageService; found out once per test session.
_daemons_serve_stages: bool | None = None


def serves_stages(address: str, timeout: float = 5.0) -> bool:
    """Whether the gRPC server at ``address`` implements StageService."""
    with rpc.channel(address) as channel:
        try:
            pb_grpc.StageServiceStub(channel).Status(pb.StageStatusRequest(), timeout=timeout)
            return True
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return False
            raise


@dataclass
class StageNode:
    name: str
    address: str
    proc: subprocess.Popen | None  # None when a DaemonCluster owns the process
    log_path: Path
    _daemon: object | None = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        if self._daemon is not None:
            self._daemon.kill()  # type: ignore[attr-defined]
        elif self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class StageNodes:
    def __init__(self, root: Path, count: int, *, prefer_daemons: bool = True) -> None:
        self.root = root
        self.count = count
        self.prefer_daemons = prefer_daemons
        self.nodes: list[StageNode] = []
        self.kind = ""
        self._cluster: DaemonCluster | None = None

    def __enter__(self) -> StageNodes:
        try:
            if self.prefer_daemons and self._start_daemons():
                self.kind = "daemon"
            else:
                self._start_stage_servers()
                self.kind = "stage-server"
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cluster is not None:
            self._cluster.stop_all()
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.proc.kill()

    def __getitem__(self, index: int) -> StageNode:
        return self.nodes[index]

    @property
    def addresses(self) -> dict[str, str]:
        return {node.name: node.address for node in self.nodes}

    def _start_daemons(self) -> bool:
        global _daemons_serve_stages
        if _daemons_serve_stages is False:
            return False
        cluster = DaemonCluster(self.root / "daemons")
        self._cluster = cluster
        first = cluster.start(mdns=False)
        _daemons_serve_stages = serves_stages(first.address)
        if not _daemons_serve_stages:
            cluster.stop_all()
            self._cluster = None
            return False
        daemons = [first, *cluster.start_many(self.count - 1, mdns=False)]
        self.nodes = [StageNode(d.name, d.address, None, d.log_path, _daemon=d) for d in daemons]
        return True

    def _start_stage_servers(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        pending = []
        for i in range(1, self.count + 1):
            port_file = self.root / f"stage{i}.port"
            log_path = self.root / f"stage{i}.log"
            port_file.unlink(missing_ok=True)
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "node.inference.stage",
                        "--port",
                        "0",
                        "--port-file",
                        str(port_file),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=macmesh_env(self.root),
                )
            pending.append((f"stage{i}", proc, port_file, log_path))
        for name, proc, port_file, log_path in pending:
            node = StageNode(name, "", proc, log_path)
            self.nodes.append(node)

            def ready(proc=proc, port_file=port_file, node=node) -> bool:
                if proc.poll() is not None:
                    raise AssertionError(
                        f"{node.name} exited {proc.returncode}:\n{node.log_text()}"
                    )
                return port_file.exists()

            wait_for(ready, READY_TIMEOUT_S, what=f"{name} serving")
            node.address = f"127.0.0.1:{port_file.read_text().strip()}"
        started = time.monotonic()
        for node in self.nodes:
            wait_for(
                lambda node=node: serves_stages(node.address, timeout=2),
                READY_TIMEOUT_S - (time.monotonic() - started),
                what=f"{node.name} StageService",
            )
