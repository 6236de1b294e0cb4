"""Fuzz the OpenAI gateway over its own OpenAPI schema (schemathesis) against a real daemon with
the bundled model launched: whatever the body, headers or path, the gateway never answers 500,
every error is a JSON body in the shape of the API its path belongs to (OpenAI, Anthropic,
Ollama), and it still serves a good request afterwards.

Half the generated bodies name the launched model, so the fuzz reaches the node's validation
and generation, not only "model not found". The node caps max_tokens at 16 so every accepted
request is quick; larger values must come back as 400 naming the limit.
"""

from __future__ import annotations

import pytest
import requests
import schemathesis
from helpers.cluster_client import launch
from helpers.daemons import DaemonCluster
from helpers.gateway_processes import start_gateway
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from node.gateway.openapi import openapi_document

MODEL = "macmesh-tiny"
API_KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-gateway")
    with DaemonCluster(root) as cluster:
        node = cluster.start("gw-node", mdns=False, extra_args=["--max-tokens-limit", "16"])
        launch(node.address, MODEL)
        gw = start_gateway(root / "gw", node.address, "--api-key", API_KEY)
        try:
            yield gw
        finally:
            gw.stop()
        assert node.alive()


SCHEMA = schemathesis.openapi.from_dict(openapi_document())
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
# Every operation of the schema, valid and invalid inputs (schemathesis' own strategies; its
# pytest plugin is not used: it does not load with this pytest).
CASES = st.one_of(*(operation.as_strategy() for operation in OPERATIONS))


def test_the_schema_covers_every_endpoint():
    paths = {(o.method, o.path) for o in OPERATIONS}
    for path in (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/messages",
        "/api/chat",
        "/api/generate",
        "/api/show",
    ):
        assert ("post", path) in paths, path
    assert ("get", "/api/tags") in paths


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(case=CASES, name_the_model=st.booleans())
def test_gateway_never_answers_500(gateway, case, name_the_model):
    if isinstance(case.body, dict) and name_the_model:
        case.body["model"] = MODEL
    response = case.call(base_url=gateway.url, headers=AUTH, timeout=30)
    event(f"HTTP {response.status_code}")
    assert response.status_code != 500, f"{case.method} {case.path}: {response.text[:500]}"
    if response.status_code >= 400:
        assert_error_shape(case.path, response.json(), response.text[:500])


def assert_error_shape(path: str, body: dict, text: str) -> None:
    """Each API's own error shape: Anthropic's, Ollama's, or OpenAI's."""
    if path == "/v1/messages":
        assert body["type"] == "error", text
        assert body["error"]["type"] and body["error"]["message"], text
    elif path.startswith("/api/"):
        assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], text
    else:
        assert body["error"]["message"] and body["error"]["type"], text


def test_gateway_still_serves_after_fuzzing(gateway):
    reply = requests.post(
        f"{gateway.api}/completions",
        json={"model": MODEL, "prompt": "The os module", "max_tokens": 4},
        headers=AUTH,
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 4
    over = requests.post(
        f"{gateway.api}/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 17},
        headers=AUTH,
        timeout=30,
    )
    assert over.status_code == 400 and "limit of 16" in over.json()["error"]["message"]
