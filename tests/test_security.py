"""Who may talk to a node: the cluster secret on every RPC, TLS, the no-secret warning, request
limits, and the gateway's API key — against real daemon and gateway processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.daemons import DaemonCluster, macmesh_env, wait_for

from node import security
from node.client import AsyncMacmeshClient, InvalidRequest, MacmeshClient, Unauthenticated
from node.discovery.models import PeerState
from node.proto.macmesh.v1 import inference_pb2 as pb
from node.proto.macmesh.v1 import inference_pb2_grpc as pb_grpc
from node.rpc import CHANNEL_OPTIONS
from node.security import Security, TlsFiles, Verifier, auth_header

SECRET = "correct horse battery staple 42"
WRONG = "not the cluster secret, at all"


@pytest.fixture(autouse=True)
def _reset_security():
    """The test process signs its own calls only where a test says so."""
    security.configure(Security())
    yield
    security.configure(Security())


def _status(address: str, sec: Security) -> tuple[grpc.StatusCode, str]:
    with sec.secure_channel(address, CHANNEL_OPTIONS) as channel:
        try:
            pb_grpc.InferenceServiceStub(channel).ClusterStatus(
                pb.ClusterStatusRequest(local_only=True), timeout=5
            )
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


STATUS = "/macmesh.v1.InferenceService/ClusterStatus"


def _raw_status(address: str, header: str) -> tuple[grpc.StatusCode, str]:
    """ClusterStatus with exactly ``header`` as the signature (no signing, no answer check)."""
    with grpc.insecure_channel(address) as channel:
        try:
            pb_grpc.InferenceServiceStub(channel).ClusterStatus(
                pb.ClusterStatusRequest(local_only=True),
                metadata=[(security.AUTH_KEY, header)],
                timeout=5,
            )
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


# ----------------------------------------------------------------------------- pure checks


GENERATE = "/macmesh.v1.InferenceService/Generate"


def test_verifier_accepts_once_and_names_each_refusal():
    key = SECRET.encode()
    verifier = Verifier(key, freshness_s=60, identity=lambda: "node-a")
    header = auth_header(key, GENERATE, "node-a", now=1000)
    assert verifier.check(GENERATE, header, now=1010) is None
    assert "replay" in verifier.check(GENERATE, header, now=1011)
    # Bound to the method, and said so: the same signature does not open another method.
    other = auth_header(key, "/macmesh.v1.InferenceService/Unload", "node-a", now=1000)
    refused = verifier.check(GENERATE, other, now=1000)
    assert "signed for /macmesh.v1.InferenceService/Unload, not " + GENERATE in refused
    # Bound to the node: a header made for node b is refused by node a.
    elsewhere = auth_header(key, GENERATE, "node-b", now=1000)
    assert verifier.check(GENERATE, elsewhere, now=1000).startswith(
        "signed for node node-b, but this is node node-a"
    )
    stale = auth_header(key, "/m", "node-a", now=1000)
    assert "old" in verifier.check("/m", stale, now=1100)
    forged = auth_header(WRONG.encode(), "/m", "node-a", now=1000)
    assert verifier.check("/m", forged, now=1000) == "wrong cluster secret"
    assert "missing" in verifier.check("/m", None)
    assert "malformed" in verifier.check("/m", "v1:x:y")
    # A forged header with a huge method name is not echoed whole.
    huge = auth_header(key, "/" + "x" * 10_000, "node-a", now=1000)
    assert len(verifier.check("/m", huge, now=1000)) < 300


def test_answers_and_hellos_prove_the_secret_over_this_call_only():
    key = SECRET.encode()
    proof = security.answer_proof(key, GENERATE, "node-a", "n1")
    ok = [(security.PROOF_KEY, proof)]
    security.check_answer(key, GENERATE, "node-a", "n1", ok, "addr")
    for method, node, nonce, metadata in (
        (GENERATE, "node-a", "n2", ok),  # another call's proof: replayed
        ("/other", "node-a", "n1", ok),
        (GENERATE, "node-b", "n1", ok),
        (
            GENERATE,
            "node-a",
            "n1",
            [(security.PROOF_KEY, security.answer_proof(WRONG.encode(), GENERATE, "node-a", "n1"))],
        ),
        (GENERATE, "node-a", "n1", []),
    ):
        with pytest.raises(security.NotAuthenticated, match="not signed with the cluster secret"):
            security.check_answer(key, method, node, nonce, metadata, "addr")
    hello = [(security.PROOF_KEY, security.hello_proof(key, "node-a", "c1"))]
    assert security.hello_problem(key, "c1", hello, "addr") is None
    assert "different cluster secret" in security.hello_problem(key, "c2", hello, "addr")
    assert "does not prove" in security.hello_problem(key, "c1", [], "addr")


def test_short_secret_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "secret"
    path.write_text("short\n")
    with pytest.raises(security.SecurityError, match="at least 16"):
        security.from_values(secret_file=path)


# ----------------------------------------------------------------------------- daemons


def test_every_rpc_needs_the_secret_and_intruders_never_become_up(tmp_path):
    secret_file = tmp_path / "cluster.secret"
    secret_file.write_text(SECRET + "\n")
    good = Security(SECRET.encode())
    with DaemonCluster(tmp_path) as cluster:
        a = cluster.start("a", mdns=False, extra_args=["--cluster-secret-file", str(secret_file)])
        b = cluster.start(
            "b", mdns=False, peers=[f"127.0.0.1:{a.port}"], env={"MACMESH_CLUSTER_SECRET": SECRET}
        )
        intruder = cluster.start(
            "x", mdns=False, peers=[f"127.0.0.1:{a.port}"], env={"MACMESH_CLUSTER_SECRET": WRONG}
        )

        code, message = _status(a.address, Security())
        assert code is grpc.StatusCode.UNAUTHENTICATED and "needs the cluster secret" in message
        # A client with another secret learns so before it sends a signed call...
        code, message = _status(a.address, Security(WRONG.encode()))
        assert code is grpc.StatusCode.UNAUTHENTICATED
        assert f"{a.address} answers with a different cluster secret" in message
        # ...and a call signed with another secret is refused by the node.
        forged = auth_header(WRONG.encode(), STATUS, a.node_id)
        assert _raw_status(a.address, forged) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "wrong cluster secret",
        )
        assert _status(a.address, good)[0] is grpc.StatusCode.OK
        with MacmeshClient(a.address, timeout=5) as client, pytest.raises(Unauthenticated):
            client.cluster_status()
        with MacmeshClient(a.address, timeout=5, security=good) as client:
            assert client.cluster_status().instances == []
            client.check_health()

        # Health checks stay open: supervisors and load balancers probe them without a secret.
        with grpc.insecure_channel(a.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        security.configure(good)  # view() asks over the NodeService, which needs it too

        def a_sees_b() -> bool:
            return a.states().get(b.node_id) is PeerState.UP

        wait_for(a_sees_b, timeout=15, what="a sees b up")
        # The intruder heartbeats a for seconds: every one is refused, so it never is "up" and
        # the planner (which places on live nodes only) never sees it.
        wait_for(
            lambda: "answers with a different cluster secret" in intruder.log_text(),
            10,
            what="x finds that a holds another secret",
        )
        states = a.states()
        assert states.get(intruder.node_id) is not PeerState.UP, a.log_text()[-2000:]
        assert intruder.node_id not in {n.id for n in a.view().live()}
        assert "ANYONE" not in a.log_text()  # a has a secret: no open-node warning


def _refused_to_dial(daemon, other) -> bool:
    return f"the node at 127.0.0.1:{other.port} does not prove" in daemon.log_text()


@pytest.mark.parametrize("discovery", ["static", "mdns"])
def test_a_node_without_the_secret_never_becomes_up_from_the_dialling_side(tmp_path, discovery):
    """The issue's attack: the secret node dials the open one (a static peer, or found over
    real zeroconf on 127.0.0.1). Its heartbeat *answers* used to count as membership; now the
    open node cannot prove the secret, is never up, and never receives a signed call."""
    good = Security(SECRET.encode())
    mdns = discovery == "mdns"
    with DaemonCluster(tmp_path) as cluster:
        open_node = cluster.start("nosecret", mdns=mdns)
        peers = [] if mdns else [f"127.0.0.1:{open_node.port}"]
        a = cluster.start("a", mdns=mdns, peers=peers, env={"MACMESH_CLUSTER_SECRET": SECRET})
        security.configure(good)

        def decided() -> bool:  # before the fix a took it for a member within a heartbeat
            return _refused_to_dial(a, open_node) or open_node.node_id in a.states()

        wait_for(decided, 20, what="a refuses or accepts the open node")
        assert a.states().get(open_node.node_id) is not PeerState.UP, a.log_text()[-3000:]
        assert [n.id for n in a.view().live()] == [a.node_id]
        # a never handed it a signed call: the open node (which accepts anything) never
        # heard a heartbeat from a.
        security.configure(Security())
        assert a.node_id not in open_node.states(), open_node.log_text()[-3000:]


def test_clients_drop_answers_that_are_not_signed_and_say_why(tmp_path):
    good = Security(SECRET.encode())
    with DaemonCluster(tmp_path) as cluster:
        open_node = cluster.start("nosecret", mdns=False)
        secret_node = cluster.start("a", mdns=False, env={"MACMESH_CLUSTER_SECRET": SECRET})
        refused = pytest.raises(Unauthenticated, match="does not prove it holds the cluster")
        with MacmeshClient(open_node.address, timeout=5, security=good) as client, refused:
            client.cluster_status()

        async def async_status() -> None:
            async with AsyncMacmeshClient(open_node.address, timeout=5, security=good) as client:
                await client.cluster_status()

        with pytest.raises(Unauthenticated, match="does not prove it holds the cluster"):
            asyncio.run(async_status())
        # The CLI names the real problem, not "no macmesh daemon reachable".
        for address, env, why in (
            (open_node.address, {"MACMESH_CLUSTER_SECRET": SECRET}, "does not prove"),
            (secret_node.address, {}, "needs the cluster secret"),
        ):
            cli = subprocess.run(
                [sys.executable, "-m", "node.cli", "status", "--node", address],
                env=macmesh_env(tmp_path, env),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert cli.returncode == 1, cli.stderr
            assert f"the macmesh daemon at {address} and this client do not share" in cli.stderr
            assert why in cli.stderr and "no macmesh daemon reachable" not in cli.stderr


def test_a_header_captured_for_one_node_is_refused_by_another(tmp_path):
    env = {"MACMESH_CLUSTER_SECRET": SECRET}
    with DaemonCluster(tmp_path) as cluster:
        a = cluster.start("a", mdns=False, env=env)
        b = cluster.start("b", mdns=False, env=env)
        header = auth_header(SECRET.encode(), STATUS, a.node_id)
        code, message = _raw_status(b.address, header)  # replayed to b before a even saw it
        assert code is grpc.StatusCode.UNAUTHENTICATED
        assert message.startswith(f"signed for node {a.node_id}, but this is node {b.node_id}")
        assert _raw_status(a.address, header)[0] is grpc.StatusCode.OK  # meant for a: accepted
        assert "already used" in _raw_status(a.address, header)[1]


def test_no_secret_warns_once_plainly(tmp_path):
    with DaemonCluster(tmp_path) as cluster:
        a = cluster.start("open", mdns=False)
        assert _status(a.address, Security())[0] is grpc.StatusCode.OK
        text = a.log_text()
        assert text.count("no cluster secret is set: ANYONE") == 1, text


def _certificates(directory: Path) -> TlsFiles:
    """A throwaway CA and a node certificate for 127.0.0.1, made with the openssl CLI."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=macmesh-test-ca",
    )
    run("req", *ec, "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=node")
    run(
        "x509",
        "-req",
        "-in",
        "node.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "node.pem",
        "-days",
        "2",
        "-extfile",
        "san.cnf",
    )
    return TlsFiles(directory / "node.pem", directory / "node.key", directory / "ca.pem")


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI")


