"""The node daemon: one process, one gRPC server, membership, and whatever services others add.

Usage (what ``macmesh run`` does)::

    daemon = Daemon(load_settings(...))
    daemon.add_servicer(stage_pb2_grpc.add_StageServiceServicer_to_server, StageServicer(daemon),
                        "macmesh.v1.StageService")       # any number, before start()
    daemon.on_stop(lambda d: engine.shutdown())          # optional cleanup hooks
    daemon.start()                                       # serving, heartbeating, advertising
    daemon.cluster_view() / daemon.live_nodes() / daemon.subscribe(listener)
    daemon.stop()                                        # goodbyes, then the server stops

Every service shares the server (and its port, health checks and reflection). Nothing here imports
MLX: a daemon starts in well under a second and services load models lazily.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health

from node import security
from node.config import Settings
from node.discovery.identity import StateDirInUse, StateDirLock, load_or_create_node_id
from node.discovery.mdns import (
    MdnsDiscovery,
    advertised_addresses,
    local_networks,
    resolve_interface,
)
from node.discovery.membership import LocalNode, Membership, PeerListener
from node.discovery.models import ClusterNode, ClusterView
from node.discovery.peers import Liveness, PeerTable
from node.discovery.resources import ResourceMonitor
from node.discovery.service import SERVICE_NAME as NODE_SERVICE_NAME
from node.discovery.service import NodeServicer
from node.discovery.static import PeerAddress, format_address, parse_peers
from node.logging import get_logger
from node.proto.macmesh.v1 import node_pb2_grpc
from node.rpc import add_port, enable_reflection, make_server, mark_serving
from node.security import Security, SecurityError

log = get_logger(__name__)

DAEMON_FILE = "daemon.json"  # in the state dir while the daemon runs: pid, id, address
GRPC_WORKERS = 64


class DaemonError(RuntimeError):
    """The daemon cannot start; the message says why and names the offending value."""


@dataclass(frozen=True)
class ServiceRegistration:
    name: str  # full gRPC service name, for health checks and reflection
    add_to_server: Callable[[grpc.Server], None]


Hook = Callable[["Daemon"], None]


def _make_server(
    sec: Security | None = None,
    max_message_bytes: int | None = None,
    extra: list[grpc.ServerInterceptor] | None = None,
) -> tuple[grpc.Server, health.HealthServicer]:
    interceptors = [*(sec.server_interceptors() if sec else []), *(extra or [])]
    return make_server(
        max_workers=GRPC_WORKERS,
        interceptors=interceptors or None,
        max_message_bytes=max_message_bytes,
    )


def _bind(server: grpc.Server, host: str, port: int, sec: Security | None = None) -> int:
    try:
        bound = add_port(server, format_address(host, port), sec or security.current())
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise DaemonError(
            f"cannot listen on {format_address(host, port)}: port in use or address not local"
        )
    return bound


def _security_from(settings: Settings) -> Security:
    # "is not None": a secret set to "" is refused as too short, never taken for "no secret".
    secret = (
        settings.cluster_secret.get_secret_value() if settings.cluster_secret is not None else None
    )
    return security.from_values(
        secret=secret,
        secret_file=settings.cluster_secret_file,
        tls_cert=settings.tls_cert,
        tls_key=settings.tls_key,
        tls_ca=settings.tls_ca,
    )


def read_daemon_file(state_dir: Path) -> dict[str, Any] | None:
    """What a running daemon wrote about itself in ``state_dir`` (None if there is none)."""
    try:
        return json.loads((state_dir / DAEMON_FILE).read_text())
    except (OSError, ValueError):
        return None


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        liveness: Liveness | None = None,
        resources: ResourceMonitor | None = None,
    ) -> None:
        self.settings = settings
        self.liveness = liveness or Liveness()
        self._resources = resources
        self._services: list[ServiceRegistration] = []
        self._start_hooks: list[Hook] = []
        self._stop_hooks: list[Hook] = []
        self._listeners: list[PeerListener] = []
        self._lock = StateDirLock(settings.state_dir)
        self._server: grpc.Server | None = None
        self._health: health.HealthServicer | None = None
        self._mdns: MdnsDiscovery | None = None
        self._membership: Membership | None = None
        self._stopped = threading.Event()
        self._started = False
        self.port = 0
        self.bind_address = ""  # what the server listens on, e.g. "[::]:52700"
        self.interface: str | None = None
        self.security = Security()
        self.metrics_port: int | None = None  # set by node.metrics.install
        self._interceptors: list[grpc.ServerInterceptor] = []

    # -- extension points (call before start) ------------------------------------------------

    def add_service(self, name: str, add_to_server: Callable[[grpc.Server], None]) -> None:
        """Register a gRPC service on the daemon's server: ``add_to_server(server)`` is called
        once during ``start()``; ``name`` (e.g. ``macmesh.v1.StageService``) is marked serving in
        the health service and listed by reflection."""
        if self._started:
            raise RuntimeError("add services before Daemon.start()")
        if any(s.name == name for s in self._services) or name == NODE_SERVICE_NAME:
            raise ValueError(f"service {name!r} is already registered")
        self._services.append(ServiceRegistration(name, add_to_server))

    def add_servicer(
        self, add_fn: Callable[[Any, grpc.Server], None], servicer: object, name: str
    ) -> None:
        """Shorthand for generated code: ``add_servicer(x_pb2_grpc.add_XServicer_to_server,
        XServicer(...), "macmesh.v1.X")``."""
        self.add_service(name, lambda server: add_fn(servicer, server))

    def add_interceptor(self, interceptor: grpc.ServerInterceptor) -> None:
        """Wrap every call on the server (after the cluster-secret check); before start."""
        if self._started:
            raise RuntimeError("add interceptors before Daemon.start()")
        self._interceptors.append(interceptor)

    def on_start(self, hook: Hook) -> None:
        """Run ``hook(daemon)`` after the server serves and membership runs."""
        self._start_hooks.append(hook)

    def on_stop(self, hook: Hook) -> None:
        """Run ``hook(daemon)`` first thing in ``stop()``, while peers and the server still work."""
        self._stop_hooks.append(hook)

    def subscribe(self, listener: PeerListener) -> None:
        """Peer events (``node.discovery.peers.PeerEvent``: up, suspect, down, left, ...)."""
        if self._membership is not None:
            self._membership.subscribe(listener)
        else:
            self._listeners.append(listener)

    # -- state ------------------------------------------------------------------------------

    @property
    def membership(self) -> Membership:
        if self._membership is None:
            raise RuntimeError("the daemon has not started")
        return self._membership

    @property
    def node_id(self) -> str:
        return self.membership.local.node_id

    @property
    def address(self) -> str:
        """``host:port`` peers and clients dial."""
        return self.membership.local.grpc_address

    @property
    def peer_table(self) -> PeerTable:
        return self.membership.table

    def cluster_view(self) -> ClusterView:
        return self.membership.cluster_view()

    def live_nodes(self) -> list[ClusterNode]:
        """Up nodes, this one first: what the planner places a model on."""
        return self.cluster_view().live()

    def address_of(self, node_id: str) -> str | None:
        """The gRPC address to dial ``node_id`` at (this node included), None if unknown."""
        if node_id == self.node_id:
            return self.address
        for view in self.peer_table.snapshot():
            if view.info.node_id == node_id:
                return view.address
        return None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Serve, heartbeat, advertise. ``DaemonError`` (naming the bad value) if it cannot;
        a failed start leaves nothing behind (port, lock, threads)."""
        if self._started:
            raise RuntimeError("the daemon is already started")
        self._started = True
        try:
            try:
                self.interface = (
                    resolve_interface(self.settings.interface) if self.settings.interface else None
                )
                static_peers = parse_peers(self.settings.peers)
                self.security = _security_from(self.settings)
            except (ValueError, SecurityError) as exc:
                raise DaemonError(str(exc)) from None
            try:
                self._lock.acquire()
            except StateDirInUse as exc:
                raise DaemonError(str(exc)) from None
            self._start(static_peers)
        except BaseException:
            self._abort_start()
            raise

    def _start(self, static_peers: list[PeerAddress]) -> None:
        s = self.settings
        node_id = load_or_create_node_id(s.state_dir)
        security.set_local_node(node_id)  # stages learn which node coordinates their shard
        monitor = self._resources or ResourceMonitor()
        # Every channel this process opens (peers, stages, relays) signs with the same secret.
        security.configure(self.security)
        security.warn_if_open(self.security)
        sec = self.security
        server, self._health = _make_server(sec, s.max_message_bytes, self._interceptors)
        self._server = server
        if self.interface:
            self.port = _bind(server, self.interface, s.grpc_port, sec)
            self.bind_address = format_address(self.interface, self.port)
        else:
            try:
                self.port = _bind(server, "::", s.grpc_port, sec)
                self.bind_address = format_address("::", self.port)
            except DaemonError:  # no IPv6 on this host
                self.port = _bind(server, "0.0.0.0", s.grpc_port, sec)
                self.bind_address = format_address("0.0.0.0", self.port)
        advertise_host = self.interface or advertised_addresses(None)[0]
        local = LocalNode.create(
            node_id, s.name, s.cluster, format_address(advertise_host, self.port)
        )
        membership = Membership(
            local,
            monitor.snapshot,
            liveness=self.liveness,
            static_peers=static_peers,
            local_networks=local_networks(self.interface),
        )
        for listener in self._listeners:
            membership.subscribe(listener)
        self._membership = membership
        node_pb2_grpc.add_NodeServiceServicer_to_server(NodeServicer(membership), server)
        for service in self._services:
            service.add_to_server(server)
        names = [NODE_SERVICE_NAME, *(svc.name for svc in self._services)]
        enable_reflection(server, names)
        server.start()
        mark_serving(self._health, names)
        membership.start()
        if s.mdns:
            self._mdns = MdnsDiscovery(
                local_id=node_id,
                cluster=s.cluster,
                interface=self.interface,
                on_advert=membership.on_advert,
                on_removed=membership.on_advert_removed,
            )
            try:
                self._mdns.start(membership.local_info(), self.port)
            except Exception as exc:
                where = self.interface or "all interfaces"
                raise DaemonError(
                    f"mDNS cannot start on {where} ({exc}); run with --no-mdns and --peer HOST:PORT"
                ) from None
        self._write_daemon_file()
        log.info(
            "node started",
            name=s.name,
            node_id=node_id,
            cluster=s.cluster,
            address=self.address,
            mdns=s.mdns,
            static_peers=[str(p) for p in static_peers],
        )
        for hook in self._start_hooks:
            hook(self)

    def stop(self, grace_s: float = 2.0) -> None:
        """Clean shutdown: stop hooks, goodbyes (gRPC and mDNS), then the server. Idempotent."""
        if self._stopped.is_set() or not self._started:
            return
        for hook in self._stop_hooks:
            try:
                hook(self)
            except Exception:
                log.exception("stop hook failed")
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        if self._membership is not None:
            self._membership.leave()
        if self._mdns is not None:
            with contextlib.suppress(Exception):
                self._mdns.close()
        if self._server is not None:
            self._server.stop(grace_s).wait()
        self._remove_daemon_file()
        self._lock.release()
        self._stopped.set()
        log.info("node stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until ``stop()`` finished; True if it did."""
        return self._stopped.wait(timeout)

    def _abort_start(self) -> None:
        if self._membership is not None:
            self._membership.leave(timeout_s=0.2)
        if self._mdns is not None:
            with contextlib.suppress(Exception):
                self._mdns.close()
        if self._server is not None:
            self._server.stop(0)
        self._lock.release()
        self._stopped.set()  # stop() after a failed start has nothing left to do

    def _write_daemon_file(self) -> None:
        data = {
            "pid": os.getpid(),
            "node_id": self.node_id,
            "name": self.settings.name,
            "cluster": self.settings.cluster,
            "address": self.address,
            "port": self.port,
            "client_address": self.client_address(),
            "metrics_port": self.metrics_port,
        }
        path = self.settings.state_dir / DAEMON_FILE
        tmp = path.with_name(f".{DAEMON_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)

    def _remove_daemon_file(self) -> None:
        data = read_daemon_file(self.settings.state_dir)
        if data is not None and data.get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                (self.settings.state_dir / DAEMON_FILE).unlink()

    def client_address(self) -> str:
        """An address a client on this machine can dial (loopback unless bound elsewhere)."""
        if self.interface and not ipaddress.ip_address(self.interface).is_unspecified:
            return format_address(self.interface, self.port)
        return format_address("127.0.0.1", self.port)
