"""Pure parts of discovery: liveness state machine, targets, addresses, TXT records, resource
parsers (on captured macOS and Linux outputs), identity, and wire conversion."""

from __future__ import annotations

import ipaddress
import sys
import threading
import time
from pathlib import Path

import pytest

from node.discovery import PROTOCOL_VERSION
from node.discovery.identity import StateDirInUse, StateDirLock, load_or_create_node_id
from node.discovery.mdns import (
    AdvertError,
    build_txt,
    instance_name,
    local_networks,
    parse_advert,
)
from node.discovery.models import (
    NodeInfo,
    PeerState,
    Resources,
    info_from_proto,
    info_to_proto,
)
from node.discovery.once import Once
from node.discovery.peers import EventKind, Liveness, PeerTable
from node.discovery.resources import (
    ResourceMonitor,
    apple_bandwidth_gbps,
    gather_resources,
    mlx_device_for,
    parse_cgroup_memory,
    parse_cpuinfo,
    parse_meminfo,
    parse_sysctl,
    parse_vm_stat,
)
from node.discovery.static import PeerAddress, format_address, parse_peer, parse_peers
from node.discovery.targets import MAX_TRANSIENT_TARGETS, TargetSet
from node.proto.macmesh.v1 import node_pb2

# ---------------------------------------------------------------- captured command outputs

SYSCTL_M2_ULTRA = """hw.memsize: 206158430208
machdep.cpu.brand_string: Apple M2 Ultra
hw.ncpu: 24
"""

SYSCTL_INTEL = """hw.memsize: 17179869184
machdep.cpu.brand_string: Intel(R) Core(TM) i7-9750H CPU @ 2.60GHz
hw.ncpu: 12
"""

VM_STAT_APPLE_SILICON = """Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                                3165.
Pages active:                            436789.
Pages inactive:                          421011.
Pages speculative:                        12345.
Pages throttled:                              0.
Pages wired down:                        134562.
Pages purgeable:                          23456.
"Translation faults":                 987654321.
Pages copy-on-write:                   12345678.
Pages zero filled:                    456789012.
Pages reactivated:                      1234567.
Pages purged:                            345678.
File-backed pages:                       310000.
Anonymous pages:                         560145.
Pages stored in compressor:              234567.
Pages occupied by compressor:             78901.
Decompressions:                          345678.
Compressions:                            456789.
Pageins:                                3456789.
Pageouts:                                 12345.
Swapins:                                      0.
Swapouts:                                     0.
"""

VM_STAT_INTEL_OLD = """Mach Virtual Memory Statistics: (page size of 4096 bytes)
Pages free: 90518.
Pages active: 205479.
Pages inactive: 32417.
Pages speculative: 134461.
Pages wired down: 61009.
"Translation faults": 26323651.
Pages copy-on-write: 177180.
Pages zero filled: 15230394.
Pages reactivated: 3.
Pageins: 388108.
Pageouts: 0.
Object cache: 14 hits of 797355 lookups (0% hit rate)
"""

MEMINFO = """MemTotal:       24568888 kB
MemFree:         1234567 kB
MemAvailable:   20123456 kB
Buffers:          123456 kB
Cached:          9876543 kB
SwapCached:            0 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""

MEMINFO_OLD_KERNEL = """MemTotal:        2048000 kB
MemFree:          500000 kB
Buffers:          100000 kB
Cached:           400000 kB
"""

CPUINFO_X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9R14 96-Core Processor
stepping\t: 1
"""

CPUINFO_PI = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU part\t: 0xd08

Hardware\t: BCM2835
Revision\t: c03114
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""