@needs_openssl
def test_tls_between_peers_and_clients(tmp_path):
    tls = _certificates(tmp_path)
    args = ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-ca", str(tls.ca)]
    env = {"MACMESH_CLUSTER_SECRET": SECRET}
    with DaemonCluster(tmp_path) as cluster:
        a = cluster.start("a", mdns=False, extra_args=args, env=env)
        b = cluster.start("b", mdns=False, peers=[f"127.0.0.1:{a.port}"], extra_args=args, env=env)
        client_tls = Security(SECRET.encode(), TlsFiles(ca=tls.ca))
        assert _status(a.address, client_tls)[0] is grpc.StatusCode.OK
        # Plain-text gRPC to a TLS port does not get through at all.
        assert _status(a.address, Security(SECRET.encode()))[0] is grpc.StatusCode.UNAVAILABLE
        security.configure(client_tls)
        wait_for(lambda: a.states().get(b.node_id) is PeerState.UP, 15, what="a sees b over TLS")


def test_request_limits_name_the_limit(tmp_path):
    with DaemonCluster(tmp_path) as cluster:
        a = cluster.start(
            "a",
            mdns=False,
            extra_args=["--max-tokens-limit", "64"],
            env={
                "MACMESH_MAX_PROMPT_CHARS": "100",
                "MACMESH_MAX_STOPS": "1",
                "MACMESH_MAX_MESSAGES": "2",
            },
        )
        with MacmeshClient(a.address, timeout=10) as client:
            stops = r"number of stop strings is 2, above this node's limit of 1 \(setting MACMESH_MAX_STOPS\)"
            with pytest.raises(InvalidRequest, match=stops):
                list(client.generate("any-model", "hi", max_tokens=8, stop=["a", "b"]))
            chat = [{"role": "user", "content": "hi"}] * 3
            with pytest.raises(
                InvalidRequest, match=r"messages is 3.*setting MACMESH_MAX_MESSAGES"
            ):
                list(client.generate("any-model", messages=chat, max_tokens=8))
            with pytest.raises(InvalidRequest, match=r"max_tokens is 65.*limit of 64"):
                list(client.generate("any-model", "hi", max_tokens=65))
            with pytest.raises(InvalidRequest, match=r"characters.*limit of 100"):
                list(client.generate("any-model", "x" * 101, max_tokens=8))


