"""Requests open no connection once a node has reached its peers: one pooled channel per peer.

With TLS on, every new gRPC channel is a new TCP connection and a TLS handshake (channels with
their own credentials share nothing), so a node that opened a channel per forwarded request
(or per instance lookup) paid one handshake per peer per request. Measured here from the
kernel's socket table of the relaying daemon while each request streams, on real daemons
with TLS and the cluster secret.
"""

from __future__ import annotations

import os

import psutil
from helpers.cluster_client import launch
from helpers.daemons import DaemonCluster, wait_for
from test_security import SECRET, _certificates, needs_openssl

from node import security
from node.client import MacmeshClient
from node.discovery.models import PeerState
from node.security import Security, TlsFiles

MODEL = "macmesh-tiny"
LONG = {"max_tokens": 3000, "ignore_eos": True}


def connections(pid: int, to_port: int) -> set[tuple[int, int]]:
    """The established TCP connections process ``pid`` holds to ``to_port``, as
    (local port, remote port): a new connection shows up as a new local port."""
    return {
        (c.laddr.port, c.raddr.port)
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == to_port and c.status == psutil.CONN_ESTABLISHED
    }


@needs_openssl
def test_forwarded_requests_open_no_new_connection_after_warm_up(tmp_path) -> None:
    tls = _certificates(tmp_path)
    args = ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-ca", str(tls.ca)]
    env = {"MACMESH_CLUSTER_SECRET": SECRET}
    before = security.current()
    security.configure(Security(SECRET.encode(), TlsFiles(ca=tls.ca)))
    try:
        with DaemonCluster(tmp_path) as cluster:
            a = cluster.start("a", mdns=False, extra_args=args, env=env)
            b = cluster.start("b", mdns=False, peers=[a.address], extra_args=args, env=env)
            wait_for(lambda: b.states().get(a.node_id) is PeerState.UP, 15, what="b sees a")
            _, instance = launch(a.address, MODEL)  # a coordinates it; b relays to a
            during: list[set[tuple[int, int]]] = []
            with MacmeshClient(b.address, timeout=60) as client:
                for _ in range(5):
                    with client.generate(instance.instance_id, "x", raw=True, **LONG) as stream:
                        assert next(stream).kind == "delta"  # relayed through b, streaming
                        during.append(connections(b.pid, a.port))
            assert during[0], "b holds no connection to a while relaying"
            assert all(seen == during[0] for seen in during[1:]), during
            # Control: the same measurement sees each new channel as a new connection (a
            # fresh client per call, from this process to b).
            fresh = []
            for _ in range(2):
                with MacmeshClient(b.address, timeout=60) as client:
                    client.check_health()
                    fresh.append(connections(os.getpid(), b.port))
            assert fresh[0] and fresh[1] and fresh[0] != fresh[1], fresh
    finally:
        security.configure(before)
