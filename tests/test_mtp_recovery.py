"""MTP weight recovery: layout probe, +1 norm offsets, expert splitting, quantized heads, and
typed unavailability — on the builders' real checkpoints in every layout."""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from node.checkpoints import PRESETS, ensure_checkpoint
from node.checkpoints.weights import build_model, build_mtp
from node.inference.loading import load_checkpoint
from node.inference.mtp.recovery import (
    MtpLayout,
    MtpUnavailable,
    load_mtp_head,
    probe_mtp,
)


@cache
def checkpoint(name: str) -> Path:
    return ensure_checkpoint(PRESETS[name])


@cache
def expected_head(name: str) -> dict[str, mx.array]:
    """The head the builder constructed, in mlx-lm conventions (absolute norms, split experts)."""
    spec = PRESETS[name]
    return dict(tree_flatten(build_mtp(spec, build_model(spec)).parameters()))


def text_args(name: str):
    return load_checkpoint(checkpoint(name)).text_args


@pytest.mark.parametrize(
    ("name", "layout", "offsets", "fused", "quantized", "count"),
    [
        ("dense-hf", MtpLayout.ORIGINAL, True, False, False, 15),
        ("moe-hf", MtpLayout.ORIGINAL, True, True, False, 19),
        ("dense-mlx", MtpLayout.EMBEDDED_MLX, False, False, False, 15),
        ("moe-mlx", MtpLayout.EMBEDDED_MLX, False, False, False, 20),
        ("dense-sidecar", MtpLayout.SIDECAR, True, False, False, 15),
        ("moe-sidecar", MtpLayout.SIDECAR, True, True, False, 19),
        ("dense-mlx-q4", MtpLayout.EMBEDDED_MLX, False, False, True, None),
        ("dense-sidecar-q4", MtpLayout.SIDECAR, True, False, False, 15),
        ("dense-stripped", MtpLayout.STRIPPED, False, False, False, 0),
        ("moe-stripped", MtpLayout.STRIPPED, False, False, False, 0),
    ],
)
def test_probe_reports_layout(name, layout, offsets, fused, quantized, count) -> None:
    probe = probe_mtp(checkpoint(name))
    assert probe.layout == layout
    assert probe.declared_layers == 1
    assert probe.norm_offsets is offsets
    assert probe.fused_experts is fused
    assert probe.quantized is quantized
    if count is not None:
        assert probe.num_tensors == count
    if layout == MtpLayout.SIDECAR:
        assert probe.files == ("mtp.safetensors",)
    assert probe.available is (layout != MtpLayout.STRIPPED)


@pytest.mark.parametrize(
    "name", ["dense-hf", "dense-mlx", "dense-sidecar", "moe-hf", "moe-mlx", "moe-sidecar"]
)
def test_recovered_head_equals_the_constructed_head(name: str) -> None:
    """Every layout yields exactly the head the builder made: offsets undone only where the
    layout stores them, fused experts split, nothing randomly initialised."""
    head = load_mtp_head(checkpoint(name), text_args(name))
    got = dict(tree_flatten(head.parameters()))
    want = expected_head(name)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].shape == value.shape, key
        assert mx.array_equal(got[key], value).item(), key


def test_norm_offsets_follow_the_layout_not_the_values(tmp_path: Path) -> None:
    """An HF checkpoint whose MTP norms happen to be ~1 (as absolute norms would be) still gets
    +1: the decision comes from the layout."""
    src = checkpoint("dense-sidecar")
    dst = tmp_path / "ck"
    shutil.copytree(src, dst)
    tensors = mx.load(str(dst / "mtp.safetensors"))
    tensors["mtp.norm.weight"] = mx.ones_like(tensors["mtp.norm.weight"])
    mx.save_safetensors(str(dst / "mtp.safetensors"), tensors)
    head = load_mtp_head(dst, text_args("dense-sidecar"))
    assert mx.allclose(head.norm.weight, mx.full(head.norm.weight.shape, 2.0)).item()


def test_quantized_head_is_quantized_like_the_checkpoint() -> None:
    head = load_mtp_head(checkpoint("moe-mlx-q4"), text_args("moe-mlx-q4"))
    layer = head.layers[0]
    assert isinstance(head.fc, nn.QuantizedLinear)
    assert (head.fc.bits, head.fc.group_size) == (4, 64)
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear)
    # mlx-lm's quant_predicate keeps the router and shared-expert gate at 8 bits.
    assert layer.mlp.gate.bits == 8
    assert layer.mlp.shared_expert_gate.bits == 8
    assert layer.mlp.switch_mlp.gate_proj.bits == 4
    # Norms stay full precision.
    assert head.norm.weight.dtype == mx.float32


def test_full_precision_sidecar_next_to_quantized_shards() -> None:
    head = load_mtp_head(checkpoint("dense-sidecar-q4"), text_args("dense-sidecar-q4"))
    assert type(head.fc) is nn.Linear
    assert head.fc.weight.dtype == mx.float32


def test_stripped_checkpoint_is_unavailable_with_reason() -> None:
    with pytest.raises(MtpUnavailable, match="stripped") as info:
        load_mtp_head(checkpoint("dense-stripped"), text_args("dense-stripped"))
    assert "mtp_num_hidden_layers=1" in info.value.reason


def test_missing_tensor_is_unavailable_not_random(tmp_path: Path) -> None:
    dst = tmp_path / "ck"
    shutil.copytree(checkpoint("dense-sidecar"), dst)
    tensors = mx.load(str(dst / "mtp.safetensors"))
    del tensors["mtp.layers.0.self_attn.k_proj.weight"]
    mx.save_safetensors(str(dst / "mtp.safetensors"), tensors)
    with pytest.raises(MtpUnavailable, match=r"self_attn\.k_proj\.weight"):
        load_mtp_head(dst, text_args("dense-sidecar"))


def test_config_without_mtp_is_not_declared(tmp_path: Path) -> None:
    dst = tmp_path / "ck"
    shutil.copytree(checkpoint("dense-stripped"), dst)
    config = json.loads((dst / "config.json").read_text())
    config["text_config"].pop("mtp_num_hidden_layers", None)
    config.pop("mtp_num_hidden_layers", None)
    (dst / "config.json").write_text(json.dumps(config))
    probe = probe_mtp(dst)
    assert probe.layout == MtpLayout.NOT_DECLARED
    with pytest.raises(MtpUnavailable, match="declares no MTP head"):
        load_mtp_head(dst, text_args("dense-stripped"))