# ----------------------------------------------------------------------------- gateway


def _get(url: str, ca: Path, key: str | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=10, context=context
        ) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@needs_openssl
def test_gateway_api_key_and_https(tmp_path):
    tls = _certificates(tmp_path)
    with DaemonCluster(tmp_path) as cluster:
        a = cluster.start("a", mdns=False, env={"MACMESH_CLUSTER_SECRET": SECRET})
        env = macmesh_env(
            tmp_path, {"MACMESH_API_KEY": "sk-test-key", "MACMESH_CLUSTER_SECRET": SECRET}
        )
        command = [
            sys.executable,
            "-m",
            "node.cli",
            "gateway",
            "--port",
            "0",
            "--node",
            a.address,
            "--tls-cert",
            str(tls.cert),
            "--tls-key",
            str(tls.key),
        ]
        gateway = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        try:
            line = gateway.stdout.readline()
            match = re.search(r"(https://\S+)", line)
            assert match, line + gateway.stdout.read(2000)
            base = match.group(1).replace("127.0.0.1", "localhost")
            status, body = _get(f"{base}/health", tls.ca)
            assert (status, body["status"]) == (200, "ok"), body  # open for probes; node signed
            status, body = _get(f"{base}/v1/models", tls.ca)
            assert (status, body["error"]["code"]) == (401, "invalid_api_key"), body
            assert _get(f"{base}/v1/models", tls.ca, "sk-nope")[0] == 401
            status, body = _get(f"{base}/v1/models", tls.ca, "sk-test-key")
            assert status == 200 and body["object"] == "list", body
        finally:
            gateway.terminate()
            gateway.wait(10)


