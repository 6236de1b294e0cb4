"""Shared fixtures.

``checkpoint(name, **overrides)`` returns the directory of a tiny deterministic Qwen3.5
checkpoint (``node.checkpoints.PRESETS[name]`` with fields replaced), built at most once: on
disk in the checkpoint cache (``$MACMESH_CHECKPOINT_CACHE`` or ``<repo>/.cache/checkpoints``,
shared across sessions and safe for concurrent pytest processes) and memoised per session.

    def test_something(checkpoint):
        path = checkpoint("dense-sidecar")
        model, tokenizer = mlx_lm.load(str(path))
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from node.checkpoints import CheckpointSpec, ensure_checkpoint, preset

CheckpointFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def checkpoint() -> CheckpointFactory:
    built: dict[CheckpointSpec, Path] = {}

    def get(name: str, **overrides: object) -> Path:
        spec = preset(name, **overrides)
        if spec not in built:
            built[spec] = ensure_checkpoint(spec)
        return built[spec]

    return get


@pytest.fixture(scope="session")
def checkpoint_spec() -> Callable[..., CheckpointSpec]:
    """``checkpoint_spec(name, **overrides)``: the spec behind ``checkpoint(name, ...)``."""
    return preset
