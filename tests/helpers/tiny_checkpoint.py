"""Write a tiny real checkpoint (MLX layout, MTP head kept as ``language_model.mtp.*``) to disk.

Built from ``node.checkpoints`` (the deterministic tiny Qwen3.5 weights, config and tokenizer),
so ``node.inference.loading.load_checkpoint`` and the engine selector treat it like a real
MLX conversion that kept its MTP head. When ``node.checkpoints`` gains its own writer, this
file should call it instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from node.checkpoints.config import generation_config, model_config
from node.checkpoints.spec import CheckpointSpec
from node.checkpoints.tokenizer import write_tokenizer
from node.checkpoints.weights import build_model, build_mtp

TINY_SPEC = CheckpointSpec(arch="dense", layout="mlx", agreement="high", seed=11)


def write_tiny_checkpoint(out_dir: Path, spec: CheckpointSpec = TINY_SPEC) -> Path:
    """Write config, tokenizer and one safetensors shard into ``out_dir``; return it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(spec)
    mtp = build_mtp(spec, model)
    tensors = dict(tree_flatten(model.parameters()))
    tensors.update({f"language_model.mtp.{k}": v for k, v in tree_flatten(mtp.parameters())})
    mx.save_safetensors(str(out_dir / "model.safetensors"), tensors, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(model_config(spec), indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config(), indent=2))
    write_tokenizer(out_dir)
    return out_dir
