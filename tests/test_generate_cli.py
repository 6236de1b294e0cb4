"""`macmesh generate … --local` through a real subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from node.checkpoints import PRESETS, ensure_checkpoint


def macmesh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "generate", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def high() -> str:
    return str(ensure_checkpoint(PRESETS["dense-high"]))


@pytest.fixture(scope="module")
def stripped() -> str:
    return str(ensure_checkpoint(PRESETS["dense-stripped"]))


def test_json_output_with_native_mtp(high: str) -> None:
    out = macmesh(
        high,
        "--local",
        "--json",
        "--prompt-ids",
        "5,6,7,8",
        "--max-tokens",
        "12",
        "--mtp-k",
        "3",
        "--ignore-eos",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) >= {"text", "token_ids", "stats"}
    assert len(result["token_ids"]) == 12
    stats = result["stats"]
    for field in (
        "engine",
        "drafter_kind",
        "num_draft_tokens",
        "proposed_draft_tokens",
        "accepted_draft_tokens",
        "acceptance_rate",
        "prompt_tokens",
        "generation_tokens",
        "prompt_tps",
        "generation_tps",
        "stages",
        "queue_seconds",
        "time_to_first_token_seconds",
    ):
        assert field in stats
    assert stats["time_to_first_token_seconds"] > 0.0 and stats["queue_seconds"] == 0.0
    assert stats["engine"] == "native_mtp" and stats["drafter_kind"] == "native_mtp"
    assert stats["num_draft_tokens"] == 3
    assert stats["acceptance_rate"] > 0.9
    assert stats["engine_reason"].startswith("native_mtp: single node, head recovered")


def test_stripped_falls_back_and_explicit_native_mtp_is_an_error(stripped: str) -> None:
    out = macmesh(stripped, "Hello", "--local", "--json", "--max-tokens", "4")
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)["stats"]
    assert stats["engine"] == "local"
    assert "stripped" in stats["engine_reason"]

    out = macmesh(stripped, "Hello", "--local", "--engine", "native_mtp", "--max-tokens", "4")
    assert out.returncode == 2
    assert "MTP head unavailable" in out.stderr and "stripped" in out.stderr


def test_streams_text_and_env_disables_native_mtp(high: str) -> None:
    out = macmesh(
        high,
        "Hello there",
        "--local",
        "--max-tokens",
        "8",
        "--temperature",
        "0.7",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
        "--min-p",
        "0.01",
        "--repetition-penalty",
        "1.1",
        "--seed",
        "3",
        env={"MACMESH_NATIVE_MTP": "0"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("\n") and out.stdout.strip()
    assert "engine=local" in out.stderr
    assert "first token " in out.stderr and "(queued 0 ms)" in out.stderr
    assert "disabled by MACMESH_NATIVE_MTP=0" in out.stderr


def test_bad_values_are_named(high: str) -> None:
    out = macmesh(high, "Hi", "--local", "--temperature", "-1", "--top-p", "1.5")
    assert out.returncode == 2
    assert "--temperature=-1.0" in out.stderr and "--top-p=1.5" in out.stderr
    out = macmesh(high, "--local", "--prompt-ids", "1,2,9999")
    assert out.returncode == 2
    assert "prompt_ids[2]=9999 is outside the vocabulary" in out.stderr
    out = macmesh(high, "Hi", "--local", "--mtp-k", "9")
    assert out.returncode == 2 and "mtp_k=9 is above this model's max_k=4" in out.stderr


def test_a_bundled_model_is_found_by_name() -> None:
    out = macmesh("macmesh-tiny", "Hello", "--local", "--max-tokens", "4", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["stats"]["engine"] == "native_mtp"
    assert result["stats"]["generation_tokens"] == 4
    missing = macmesh("no-such-model", "Hello", "--local")
    assert missing.returncode == 2
    assert "no-such-model" in missing.stderr
