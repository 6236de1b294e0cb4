"""Models that ship inside the macmesh package.

``macmesh-tiny`` is a ~2.9M-parameter Qwen3.5 (``qwen3_5``: GatedDeltaNet + full attention)
with a jointly trained MTP head, trained on CPython's documentation by
``scripts/train_demo_model.py`` and stored in the original Hugging Face layout (``mtp.*``
tensors in the last shard, norms as offsets, conv1d as (C, 1, K)).
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL_NAME = "macmesh-tiny"


def bundled_model_path() -> Path:
    """Directory of the bundled demo checkpoint; loads with ``mlx_lm.load``."""
    path = Path(__file__).resolve().parent / BUNDLED_MODEL_NAME
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the bundled model is missing at {path}; rebuild it with scripts/train_demo_model.py"
        )
    return path
