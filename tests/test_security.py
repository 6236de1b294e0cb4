"""Who may talk to a node: the cluster secret on every RPC, TLS, the no-secret warning, request
limits, and the gateway's API key — against real daemon and gateway processes on 127.0.0.1."""

from __future__ import annotations

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
from node.client import InvalidRequest, MacmeshClient, Unauthenticated
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


# ----------------------------------------------------------------------------- pure checks


def test_verifier_accepts_once_and_names_each_refusal():
    key = SECRET.encode()
    verifier = Verifier(key, freshness_s=60)
    header = auth_header(key, "/macmesh.v1.InferenceService/Generate", now=1000)
    assert verifier.check("/macmesh.v1.InferenceService/Generate", header, now=1010) is None
    assert "replay" in verifier.check("/macmesh.v1.InferenceService/Generate", header, now=1011)
    # Bound to the method: the same signature does not open another method.
    other = auth_header(key, "/macmesh.v1.InferenceService/Unload", now=1000)
    assert verifier.check("/macmesh.v1.InferenceService/Generate", other, now=1000) == (
        "wrong cluster secret"
    )
    stale = auth_header(key, "/m", now=1000)
    assert "old" in verifier.check("/m", stale, now=1100)
    forged = auth_header(WRONG.encode(), "/m", now=1000)
    assert verifier.check("/m", forged, now=1000) == "wrong cluster secret"
    assert "missing" in verifier.check("/m", None)
    assert "malformed" in verifier.check("/m", "v1:x:y")


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
        code, message = _status(a.address, Security(WRONG.encode()))
        assert (code, message) == (grpc.StatusCode.UNAUTHENTICATED, "wrong cluster secret")
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
        wait_for(lambda: "wrong cluster secret" in a.log_text(), 10, what="a refuses x")
        states = a.states()
        assert states.get(intruder.node_id) is not PeerState.UP, a.log_text()[-2000:]
        assert intruder.node_id not in {n.id for n in a.view().live()}
        assert "ANYONE" not in a.log_text()  # a has a secret: no open-node warning


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
            env={"MACMESH_MAX_PROMPT_CHARS": "100"},
        )
        with MacmeshClient(a.address, timeout=10) as client:
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
