"""Layer-range shards: only their own weights, and chained they compute mlx-lm's exact logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model

from node.checkpoints import PRESETS, CheckpointSpec, ensure_checkpoint
from node.inference.shard import ShardError, load_shard

PROMPT = mx.array([[5, 17, 99, 3, 250, 7, 8, 9, 42, 300, 11]])


def _reference_logits(path: Path) -> mx.array:
    model, _ = load_model(path)
    return model(PROMPT, cache=model.make_cache())


def _pipelined_logits(path: Path, ranges: list[tuple[int, int]]) -> mx.array:
    shards = [load_shard(path, start, end) for start, end in ranges]
    h = PROMPT
    for shard in shards:
        h = shard.forward(h, shard.make_cache())
        mx.eval(h)  # a stage boundary: the hidden state leaves the stage here
    return shards[-1].logits(h)


@pytest.mark.parametrize(
    ("preset", "ranges"),
    [
        # hf: HF norm offsets + conv1d layout; [3, 4) has no GatedDeltaNet layer of its own.
        ("dense-hf", [(0, 1), (1, 3), (3, 4)]),
        ("dense-mlx", [(0, 2), (2, 4)]),
        ("dense-sidecar", [(0, 3), (3, 4)]),
        ("dense-tied", [(0, 2), (2, 4)]),  # the last stage needs the embedding as its head
        ("moe-hf", [(0, 1), (1, 3), (3, 4)]),  # fused experts split by sanitize, per layer
        ("moe-mlx", [(0, 2), (2, 4)]),
        ("dense-mlx-q4", [(0, 1), (1, 4)]),
        ("moe-mlx-q4", [(0, 3), (3, 4)]),
    ],
)
def test_chained_shards_give_the_full_models_logits(
    preset: str, ranges: list[tuple[int, int]]
) -> None:
    path = ensure_checkpoint(PRESETS[preset])
    expected = _reference_logits(path)
    assert mx.array_equal(_pipelined_logits(path, ranges), expected).item()


def test_a_shard_holds_only_its_layers() -> None:
    path = ensure_checkpoint(PRESETS["dense-hf"])
    full, _ = load_model(path)
    full_bytes = sum(v.nbytes for _, v in tree_flatten(full.parameters()))
    first, middle, last = (load_shard(path, a, b) for a, b in [(0, 1), (1, 3), (3, 4)])

    def names(shard) -> set[str]:
        return {k for k, _ in tree_flatten(shard.model.parameters())}

    def layers(shard) -> set[int]:
        return {int(k.split("layers.")[1].split(".")[0]) for k in names(shard) if "layers." in k}

    assert layers(first) == {0} and layers(middle) == {1, 2} and layers(last) == {3}
    assert any("embed_tokens" in n for n in names(first))
    assert not any(
        "embed_tokens" in n or "lm_head" in n or n.endswith("model.norm.weight")
        for n in names(middle)
    )
    assert any("lm_head" in n for n in names(last)) and not any(
        "embed_tokens" in n for n in names(last)
    )
    assert (first.has_embedding, first.has_head, last.has_embedding, last.has_head) == (
        True,
        False,
        False,
        True,
    )
    # Every parameter lives on exactly one stage.
    assert first.weight_bytes + middle.weight_bytes + last.weight_bytes == full_bytes
    assert middle.weight_bytes < full_bytes / 2
    assert all(s.resident_bytes >= 0 and s.load_seconds > 0 for s in (first, middle, last))


def test_resident_memory_counts_only_the_stages_layers() -> None:
    """In a fresh process, loading 2 of 8 wide layers grows RSS by about those layers' bytes."""
    spec = CheckpointSpec(
        arch="dense",
        layout="hf",
        num_hidden_layers=8,
        hidden_size=256,
        intermediate_size=4096,
        num_attention_heads=4,
        num_key_value_heads=2,
        seed=9,
    )
    path = ensure_checkpoint(spec)
    script = (
        "import json, sys; from node.inference.shard import load_shard; "
        f"s = load_shard({str(path)!r}, 3, 5); "
        "print(json.dumps([s.weight_bytes, s.resident_bytes]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    weight_bytes, resident_bytes = json.loads(out.stdout.strip().splitlines()[-1])
    total_bytes = sum(f.stat().st_size for f in path.glob("model*.safetensors"))
    assert weight_bytes < total_bytes / 3
    assert 0.9 * weight_bytes <= resident_bytes <= weight_bytes + 32 * 2**20, (
        f"RSS grew {resident_bytes} bytes for {weight_bytes} bytes of weights "
        f"(checkpoint {total_bytes} bytes)"
    )


@pytest.mark.parametrize(("start", "end"), [(0, 0), (2, 1), (-1, 2), (0, 5)])
def test_bad_layer_ranges_are_named(start: int, end: int) -> None:
    path = ensure_checkpoint(PRESETS["dense-mlx"])
    with pytest.raises(ShardError, match=rf"\[{start}, {end}\) is not inside the model's 4 layers"):
        load_shard(path, start, end)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="not a checkpoint directory"):
        load_shard(tmp_path, 0, 1)
