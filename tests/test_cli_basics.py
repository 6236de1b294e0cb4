"""The `macmesh` entry point itself: help, version, and honest placeholders."""

from __future__ import annotations

import subprocess
import sys

import node


def macmesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_help_lists_every_command() -> None:
    out = macmesh("--help")
    assert out.returncode == 0, out.stderr
    for command in (
        "run",
        "status",
        "models",
        "place",
        "launch",
        "generate",
        "gateway",
        "demo",
        "version",
    ):
        assert command in out.stdout


def test_version_names_the_package_version() -> None:
    out = macmesh("version")
    assert out.returncode == 0, out.stderr
    assert f"macmesh {node.__version__}" in out.stdout
    assert "mlx" in out.stdout


def test_bad_log_format_is_named() -> None:
    out = macmesh("--log-format", "xml", "version")
    assert out.returncode == 2
    assert "xml" in out.stderr
