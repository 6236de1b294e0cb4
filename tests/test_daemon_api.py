"""The Daemon as a library: extra services, peer events, and refusal of bad starts and bad
requests. Real gRPC servers in this process, mDNS off (the process tests cover mDNS)."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from node.config import load_settings
from node.daemon import Daemon, DaemonError, read_daemon_file
from node.discovery import PROTOCOL_VERSION
from node.discovery.client import DaemonUnreachable, cluster_nodes, get_info
from node.discovery.models import PeerState
from node.discovery.peers import EventKind, PeerEvent
from node.discovery.resources import ResourceMonitor
from node.proto.macmesh.v1 import node_pb2, node_pb2_grpc

MONITOR = ResourceMonitor(measure_bandwidth=False)


def _settings(tmp_path: Path, name: str, cluster: str, **flags):
    values = {
        "name": name,
        "cluster": cluster,
        "grpc_port": 0,
        "interface": "127.0.0.1",
        "mdns": False,
        "state_dir": tmp_path / name,
        "models_dir": tmp_path / "models",
    }
    return load_settings(**{**values, **flags})


@pytest.fixture
def cluster() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop(grace_s=0.2)


def _wait(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def _echo_service(server: grpc.Server) -> None:
    def ping(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"pong:" + request

    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(ping)}
    )
    server.add_generic_rpc_handlers((handler,))


def test_extra_services_share_the_daemon_server(tmp_path: Path, cluster: str, daemons) -> None:
    daemon = Daemon(_settings(tmp_path, "a", cluster), resources=MONITOR)
    daemon.add_service("test.Echo", _echo_service)
    with pytest.raises(ValueError, match="already registered"):
        daemon.add_service("test.Echo", _echo_service)
    daemon.start()
    daemons.append(daemon)
    with pytest.raises(RuntimeError, match="before"):
        daemon.add_service("test.Late", _echo_service)

    with grpc.insecure_channel(daemon.address) as channel:
        ping = channel.unary_unary("/test.Echo/Ping")
        assert ping(b"hi", timeout=5) == b"pong:hi"
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("test.Echo", "macmesh.v1.NodeService", ""):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    info = get_info(daemon.address)
    assert (info.name, info.cluster, info.node_id) == ("a", cluster, daemon.node_id)
    assert read_daemon_file(tmp_path / "a")["address"] == daemon.address


def test_static_peers_produce_peer_events_and_goodbye(
    tmp_path: Path, cluster: str, daemons
) -> None:
    a = Daemon(_settings(tmp_path, "a", cluster), resources=MONITOR)
    events: list[PeerEvent] = []
    a.subscribe(events.append)
    a.start()
    daemons.append(a)
    b = Daemon(_settings(tmp_path, "b", cluster, peers=[a.address]), resources=MONITOR)
    b.start()
    daemons.append(b)

    _wait(lambda: any(e.kind is EventKind.UP and e.node_id == b.node_id for e in events))
    nodes = cluster_nodes(a.address)
    assert [n.id for n in nodes] == [a.node_id, b.node_id]
    assert nodes[0].local and not nodes[1].local
    assert all(n.available_memory_bytes > 0 and n.chip for n in nodes)
    assert "inbound" in nodes[1].sources  # a learned b from b's heartbeat
    assert a.address_of(b.node_id) == b.address and a.address_of(a.node_id) == a.address
    assert a.address_of("unknown") is None

    b.stop()
    assert any(e.kind is EventKind.LEFT and e.node_id == b.node_id for e in events)
    assert a.peer_table.state_of(b.node_id) is None
    assert [n.id for n in a.live_nodes()] == [a.node_id]


def test_bad_starts_are_refused_with_the_value_named(tmp_path: Path, cluster: str, daemons) -> None:
    a = Daemon(_settings(tmp_path, "a", cluster), resources=MONITOR)
    a.start()
    daemons.append(a)

    same_port = Daemon(
        load_settings(
            name="b",
            cluster=cluster,
            grpc_port=a.port,
            interface="127.0.0.1",
            mdns=False,
            state_dir=tmp_path / "b",
        ),
        resources=MONITOR,
    )
    with pytest.raises(DaemonError, match=f"127.0.0.1:{a.port}"):
        same_port.start()

    same_state = Daemon(_settings(tmp_path, "a", cluster), resources=MONITOR)
    with pytest.raises(DaemonError, match="in use by another macmesh daemon"):
        same_state.start()

    bad_interface = Daemon(
        _settings(tmp_path, "c", cluster, interface="no-such-nic0"), resources=MONITOR
    )
    with pytest.raises(DaemonError, match="no-such-nic0"):
        bad_interface.start()

    # The refused starts left nothing behind: the state dirs can be used again.
    retry = Daemon(_settings(tmp_path, "b", cluster), resources=MONITOR)
    retry.start()
    daemons.append(retry)


def test_interface_binds_one_address_only(tmp_path: Path, cluster: str, daemons) -> None:
    a = Daemon(_settings(tmp_path, "a", cluster), resources=MONITOR)
    a.start()
    daemons.append(a)
    with socket.create_connection(("127.0.0.1", a.port), timeout=2):
        pass
    with pytest.raises(OSError):  # 127.0.0.2 is loopback too, but not the bound address
        socket.create_connection(("127.0.0.2", a.port), timeout=2)


def test_hostile_requests_are_refused_and_the_daemon_keeps_serving(
    tmp_path: Path, cluster: str, daemons
) -> None:
    a = Daemon(_settings(tmp_path, "a", cluster), resources=MONITOR)
    a.start()
    daemons.append(a)

    def sender(**overrides) -> node_pb2.NodeInfo:
        fields = dict(
            node_id="f" * 32,
            name="x",
            cluster=cluster,
            protocol_version=PROTOCOL_VERSION,
            grpc_address="127.0.0.1:1",
            incarnation="i",
        )
        fields.update(overrides)
        return node_pb2.NodeInfo(**fields)

    with grpc.insecure_channel(a.address) as channel:
        stub = node_pb2_grpc.NodeServiceStub(channel)
        cases = [
            (node_pb2.NodeInfo(), grpc.StatusCode.INVALID_ARGUMENT, "node_id"),
            (sender(node_id="bad id!"), grpc.StatusCode.INVALID_ARGUMENT, "node id"),
            (sender(cluster="other"), grpc.StatusCode.FAILED_PRECONDITION, "cluster"),
            (sender(protocol_version=99), grpc.StatusCode.FAILED_PRECONDITION, "protocol"),
            (sender(grpc_address="nonsense"), grpc.StatusCode.INVALID_ARGUMENT, "nonsense"),
            (sender(node_id=a.node_id), grpc.StatusCode.FAILED_PRECONDITION, "own id"),
        ]
        for info, code, text in cases:
            with pytest.raises(grpc.RpcError) as err:
                stub.Heartbeat(node_pb2.HeartbeatRequest(sender=info), timeout=5)
            assert err.value.code() is code, err.value.details()
            assert text in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Goodbye(node_pb2.GoodbyeRequest(node_id="x", cluster="other"), timeout=5)
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION

        # Gossip pointing nowhere is bounded and harmless.
        refs = [
            node_pb2.PeerRef(node_id=f"g{i}", grpc_address=f"127.0.0.1:{i + 1}")
            for i in range(1000)
        ]
        stub.Heartbeat(node_pb2.HeartbeatRequest(sender=sender(), known_peers=refs), timeout=5)
        assert len(a.membership.target_addresses()) <= 257  # the cap, plus the sender

    view = a.cluster_view()
    assert [n.id for n in view.nodes] == [a.node_id, "f" * 32]  # only the well-formed sender
    assert view.nodes[1].state is PeerState.UP
    assert get_info(a.address).node_id == a.node_id


def test_client_names_the_address_when_no_daemon_answers() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DaemonUnreachable, match=f"127.0.0.1:{port}"):
        cluster_nodes(f"127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(ValueError, match="not HOST:PORT"):
        cluster_nodes("nonsense")
