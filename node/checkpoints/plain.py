"""Tiny checkpoints of other mlx-lm architectures (Llama, Ministral 3), for tests that check that
macmesh is not Qwen-only: any mlx-lm model with a standard layer stack runs locally, and those
with mlx-lm pipeline support run in a pipeline.

The model is mlx-lm's own class with its own random initialisation (seeded), saved in mlx-lm's
layout (``model.safetensors`` + ``config.json``) with the test tokenizer, so ``mlx_lm.load``
and macmesh read it exactly as they read a converted checkpoint.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from node.checkpoints.tokenizer import vocab_size, write_tokenizer

PLAIN_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "ministral3": {
        "model_type": "ministral3",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "llama_4_scaling_beta": 0.1,
            "original_max_position_embeddings": 4096,
        },
    },
}


def build_plain_checkpoint(model_type: str, out_dir: Path | str, seed: int = 0) -> Path:
    """Write a tiny ``model_type`` checkpoint (one of ``PLAIN_CONFIGS``) to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {**PLAIN_CONFIGS[model_type], "vocab_size": vocab_size()}
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(out_dir)
    return out_dir
