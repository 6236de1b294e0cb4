"""Settings precedence (flag > MACMESH_* env > TOML file > default) and clear errors, both through
``load_settings`` and through ``macmesh run`` itself."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.daemons import macmesh_env, wait_for
from typer.testing import CliRunner

from node.cli import app
from node.config import DEFAULT_GRPC_PORT, SettingsError, load_settings
from node.discovery.client import get_info


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("MACMESH_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MACMESH_CONFIG", str(tmp_path / "absent.toml"))


def _toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_apply_when_nothing_is_given() -> None:
    s = load_settings()
    assert s.grpc_port == DEFAULT_GRPC_PORT
    assert s.cluster == "default"
    assert s.name == socket.gethostname()
    assert s.mdns and s.native_mtp
    assert s.peers == [] and s.interface is None


def test_flag_beats_env_beats_file_beats_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = _toml(
        tmp_path / "c.toml",
        'cluster = "file"\nname = "file"\ngrpc_port = 1111\nmdns = false\npeers = ["f:1"]\n',
    )
    only_file = load_settings(config)
    assert (only_file.cluster, only_file.name, only_file.grpc_port) == ("file", "file", 1111)
    assert only_file.mdns is False and only_file.peers == ["f:1"]

    monkeypatch.setenv("MACMESH_CLUSTER", "env")
    monkeypatch.setenv("MACMESH_GRPC_PORT", "2222")
    monkeypatch.setenv("MACMESH_PEERS", '["e:2", "e:3"]')
    with_env = load_settings(config)
    assert (with_env.cluster, with_env.name, with_env.grpc_port) == ("env", "file", 2222)
    assert with_env.peers == ["e:2", "e:3"] and with_env.mdns is False

    with_flags = load_settings(config, cluster="flag", peers=["p:4"], mdns=True, name=None)
    assert (with_flags.cluster, with_flags.name, with_flags.grpc_port) == ("flag", "file", 2222)
    assert with_flags.peers == ["p:4"] and with_flags.mdns is True


def test_config_file_comes_from_env_unless_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from_env = _toml(tmp_path / "env.toml", 'cluster = "via-env-path"\n')
    explicit = _toml(tmp_path / "explicit.toml", 'cluster = "via-flag-path"\n')
    monkeypatch.setenv("MACMESH_CONFIG", str(from_env))
    assert load_settings().cluster == "via-env-path"
    assert load_settings(explicit).cluster == "via-flag-path"


@pytest.mark.parametrize(
    ("source", "setting", "value"),
    [
        ("flag", "grpc_port", 70000),
        ("flag", "peers", ["nope"]),
        ("flag", "cluster", ""),
        ("env", "grpc_port", "abc"),
        ("env", "mdns", "perhaps"),
        ("file", "grpc_port", -1),
        ("file", "log_level", "loud"),
        ("flag", "prompt_cache_mb", -1),
        ("env", "prompt_cache_mb", "lots"),
    ],
)
def test_invalid_values_name_the_setting_and_the_value(
    source: str, setting: str, value: object, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = None
    flags: dict[str, object] = {}
    if source == "flag":
        flags[setting] = value
    elif source == "env":
        monkeypatch.setenv(f"MACMESH_{setting.upper()}", str(value))
    else:
        config = _toml(tmp_path / "bad.toml", f"{setting} = {json.dumps(value)}\n")
    with pytest.raises(SettingsError) as err:
        load_settings(config, **flags)
    message = str(err.value)
    assert setting in message
    shown = value[0] if isinstance(value, list) else value
    assert repr(shown) in message or str(shown) in message


def test_unknown_keys_and_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="grcp_port"):
        load_settings(_toml(tmp_path / "typo.toml", "grcp_port = 1\n"))
    with pytest.raises(SettingsError, match=r"nowhere\.toml"):
        load_settings(tmp_path / "nowhere.toml")


@pytest.mark.parametrize(
    ("args", "code", "named"),
    [
        (["--grpc-port", "70000"], 2, ["grpc_port", "70000"]),
        (["--grpc-port", "abc"], 2, ["grpc_port", "abc"]),
        (["--peer", "nope"], 2, ["peers", "nope"]),
        (["--cluster", ""], 2, ["cluster"]),
        (["--config", "/nonexistent/macmesh.toml"], 2, ["/nonexistent/macmesh.toml"]),
        (["--interface", "no-such-nic0", "--no-mdns"], 1, ["no-such-nic0"]),
    ],
)
def test_macmesh_run_refuses_bad_flags(
    args: list[str], code: int, named: list[str], tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        app, ["run", "--state-dir", str(tmp_path / "state"), "--grpc-port", "0", *args]
    )
    assert result.exit_code == code, result.output
    for text in named:
        assert text in result.output


def test_macmesh_run_merges_flags_env_and_file(tmp_path: Path) -> None:
    """The real command, as a process: each setting comes from the strongest source given."""
    config = _toml(
        tmp_path / "node.toml",
        'name = "file-name"\ncluster = "file-cluster"\nmdns = false\nlog_level = "debug"\n',
    )
    state = tmp_path / "state"
    env = macmesh_env(
        tmp_path,
        {"MACMESH_CONFIG": str(config), "MACMESH_NAME": "env-name", "MACMESH_CLUSTER": "env"},
    )
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "node.cli", "run", "--cluster", "flag-cluster"),
            *("--grpc-port", "0", "--interface", "127.0.0.1", "--state-dir", str(state)),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        daemon = wait_for(
            lambda: json.loads((state / "daemon.json").read_text()), timeout=20, what="daemon"
        )
        info = get_info(daemon["client_address"])
        assert (info.name, info.cluster) == ("env-name", "flag-cluster")
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, output
    assert "mDNS off" in output  # from the file
    assert f"listening on {daemon['address']} (gRPC)" in output  # bound to --interface only
    assert "[debug" in output  # log level from the file, no --log-level given


def test_max_batch_from_flag_env_or_file_and_bad_values_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert load_settings().max_batch == 8
    config = _toml(tmp_path / "c.toml", "max_batch = 4\n")
    assert load_settings(config).max_batch == 4
    monkeypatch.setenv("MACMESH_MAX_BATCH", "12")
    assert load_settings(config).max_batch == 12
    assert load_settings(config, max_batch=2).max_batch == 2
    with pytest.raises(SettingsError, match="max_batch=0"):
        load_settings(max_batch=0)