# ----------------------------------------------------------------------------- fail closed


BAD_SECRETS = [
    ({"MACMESH_CLUSTER_SECRET": "short"}, "$MACMESH_CLUSTER_SECRET is 5 bytes; use at least 16"),
    ({"MACMESH_CLUSTER_SECRET": ""}, "$MACMESH_CLUSTER_SECRET is 0 bytes; use at least 16"),
    ({"MACMESH_CLUSTER_SECRET_FILE": "{tmp}/missing"}, "/missing' is not a readable file"),
    ({"MACMESH_CLUSTER_SECRET_FILE": "{tmp}/empty"}, "/empty' is 0 bytes; use at least 16"),
    ({"MACMESH_CLUSTER_SECRET_FILE": ""}, "$MACMESH_CLUSTER_SECRET_FILE is set but empty"),
]


def _bad_env(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    (tmp_path / "empty").write_text("\n")
    return {k: v.replace("{tmp}", str(tmp_path)) for k, v in env.items()}


@pytest.mark.parametrize(("env", "message"), BAD_SECRETS)
def test_a_set_but_unusable_secret_is_fatal_for_clients(tmp_path, monkeypatch, env, message):
    for key, value in _bad_env(tmp_path, env).items():
        monkeypatch.setenv(key, value)
    security.configure(None)  # read the environment again, as a fresh process does
    with pytest.raises(security.SecurityError) as refused:
        MacmeshClient("127.0.0.1:1", timeout=1)
    assert message in str(refused.value)


@pytest.mark.parametrize(
    "command", [["status", "--node", "127.0.0.1:1"], ["gateway", "--node", "127.0.0.1:1"]]
)
@pytest.mark.parametrize(("env", "message"), BAD_SECRETS[::2])
def test_a_set_but_unusable_secret_stops_the_cli_with_the_daemons_message(
    tmp_path, command, env, message
):
    full_env = macmesh_env(tmp_path, _bad_env(tmp_path, env))
    run = [sys.executable, "-m", "node.cli"]
    cli = subprocess.run([*run, *command], env=full_env, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2, cli.stderr
    assert cli.stderr.startswith(f"macmesh {command[0]}: ") and message in cli.stderr, cli.stderr
    # The daemon refuses the same setting, in the same words.
    state = tmp_path / "state"
    daemon = subprocess.run(
        [*run, "run", "--no-mdns", "--grpc-port", "0", "--state-dir", str(state)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    said = "cluster_secret_file=''" if "set but empty" in message else message
    assert daemon.returncode != 0 and said in daemon.stderr, daemon.stderr
