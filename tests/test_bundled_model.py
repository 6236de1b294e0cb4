"""The bundled demo model: a real trained qwen3_5 checkpoint with MTP, in the original layout."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm import generate, load
from mlx_lm.models import qwen3_5

from node.models import bundled_model_path

MAX_BYTES = 15 * 1000 * 1000
MTP_TENSORS = {
    "mtp.fc.weight",
    "mtp.pre_fc_norm_embedding.weight",
    "mtp.pre_fc_norm_hidden.weight",
    "mtp.norm.weight",
    "mtp.layers.0.input_layernorm.weight",
    "mtp.layers.0.post_attention_layernorm.weight",
    "mtp.layers.0.self_attn.q_proj.weight",
    "mtp.layers.0.self_attn.k_proj.weight",
    "mtp.layers.0.self_attn.v_proj.weight",
    "mtp.layers.0.self_attn.o_proj.weight",
    "mtp.layers.0.self_attn.q_norm.weight",
    "mtp.layers.0.self_attn.k_norm.weight",
    "mtp.layers.0.mlp.gate_proj.weight",
    "mtp.layers.0.mlp.up_proj.weight",
    "mtp.layers.0.mlp.down_proj.weight",
}
# From the heapq documentation, a file the training script holds out for validation.
HELD_OUT = (
    "This module provides an implementation of the heap queue algorithm, also known as the "
    "priority queue algorithm. Heaps are binary trees for which every parent node has a value "
    "less than or equal to any of its children. For the sake of comparison, non-existing "
    "elements are considered to be infinite."
)


@pytest.fixture(scope="module")
def path() -> Path:
    return bundled_model_path()


@pytest.fixture(scope="module")
def loaded(path: Path):
    return load(str(path))


@pytest.fixture(scope="module")
def config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.fixture(scope="module")
def stored(path: Path) -> dict[str, mx.array]:
    """Every tensor exactly as stored on disk."""
    weights: dict[str, mx.array] = {}
    for shard in sorted(path.glob("*.safetensors")):
        weights.update(mx.load(str(shard)))
    return weights


def test_greedy_continuation_is_readable_text(loaded) -> None:
    model, tokenizer = loaded
    text = generate(model, tokenizer, "The list data type", max_tokens=40, verbose=False)
    allowed = set(string.ascii_letters + string.punctuation + string.whitespace)
    readable = sum(c in allowed for c in text) / max(1, len(text))
    words = {w.lower() for w in re.findall(r"[A-Za-z]{2,}", text)}
    assert readable >= 0.8, f"mostly unreadable: {text!r}"
    assert len(words) >= 4, f"too few distinct words: {text!r}"


def test_config_declares_native_mtp(config: dict) -> None:
    assert config["model_type"] == "qwen3_5"
    assert config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    text = config["text_config"]
    assert text["mtp_num_hidden_layers"] == 1
    kinds = set(text["layer_types"])
    assert kinds == {"linear_attention", "full_attention"}, "must be the hybrid architecture"
    assert text["rope_parameters"]["rope_type"] == "default", "HF spelling, as Qwen ships it"


def test_tokenizer_is_qwen_style(loaded) -> None:
    _, tokenizer = loaded
    assert tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(prompt)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids, "specials are single tokens"


def test_files_use_the_original_layout(path: Path, stored: dict, config: dict) -> None:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert set(weight_map) == set(stored)
    assert {k for k in stored if k.startswith("mtp.")} == MTP_TENSORS
    shards = sorted(set(weight_map.values()))
    assert {weight_map[k] for k in MTP_TENSORS} == {shards[-1]}, "mtp.* belongs in the last shard"
    trunk = [k for k in stored if not k.startswith("mtp.")]
    assert all(k.startswith("model.language_model.") for k in trunk), trunk
    kernel = config["text_config"]["linear_conv_kernel_dim"]
    convs = [v for k, v in stored.items() if k.endswith("conv1d.weight")]
    assert convs and all(v.ndim == 3 and v.shape[1] == 1 and v.shape[2] == kernel for v in convs)


def test_norms_are_stored_as_offsets(loaded, stored: dict) -> None:
    """mlx-lm adds 1 to the offset norms of an original-layout checkpoint, not to the
    GatedDeltaNet norm; the loaded scales must match that rule."""
    model, _ = loaded
    text = model.language_model.model
    assert mx.array_equal(text.norm.weight, stored["model.language_model.norm.weight"] + 1.0)
    layer0 = text.layers[0]
    assert mx.array_equal(
        layer0.input_layernorm.weight,
        stored["model.language_model.layers.0.input_layernorm.weight"] + 1.0,
    )
    assert mx.array_equal(
        layer0.linear_attn.norm.weight,
        stored["model.language_model.layers.0.linear_attn.norm.weight"],
    )


def test_size_within_budget(path: Path) -> None:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert total <= MAX_BYTES, f"{total} bytes"


def _mtp_logits(model, stored: dict, tokens: mx.array) -> mx.array:
    """Qwen3.5 MTP, written out independently: fc([norm(embed(x_{t+1})), norm(h_t)]), one
    full-attention layer, mtp.norm, the tied LM head. Row t predicts token t + 2."""
    args = model.language_model.args
    layer = qwen3_5.DecoderLayer(args, layer_idx=args.full_attention_interval - 1)
    prefix = "mtp.layers.0."
    layer.load_weights(
        [
            (k[len(prefix) :], v + 1.0 if k.endswith("norm.weight") else v)
            for k, v in stored.items()
            if k.startswith(prefix)
        ]
    )
    eps = args.rms_norm_eps

    def norm(x: mx.array, key: str) -> mx.array:
        return mx.fast.rms_norm(x, stored[key] + 1.0, eps)

    text = model.language_model.model
    hidden = text(tokens[:, :-1])
    e = norm(text.embed_tokens(tokens[:, 1:]), "mtp.pre_fc_norm_embedding.weight")
    h = norm(hidden, "mtp.pre_fc_norm_hidden.weight")
    x = mx.concatenate([e, h], axis=-1) @ stored["mtp.fc.weight"].T
    x = norm(layer(x, mask="causal"), "mtp.norm.weight")
    return text.embed_tokens.as_linear(x), text.embed_tokens.as_linear(hidden)


def test_mtp_head_drafts_the_targets_next_token(loaded, stored: dict) -> None:
    """Teacher-forced on held-out prose: the MTP draft for token t+2 agrees with the target's own greedy
    prediction at t+1 far more often than chance (a random head agrees ~1/vocab)."""
    model, tokenizer = loaded
    tokens = mx.array([tokenizer.encode(HELD_OUT)])
    mtp_logits, target_logits = _mtp_logits(model, stored, tokens)
    drafts = mtp_logits.argmax(-1)[0, :-1]
    target_greedy = target_logits.argmax(-1)[0, 1:]
    agreement = (drafts == target_greedy).mean().item()
    assert agreement >= 0.3, agreement
    # ... and it is a real prediction of the text, not a copy of the target's next token.
    assert nn.losses.cross_entropy(mtp_logits[0, :-1], tokens[0, 2:], reduction="mean").item() < 6.0
