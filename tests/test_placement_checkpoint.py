"""Cards derived from real checkpoints on disk (headers only), and MODEL resolution.

The tiny checkpoints come from ``node.checkpoints`` (mlx-lm's own qwen3_5 / qwen3_5_moe models
written in every real layout); a few odd layouts are written here with ``mx.save_safetensors``.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import pytest

from node.checkpoints import PRESETS, ensure_checkpoint
from node.placement import (
    CheckpointError,
    NodeCapacity,
    PlanOptions,
    UnknownModelError,
    card_from_checkpoint,
    card_from_config,
    get_card,
    plan,
    resolve_card,
)
from node.placement.checkpoint import read_config, read_safetensors_header

COMPARED = ("layer_bytes", "layer_types", "embedding_bytes", "head_bytes", "kv_bytes_per_token")


@pytest.mark.parametrize(
    ("card_id", "preset"),
    [
        ("tiny-qwen3.5-dense", "dense-hf"),
        ("tiny-qwen3.5-dense", "dense-mlx"),
        ("tiny-qwen3.5-dense", "dense-sidecar"),
        ("tiny-qwen3.5-dense", "dense-stripped"),
        ("tiny-qwen3.5-moe", "moe-hf"),
        ("tiny-qwen3.5-moe", "moe-mlx"),
        ("tiny-qwen3.5-moe", "moe-sidecar"),
        ("tiny-qwen3.5-moe", "moe-stripped"),
    ],
)
def test_shipped_tiny_cards_match_the_real_checkpoints(card_id: str, preset: str) -> None:
    shipped = get_card(card_id)
    derived = card_from_checkpoint(ensure_checkpoint(PRESETS[preset]))
    for field in (*COMPARED, "linear_state_bytes", "context_length", "bits", "model_type"):
        assert getattr(derived, field) == getattr(shipped, field), field
    assert derived.native_mtp is not None and shipped.native_mtp is not None
    if preset.endswith("stripped"):
        # the config still declares MTP, the weights are gone
        assert derived.native_mtp.head_bytes == 0
        assert derived.native_mtp.weights_in_checkpoint is False
        assert derived.bytes == shipped.bytes - shipped.native_mtp.head_bytes
    else:
        assert derived.native_mtp.head_bytes == shipped.native_mtp.head_bytes
        assert derived.native_mtp.weights_in_checkpoint is True
        assert derived.bytes == shipped.bytes
    assert (derived.native_mtp.default_k, derived.native_mtp.max_k) == (2, 4)


def test_derived_card_bytes_equal_the_sum_of_every_tensor() -> None:
    path = ensure_checkpoint(PRESETS["dense-hf"])
    total = sum(t.nbytes for f in path.glob("*.safetensors") for t in read_safetensors_header(f))
    assert card_from_checkpoint(path).bytes == total


@pytest.mark.parametrize("preset", ["dense-mlx-q4", "moe-mlx-q4", "dense-sidecar-q4"])
def test_quantized_checkpoints_have_real_quantized_bytes(preset: str) -> None:
    path = ensure_checkpoint(PRESETS[preset])
    card = card_from_checkpoint(path)
    assert (card.bits, card.group_size) == (4, 64)
    # mlx-lm's own quantization (router gates at 8 bits, fp32 scales here) predicted exactly
    estimate = card_from_config(
        read_config(path), card_id="x", bits=4, group_size=64, activation_bytes=4, mtp_k=(2, 4)
    )
    assert card.layer_bytes == estimate.layer_bytes
    assert card.embedding_bytes == estimate.embedding_bytes
    assert card.head_bytes == estimate.head_bytes
    if preset != "dense-sidecar-q4":  # the sidecar keeps the original full-precision head
        assert card.mtp_bytes == estimate.mtp_bytes
    fp32 = get_card("tiny-qwen3.5-moe" if "moe" in preset else "tiny-qwen3.5-dense")
    assert card.bytes < fp32.bytes / 2


def test_bf16_checkpoints_halve_the_kv_cache() -> None:
    card = card_from_checkpoint(ensure_checkpoint(PRESETS["dense-hf-bf16"]))
    fp32 = get_card("tiny-qwen3.5-dense")
    assert card.bits == 16
    assert card.kv_bytes_per_token * 2 == fp32.kv_bytes_per_token


def test_tied_checkpoint_has_no_lm_head_and_the_planner_copies_the_embedding() -> None:
    card = card_from_checkpoint(ensure_checkpoint(PRESETS["dense-tied"]))
    assert card.tie_word_embeddings
    assert card.head_bytes == 64 * 4  # the final norm alone
    nodes = [NodeCapacity(id=n, available_memory_bytes=10**7) for n in ("a", "b")]
    placement = plan(card, nodes, PlanOptions(min_nodes=2))
    assert placement.stages[-1].weight_bytes >= card.embedding_bytes + card.head_bytes


def test_a_checkpoint_named_after_a_card_takes_its_mtp_k(tmp_path: Path) -> None:
    named = tmp_path / "Qwen3.6-35B-A3B-tiny-test"
    shutil.copytree(ensure_checkpoint(PRESETS["moe-hf"]), named)
    card = card_from_checkpoint(named)
    assert card.id == "Qwen3.6-35B-A3B-tiny-test"
    assert (card.native_mtp.default_k, card.native_mtp.max_k) == (1, 8)
    assert any("Qwen3.6-35B-A3B card" in note for note in card.notes)


def test_only_headers_are_read(tmp_path: Path) -> None:
    """Cut every shard right after its header: the card is still derived, bytes and all."""
    source = ensure_checkpoint(PRESETS["dense-mlx"])
    target = tmp_path / "headers-only"
    shutil.copytree(source, target)
    for shard in target.glob("*.safetensors"):
        raw = shard.read_bytes()
        (header_len,) = struct.unpack("<Q", raw[:8])
        shard.write_bytes(raw[: 8 + header_len])
    assert card_from_checkpoint(target).bytes == card_from_checkpoint(source).bytes


# --- layouts written here ------------------------------------------------------------------------


def write_plain_checkpoint(directory: Path, layers: int = 3, extra: dict | None = None) -> dict:
    """A llama-style checkpoint: model.layers.{i}, model.embed_tokens, model.norm, lm_head."""
    directory.mkdir(parents=True)
    hidden, vocab = 16, 32
    tensors = {
        "model.embed_tokens.weight": mx.zeros((vocab, hidden)),
        "model.norm.weight": mx.ones((hidden,)),
        "lm_head.weight": mx.zeros((vocab, hidden)),
    }
    for i in range(layers):
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = mx.zeros((hidden, hidden))
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = mx.zeros((2 * hidden, hidden))
    tensors.update(extra or {})
    mx.save_safetensors(str(directory / "model.safetensors"), tensors)
    config = {
        "model_type": "llama",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config))
    return tensors


def test_plain_single_file_checkpoint(tmp_path: Path) -> None:
    tensors = write_plain_checkpoint(
        tmp_path / "plain",
        extra={
            "model.visual.patch_embed.weight": mx.zeros((8, 8)),  # dropped by mlx-lm: skipped
            "model.rotary_emb.inv_freq": mx.zeros((4,)),  # unknown: counted with the embedding
        },
    )
    card = card_from_checkpoint(tmp_path / "plain")
    assert card.layer_types == ["full_attention"] * 3
    assert card.layer_bytes == [(16 * 16 + 32 * 16) * 4] * 3
    assert card.embedding_bytes == tensors["model.embed_tokens.weight"].nbytes + 16
    assert card.head_bytes == (16 + 32 * 16) * 4
    assert card.kv_bytes_per_token == 3 * 2 * 2 * 4 * 4  # layers x (K,V) x kv heads x dim x fp32
    assert card.native_mtp is None and not card.tie_word_embeddings
    assert card.context_length == 2048
    assert any("unrecognised" in note for note in card.notes)


def test_mlx_named_sharded_checkpoint_with_an_mtp_sidecar(tmp_path: Path) -> None:
    """language_model.* names over two shards with an index, mtp.* in mtp.safetensors."""
    directory = tmp_path / "sharded"
    directory.mkdir()
    hidden = 8
    first = {"language_model.model.embed_tokens.weight": mx.zeros((10, hidden), dtype=mx.bfloat16)}
    second = {"language_model.model.norm.weight": mx.zeros((hidden,), dtype=mx.bfloat16)}
    for i in range(4):
        shard = first if i < 2 else second
        shard[f"language_model.model.layers.{i}.mlp.down_proj.weight"] = mx.zeros(
            (hidden, 4 * (i + 1)), dtype=mx.bfloat16
        )
    mx.save_safetensors(str(directory / "model-00001-of-00002.safetensors"), first)
    mx.save_safetensors(str(directory / "model-00002-of-00002.safetensors"), second)
    mx.save_safetensors(
        str(directory / "mtp.safetensors"), {"mtp.fc.weight": mx.zeros((hidden, 2 * hidden))}
    )
    weight_map = {name: "model-00001-of-00002.safetensors" for name in first}
    weight_map |= {name: "model-00002-of-00002.safetensors" for name in second}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {
        "model_type": "qwen3_5",
        "text_config": {
            "num_hidden_layers": 4,
            "hidden_size": hidden,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 4,
            "linear_num_key_heads": 1,
            "linear_num_value_heads": 2,
            "linear_key_head_dim": 4,
            "linear_value_head_dim": 4,
            "linear_conv_kernel_dim": 4,
            "full_attention_interval": 2,
            "mtp_num_hidden_layers": 1,
            "vocab_size": 10,
        },
        "tie_word_embeddings": True,
    }
    (directory / "config.json").write_text(json.dumps(config))
    card = card_from_checkpoint(directory)
    assert card.layer_bytes == [hidden * 4 * (i + 1) * 2 for i in range(4)]
    assert card.layer_types == ["linear_attention", "full_attention"] * 2
    assert card.tie_word_embeddings and card.head_bytes == hidden * 2
    assert card.native_mtp.head_bytes == hidden * 2 * hidden * 4  # the sidecar is fp32
    # bf16 activations: KV = 2 full layers x (K,V) x 1 head x 4 dims x 2 bytes
    assert card.kv_bytes_per_token == 2 * 2 * 1 * 4 * 2
    # conv state (3 x (2*4 + 8) x 2 bytes) + recurrent state (2 x 4 x 4 x 4 bytes), 2 layers
    assert card.linear_state_bytes == 2 * (3 * 16 * 2 + 2 * 4 * 4 * 4)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda d: (d / "config.json").unlink(), "has no config.json"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 16), "claims a"),
        (
            lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}"),
            "truncated",
        ),
        (lambda d: (d / "model.safetensors").unlink(), "no .safetensors files"),
        (
            lambda d: (d / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"x": "model-00009-of-00009.safetensors"}})
            ),
            "lacks shard",
        ),
        (
            lambda d: (d / "config.json").write_text(
                json.dumps({"num_hidden_layers": 5, "hidden_size": 16})
            ),
            r"no tensors for layer\(s\) \[3, 4\]",
        ),
        (
            lambda d: (d / "config.json").write_text(
                json.dumps({"num_hidden_layers": 2, "hidden_size": 16})
            ),
            "is for layer 2 but config.json has 2 layers",
        ),
        (
            lambda d: (d / "config.json").write_text(json.dumps({"hidden_size": 16})),
            "num_hidden_layers",
        ),
    ],
)
def test_broken_checkpoints_are_named(tmp_path: Path, breakage, message: str) -> None:
    directory = tmp_path / "broken"
    write_plain_checkpoint(directory)
    breakage(directory)
    with pytest.raises(CheckpointError, match=message):
        card_from_checkpoint(directory)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is not a directory"):
        card_from_checkpoint(tmp_path / "missing")


# --- resolving MODEL -----------------------------------------------------------------------------


def test_resolve_card_ids_paths_and_models_dir_names(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_plain_checkpoint(models / "my-llama")
    write_plain_checkpoint(models / "org--flat-name")
    assert resolve_card("Qwen3.6-27B").id == "Qwen3.6-27B"
    assert resolve_card("Qwen3.6-27B-4bit").bits == 4
    assert resolve_card(str(models / "my-llama")).id == "my-llama"
    assert resolve_card("my-llama", models).id == "my-llama"
    assert resolve_card("org/flat-name", models).id == "org--flat-name"


def test_unknown_model_lists_cards_and_local_checkpoints(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_plain_checkpoint(models / "my-llama")
    with pytest.raises(UnknownModelError) as exc:
        resolve_card("no-such-model", models)
    message = str(exc.value)
    assert "'no-such-model'" in message
    assert "Qwen3.6-27B" in message and "tiny-qwen3.5-dense" in message
    assert "my-llama" in message
    with pytest.raises(UnknownModelError, match="no model given"):
        resolve_card("  ")


BUNDLED_DEMO = Path(__file__).resolve().parents[1] / "node" / "models" / "macmesh-tiny"


@pytest.mark.skipif(not (BUNDLED_DEMO / "config.json").is_file(), reason="demo model not built")
def test_the_bundled_demo_model_resolves_by_name() -> None:
    card = resolve_card("macmesh-tiny")
    assert card.id == "macmesh-tiny"
    assert card.native_mtp is not None and card.native_mtp.weights_in_checkpoint
    nodes = [NodeCapacity(id="solo", available_memory_bytes=card.bytes * 4)]
    assert plan(card, nodes, PlanOptions(context_length=64)).single_node