CPUINFO_GRAVITON = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics
CPU implementer\t: 0x41
CPU part\t: 0xd0c
"""


# ---------------------------------------------------------------- resources


def test_sysctl_and_vm_stat_of_an_apple_silicon_mac() -> None:
    values = parse_sysctl(SYSCTL_M2_ULTRA)
    assert int(values["hw.memsize"]) == 192 * 1024**3
    assert values["machdep.cpu.brand_string"] == "Apple M2 Ultra"
    assert apple_bandwidth_gbps(values["machdep.cpu.brand_string"], 24) == 800.0
    assert parse_vm_stat(VM_STAT_APPLE_SILICON) == (3165 + 421011 + 12345) * 16384


def test_vm_stat_of_an_old_intel_mac_uses_its_page_size() -> None:
    assert parse_vm_stat(VM_STAT_INTEL_OLD) == (90518 + 32417 + 134461) * 4096
    assert apple_bandwidth_gbps(parse_sysctl(SYSCTL_INTEL)["machdep.cpu.brand_string"], 12) == 0


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("Pages free: 1.\n", "page size"),
        ("Mach (page size of 4096 bytes)\nPages free: 1.\n", "inactive"),
    ],
)
def test_vm_stat_garbage_is_named(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_vm_stat(text)


def test_apple_bandwidth_tells_chip_tiers_and_binned_parts_apart() -> None:
    assert apple_bandwidth_gbps("Apple M2", 8) == 100.0
    assert apple_bandwidth_gbps("Apple M2 Max", 12) == 400.0
    assert apple_bandwidth_gbps("Apple M3 Max", 14) == 300.0
    assert apple_bandwidth_gbps("Apple M3 Max", 16) == 400.0
    assert apple_bandwidth_gbps("Apple M4 Max", 16) == 546.0
    assert apple_bandwidth_gbps("Apple M3 Ultra", 32) == 819.0
    assert apple_bandwidth_gbps("Apple M9 Hyper", 64) == 0.0


def test_meminfo_and_cpuinfo_of_linux_machines() -> None:
    assert parse_meminfo(MEMINFO) == (24568888 * 1024, 20123456 * 1024)
    assert parse_meminfo(MEMINFO_OLD_KERNEL) == (2048000 * 1024, 1000000 * 1024)
    assert parse_cpuinfo(CPUINFO_X86) == "AMD EPYC 9R14 96-Core Processor"
    assert parse_cpuinfo(CPUINFO_PI) == "Raspberry Pi 4 Model B Rev 1.4"
    assert parse_cpuinfo(CPUINFO_GRAVITON) == ""  # caller falls back to the platform name
    with pytest.raises(ValueError, match="MemTotal"):
        parse_meminfo("MemFree: 1 kB\n")


def test_cgroup_limits_clamp_memory() -> None:
    assert parse_cgroup_memory("max\n", "123") is None
    assert parse_cgroup_memory("1073741824\n", "268435456\n") == (1073741824, 805306368)
    assert parse_cgroup_memory("100", "500") == (100, 0)


def test_mlx_device_follows_the_platform() -> None:
    assert mlx_device_for("Darwin", "arm64") == "gpu"
    assert mlx_device_for("Darwin", "x86_64") == "cpu"
    assert mlx_device_for("Linux", "x86_64") == "cpu"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_linux_resources_are_read_from_this_machine() -> None:
    meminfo_total, _ = parse_meminfo(Path("/proc/meminfo").read_text())
    r = gather_resources()
    assert 0 < r.memory_available_bytes <= r.memory_total_bytes <= meminfo_total
    assert r.chip and r.os.startswith("Linux ")
    assert r.mlx_device == "cpu"
    assert r.cpu_count >= 1
    assert r.memory_bandwidth_gbps > 0.1  # measured, so only a sanity bound


def test_resource_monitor_refreshes_available_memory_and_survives_a_failing_probe() -> None:
    monitor = ResourceMonitor(refresh_s=0.0, measure_bandwidth=False)
    real = monitor.snapshot()
    readings = iter([5_000, 4_000])

    def probe() -> int:
        value = next(readings, None)
        if value is None:
            raise OSError("vm_stat vanished")
        return value

    monitor._available_probe = probe
    seen = [monitor.snapshot() for _ in range(3)]
    assert [r.memory_available_bytes for r in seen] == [5_000, 4_000, 4_000]
    assert {(r.memory_total_bytes, r.chip) for r in seen} == {(real.memory_total_bytes, real.chip)}

    cached = ResourceMonitor(refresh_s=3600, measure_bandwidth=False)
    first = cached.snapshot()
    cached._available_probe = lambda: 1
    assert cached.snapshot() is first


def test_bandwidth_is_measured_in_the_background() -> None:
    monitor = ResourceMonitor(refresh_s=0.0)
    wait_s = 0.0
    while not monitor.snapshot().memory_bandwidth_gbps and wait_s < 20:
        time.sleep(0.05)
        wait_s += 0.05
    assert monitor.snapshot().memory_bandwidth_gbps > 0.1


# ---------------------------------------------------------------- liveness


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _info(node_id: str, name: str = "n", incarnation: str = "i1", cluster: str = "c") -> NodeInfo:
    return NodeInfo(
        node_id=node_id,
        name=name,
        cluster=cluster,
        protocol_version=PROTOCOL_VERSION,
        grpc_address="127.0.0.1:1",
        incarnation=incarnation,
        resources=Resources(memory_total_bytes=10, memory_available_bytes=5),
    )


def _table() -> tuple[PeerTable, FakeClock]:
    clock = FakeClock()
    return PeerTable("self", "me", Liveness(), clock=clock, wall_clock=clock), clock


def test_peer_is_up_after_an_exchange_then_suspect_at_3s_and_down_at_5s() -> None:
    table, clock = _table()
    assert table.state_of("a") is None
    events = table.record_exchange(_info("a"), address="x:1", sources=["mdns"], outbound=True)
    assert [e.kind for e in events] == [EventKind.UP]
    clock.now += 2.9
    assert table.tick() == []
    assert table.state_of("a") is PeerState.UP
    clock.now += 0.2
    assert [e.kind for e in table.tick()] == [EventKind.SUSPECT]
    clock.now += 1.8
    assert table.state_of("a") is PeerState.SUSPECT
    clock.now += 0.2
    assert table.state_of("a") is PeerState.DOWN  # computed live, before any tick
    assert [e.kind for e in table.tick()] == [EventKind.DOWN]
    assert table.tick() == []  # transitions are reported once


def test_a_node_that_comes_back_recovers_its_row() -> None:
    table, clock = _table()
    table.record_exchange(_info("a"), address="x:1", sources=["mdns"], outbound=True)
    clock.now += 6
    table.tick()
    events = table.record_exchange(
        _info("a", incarnation="i2"), address="x:2", sources=["mdns"], outbound=True
    )
    assert [e.kind for e in events] == [EventKind.RESTARTED, EventKind.UP]
    (view,) = table.snapshot()
    assert view.state is PeerState.UP and view.address == "x:2" and view.silent_s == 0


def test_goodbye_removes_at_once_and_late_packets_of_that_life_are_ignored() -> None:
    table, _ = _table()
    table.record_exchange(_info("a"), address="x:1", sources=["mdns"], outbound=True)
    event = table.remove("a", incarnation="i1", reason="goodbye")
    assert event is not None and event.kind is EventKind.LEFT
    assert table.snapshot() == []
    assert table.record_exchange(_info("a"), address="x:1", sources=["x"], outbound=True) == []
    assert table.snapshot() == []
    # ... but the same node restarted (new incarnation) is welcome again.
    table.record_exchange(_info("a", incarnation="i2"), address="x:1", sources=["x"], outbound=True)
    assert table.state_of("a") is PeerState.UP


def test_goodbye_of_an_older_incarnation_does_not_remove_the_new_one() -> None:
    table, _ = _table()
    table.record_exchange(_info("a", incarnation="i2"), address="x", sources=["x"], outbound=True)
    assert table.remove("a", incarnation="i1", reason="goodbye") is None
    assert table.state_of("a") is PeerState.UP


def test_down_peers_are_forgotten_eventually_and_self_is_never_a_peer() -> None:
    clock = FakeClock()
    table = PeerTable("self", "me", Liveness(forget_after_s=60), clock=clock, wall_clock=clock)
    assert table.record_exchange(_info("self"), address="x", sources=["x"], outbound=True) == []
    table.record_exchange(_info("a"), address="x", sources=["x"], outbound=True)
    clock.now += 61
    assert [e.kind for e in table.tick()] == [EventKind.FORGOTTEN]
    assert table.snapshot() == []


def test_duplicate_names_are_tolerated_and_reported() -> None:
    table, _ = _table()
    table.record_exchange(_info("a", name="mac"), address="x:1", sources=["x"], outbound=True)
    events = table.record_exchange(
        _info("b", name="mac"), address="x:2", sources=["x"], outbound=True
    )
    assert [e.kind for e in events] == [EventKind.UP, EventKind.DUPLICATE_NAME]
    assert "a" in events[1].detail
    events = table.record_exchange(
        _info("c", name="me"), address="x:3", sources=["x"], outbound=True
    )
    assert events[-1].kind is EventKind.DUPLICATE_NAME and "this node" in events[-1].detail
    assert {v.info.node_id for v in table.snapshot()} == {"a", "b", "c"}


def test_inbound_exchange_does_not_override_a_dialled_address() -> None:
    table, _ = _table()
    table.record_exchange(_info("a"), address="10.0.0.1:5", sources=["mdns"], outbound=True)
    table.record_exchange(_info("a"), address="192.168.0.1:5", sources=["inbound"], outbound=False)
    (view,) = table.snapshot()
    assert view.address == "10.0.0.1:5" and view.sources == ("inbound", "mdns")


def test_liveness_rejects_inconsistent_timings() -> None:
    with pytest.raises(ValueError, match="suspect_after_s"):
        Liveness(heartbeat_interval_s=1, suspect_after_s=5, down_after_s=3)


def test_table_is_safe_under_concurrent_updates() -> None:
    table, _ = _table()

    def hammer(prefix: str) -> None:
        for i in range(200):
            table.record_exchange(
                _info(f"{prefix}{i % 20}"), address="x", sources=["x"], outbound=True
            )
            table.tick()
            table.snapshot()

    threads = [threading.Thread(target=hammer, args=(p,)) for p in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(table.snapshot()) == 80


# ---------------------------------------------------------------- targets


def test_targets_are_dialled_once_per_interval_and_never_twice_at_once() -> None:
    targets = TargetSet(interval_s=1.0)
    assert targets.add("a:1", "static", now=0.0)
    assert not targets.add("a:1", "mdns", now=0.0)  # same address, one more reason
    assert [t.address for t in targets.due(0.0)] == ["a:1"]
    assert targets.due(5.0) == []  # still in flight
    targets.completed("a:1", 0.1, node_id="n", ok=True)
    assert targets.due(0.5) == []
    assert [t.address for t in targets.due(1.0)] == ["a:1"]


def test_transient_targets_expire_but_static_and_mdns_stay() -> None:
    targets = TargetSet(interval_s=1.0, transient_ttl_s=30)
    targets.add("s:1", "static", 0.0)
    targets.add("g:1", "gossip", 0.0, expected_id="g")
    targets.add("i:1", "inbound", 0.0, expected_id="i")
    targets.completed("i:1", 20.0, node_id="i", ok=True)
    assert targets.prune(31.0) == ["g:1"]
    assert targets.prune(51.0) == ["i:1"]
    assert targets.addresses() == ["s:1"]


def test_mdns_removal_and_goodbye_keep_what_other_sources_need() -> None:
    targets = TargetSet(interval_s=1.0)
    targets.add("a:1", "mdns", 0.0, expected_id="A", mdns_name="a._macmesh")
    targets.add("a:1", "inbound", 0.0, expected_id="A")
    targets.add("s:1", "static", 0.0)
    targets.completed("s:1", 0.0, node_id="A", ok=True)
    removed = targets.remove_mdns_name("a._macmesh")
    assert removed is not None and "a:1" in targets  # inbound still wants it
    assert targets.drop_node("A") == ["a:1"]
    assert targets.addresses() == ["s:1"]  # static peers are dialled until the end


def test_gossip_cannot_grow_the_target_set_without_bound() -> None:
    targets = TargetSet(interval_s=1.0)
    targets.add("s:1", "static", 0.0)
    added = sum(targets.add(f"g:{i}", "gossip", 0.0) for i in range(1, 1001))
    assert added == MAX_TRANSIENT_TARGETS
    assert targets.add("s:2", "static", 0.0)  # configured peers are never refused


def test_self_targets_are_not_dialled() -> None:
    targets = TargetSet(interval_s=1.0)
    targets.add("me:1", "static", 0.0)
    (target,) = targets.due(0.0)
    targets.completed("me:1", 0.0, node_id="me", ok=True)
    target.is_self = True
    assert targets.due(10.0) == []


# ---------------------------------------------------------------- addresses, TXT, wire


def test_peer_addresses_parse_and_name_bad_values() -> None:
    assert parse_peer("mac-studio.local:52700") == PeerAddress("mac-studio.local", 52700)
    assert parse_peer("[fe80::1]:52700").host == "fe80::1"
    assert str(parse_peer("[::1]:5")) == "[::1]:5"
    assert format_address("10.0.0.1", 5) == "10.0.0.1:5"
    assert parse_peers(["a:1", "a:1", "b:2"]) == [parse_peer("a:1"), parse_peer("b:2")]
    for bad, match in [
        ("nohost", "HOST:PORT"),
        (":52700", "HOST:PORT"),
        ("a:0", "port"),
        ("a:99999", "port"),
        ("a:x", "port"),
        ("::1:5", "IPv6"),
        ("[zz]:5", "IPv6"),
    ]:
        with pytest.raises(ValueError, match=match) as info:
            parse_peer(bad)
        assert repr(bad) in str(info.value)


def test_txt_record_round_trips_and_names_fit_one_dns_label() -> None:
    info = _info("0123456789abcdef0123456789abcdef", name="studio.local")
    txt = build_txt(info, 52700)
    props = {k.encode(): v.encode() for k, v in txt.items()}
    advert = parse_advert("x._macmesh._tcp.local.", props, ["10.0.0.2"], 52700)
    assert (advert.node_id, advert.cluster, advert.grpc_port) == (info.node_id, "c", 52700)
    assert advert.protocol_version == PROTOCOL_VERSION
    assert advert.grpc_address() == "10.0.0.2:52700"
    name = instance_name("x" * 100, info.node_id)
    assert len(name.encode()) <= 63 and name.endswith("-01234567")
    assert "." not in instance_name("studio.local", info.node_id)


def test_advert_address_prefers_our_own_networks() -> None:
    props = {
        b"id": b"abc",
        b"name": b"studio",
        b"cluster": b"c",
        b"proto": b"1",
        b"port": b"52700",
    }
    advert = parse_advert("s", props, ["192.168.1.20", "169.254.3.4", "127.0.0.1"], 52700)
    thunderbolt = [ipaddress.ip_network("169.254.0.0/16")]
    assert advert.grpc_address(thunderbolt) == "169.254.3.4:52700"
    assert advert.grpc_address([]) == "192.168.1.20:52700"  # first non-loopback
    assert advert.grpc_address([ipaddress.ip_network("127.0.0.0/8")]) == "127.0.0.1:52700"
    loopback_only = local_networks("127.0.0.1")
    assert loopback_only and all(ipaddress.ip_address("127.0.0.1") in n for n in loopback_only)


@pytest.mark.parametrize(
    ("props", "srv_port", "addresses", "problem"),
    [
        ({b"id": b"abc"}, 1, ["1.2.3.4"], "lacks"),
        (
            {b"id": b"a b", b"name": b"n", b"cluster": b"c", b"proto": b"1", b"port": b"5"},
            5,
            ["1.2.3.4"],
            "node id",
        ),
        (
            {b"id": b"ab", b"name": b"n", b"cluster": b"c", b"proto": b"v1", b"port": b"5"},
            5,
            ["1.2.3.4"],
            "proto",
        ),
        (
            {b"id": b"ab", b"name": b"n", b"cluster": b"c", b"proto": b"1", b"port": b"70000"},
            5,
            ["1.2.3.4"],
            "port",
        ),
        (
            {b"id": b"ab", b"name": b"n", b"cluster": b"c", b"proto": b"1", b"port": b"5"},
            6,
            ["1.2.3.4"],
            "SRV",
        ),
        (
            {b"id": b"ab", b"name": b"n", b"cluster": b"c", b"proto": b"1", b"port": b"5"},
            5,
            [],
            "address",
        ),
        ({b"id": b"\xff\xfe", b"name": b"n"}, 5, ["1.2.3.4"], "UTF-8"),
        (
            {b"id": b"ab", b"name": None, b"cluster": b"c", b"proto": b"1", b"port": b"5"},
            5,
            ["1.2.3.4"],
            "name",
        ),
    ],
)
def test_malformed_adverts_are_rejected_with_a_reason(
    props: dict, srv_port: int, addresses: list[str], problem: str
) -> None:
    with pytest.raises(AdvertError, match=problem):
        parse_advert("bad._macmesh._tcp.local.", props, addresses, srv_port)


def test_node_info_round_trips_and_bad_wire_values_are_named() -> None:
    info = _info("abc", name="studio")
    assert info_from_proto(info_to_proto(info)) == info
    with pytest.raises(ValueError, match="node_id"):
        info_from_proto(node_pb2.NodeInfo(node_id="", name="x", cluster="c", protocol_version=1))
    with pytest.raises(ValueError, match="name"):
        info_from_proto(node_pb2.NodeInfo(node_id="a", name="", cluster="c", protocol_version=1))


# ---------------------------------------------------------------- identity, once


def test_node_id_is_created_once_and_kept(tmp_path: Path) -> None:
    first = load_or_create_node_id(tmp_path / "state")
    assert load_or_create_node_id(tmp_path / "state") == first
    assert (tmp_path / "state" / "node_id").read_text().strip() == first


def test_a_corrupt_node_id_is_replaced_and_kept_aside(tmp_path: Path) -> None:
    (tmp_path / "node_id").write_text("not a valid id!\n")
    new = load_or_create_node_id(tmp_path)
    assert new != "not a valid id!" and len(new) == 32
    assert (tmp_path / "node_id.corrupt").read_text() == "not a valid id!\n"


def test_state_dir_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    first, second = StateDirLock(tmp_path), StateDirLock(tmp_path)
    first.acquire()
    with pytest.raises(StateDirInUse, match=str(tmp_path)):
        second.acquire()
    first.release()
    second.acquire()
    second.release()


def test_once_reports_each_key_once_and_stays_bounded() -> None:
    once = Once(capacity=3)
    assert once.first("a") and not once.first("a")
    once.forget("a")
    assert once.first("a")
    for key in "bcde":
        once.first(key)
    assert once.first("a")  # evicted: bounded memory beats perfect recall
