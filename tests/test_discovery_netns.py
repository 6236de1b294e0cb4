"""Three "hosts" as network namespaces on one bridge: discovery over real multicast.

Topology, all of it created by this test and deleted afterwards (even when it fails):

    ns <tag>-sw:  br0 (bridge) -- v1, v2, v3
    ns <tag>-n1:  eth0 10.231.0.11/24  (veth peer of v1)      daemon --interface 10.231.0.11
    ns <tag>-n2:  eth0 10.231.0.12/24  (veth peer of v2)      daemon --interface 10.231.0.12
    ns <tag>-n3:  eth0 10.231.0.13/24  (veth peer of v3)      daemon --interface 10.231.0.13

The subnet exists only inside these namespaces and nothing is added to the host's namespace, so
no packet can leave the machine. The daemons get no static peers: they can only meet through
mDNS multicast across the bridge.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.daemons import DaemonCluster

pytestmark = pytest.mark.netns

SUBNET = "10.231.0"
NODES = 3


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces (run the suite as root to include it)"
    if shutil.which("ip") is None:
        return "needs the `ip` command (apt-get install -y iproute2)"
    probe = f"mmprobe{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"network namespaces unavailable here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    reason = _unavailable_reason()
    if reason:
        pytest.skip(reason)
    tag = f"mm{uuid.uuid4().hex[:6]}"
    switch = f"{tag}-sw"
    nodes = [f"{tag}-n{i}" for i in range(1, NODES + 1)]
    created: list[str] = []
    try:
        _ip("netns", "add", switch)
        created.append(switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for i, ns in enumerate(nodes, start=1):
            _ip("netns", "add", ns)
            created.append(ns)
            # Created inside the switch namespace, the peer end moved straight into the node's.
            _ip(
                "-n",
                switch,
                "link",
                "add",
                f"v{i}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            _ip("-n", switch, "link", "set", f"v{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{10 + i}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield nodes
    finally:
        for ns in reversed(created):
            _ip("netns", "del", ns, check=False)
        leftover = _ip("netns", "list", check=False).stdout
        assert tag not in leftover, f"namespaces left behind: {leftover}"


# Runs inside node 1's namespace: polls every daemon until each sees all three up ("up"), and
# until each has also heard every peer's own multicast advert ("mdns"); prints both times.
_PROBE = """
import json, sys, time
from node.discovery.client import cluster_view
addresses = sys.argv[1:]
start = time.monotonic()
times, views = {}, {}
while time.monotonic() - start < 15 and len(times) < 2:
    try:
        views = {a: cluster_view(a, timeout_s=2).model_dump(mode="json") for a in addresses}
    except Exception as exc:
        views = {"error": str(exc)}
    nodes = [n for v in views.values() for n in v.get("nodes", [])]
    if len(nodes) == len(addresses) ** 2:
        if all(n["state"] == "up" for n in nodes):
            times.setdefault("up", time.monotonic() - start)
            if all("mdns" in n["sources"] for n in nodes if not n["local"]):
                times.setdefault("mdns", time.monotonic() - start)
    time.sleep(0.1)
print(json.dumps({"times": times, "views": views}))
"""


def test_three_hosts_discover_each_other_over_multicast(
    namespaces: list[str], tmp_path: Path
) -> None:
    with DaemonCluster(tmp_path, interface=None) as cluster:
        daemons = [
            cluster.spawn(
                f"host{i}",
                interface=f"{SUBNET}.{10 + i}",
                command_prefix=["ip", "netns", "exec", ns],
            )
            for i, ns in enumerate(namespaces, start=1)
        ]
        for d in daemons:
            cluster.wait_ready(d)
        addresses = [d.address for d in daemons]
        assert addresses == [f"{SUBNET}.{10 + i}:{d.port}" for i, d in enumerate(daemons, 1)]

        out = subprocess.run(
            ["ip", "netns", "exec", namespaces[0], sys.executable, "-c", _PROBE, *addresses],
            capture_output=True,
            text=True,
            timeout=60,
            env=daemons[0].env,
        )
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        times = result["times"]
        print(
            f"\nnamespaced hosts: all up after {times.get('up')} s, all adverts heard after "
            f"{times.get('mdns')} s (from the first probe)"
        )
        assert "up" in times and "mdns" in times, result
        ids = {d.node_id for d in daemons}
        for view in result["views"].values():
            assert {n["id"] for n in view["nodes"]} == ids, view
            assert {n["state"] for n in view["nodes"]} == {"up"}, view
            for node in view["nodes"]:
                assert node["address"].startswith(f"{SUBNET}."), node
                # No static peers: each peer's advert crossed the bridge by multicast.
                assert node["local"] or "mdns" in node["sources"], node
        for d in daemons:
            assert f"addresses=['{d.address.split(':')[0]}']" in d.log_text()
