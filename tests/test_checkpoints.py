"""The tiny deterministic Qwen3.5 checkpoints: layouts, determinism, cache, tokenizer, agreement."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load

from node.checkpoints import (
    PRESETS,
    CheckpointSpec,
    bench_spec,
    build_checkpoint,
    cached_path,
    count_parameters,
    ensure_checkpoint,
    preset,
)
from node.checkpoints.reference_mtp import (
    ReferenceMTP,
    greedy_generate,
    load_reference_mtp,
    measure_agreement,
)
from node.checkpoints.weights import _instantiate

PROMPTS = (
    "<|im_start|>user\nTell me about the cluster.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time",
    "def add(a, b):",
)
LAYOUTS = ("hf", "mlx", "sidecar", "stripped")
MAIN_NORMS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "q_norm.weight",
    "k_norm.weight",
)
DENSE_MTP_NAMES = {
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
MOE_MTP_NAMES = {n for n in DENSE_MTP_NAMES if ".mlp." not in n} | {
    "mtp.layers.0.mlp.gate.weight",
    "mtp.layers.0.mlp.experts.gate_up_proj",
    "mtp.layers.0.mlp.experts.down_proj",
    "mtp.layers.0.mlp.shared_expert.gate_proj.weight",
    "mtp.layers.0.mlp.shared_expert.up_proj.weight",
    "mtp.layers.0.mlp.shared_expert.down_proj.weight",
    "mtp.layers.0.mlp.shared_expert_gate.weight",
}


def _tensors(path: Path, pattern: str = "model*.safetensors") -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for file in sorted(path.glob(pattern)):
        out.update(mx.load(str(file)))
    return out


def _index(path: Path) -> dict:
    return json.loads((path / "model.safetensors.index.json").read_text())


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _logits(path: Path, text: str = "Hello world, the cluster runs.") -> np.ndarray:
    model, tokenizer = load(str(path))
    logits = model(mx.array([tokenizer.encode(text)]))
    return np.array(logits.astype(mx.float32))


# --- every layout is the same model ---


@pytest.mark.parametrize("arch", ["dense", "moe"])
def test_every_layout_loads_with_mlx_lm_and_gives_the_hf_logits(checkpoint, arch):
    reference = _logits(checkpoint(f"{arch}-hf"))
    assert np.isfinite(reference).all()
    assert reference.std() > 0.1  # not a degenerate all-equal distribution
    for layout in LAYOUTS[1:]:
        np.testing.assert_array_equal(_logits(checkpoint(f"{arch}-{layout}")), reference)


def test_bf16_layouts_match_and_stay_bf16(checkpoint):
    model, _ = load(str(checkpoint("dense-hf-bf16")))
    assert model.language_model.lm_head.weight.dtype == mx.bfloat16
    # mlx-lm's cast_predicate keeps A_log in float32; so does the builder.
    assert model.language_model.model.layers[0].linear_attn.A_log.dtype == mx.float32
    hf = _logits(checkpoint("dense-hf-bf16"))
    np.testing.assert_array_equal(_logits(checkpoint("dense-mlx-bf16")), hf)
    full = _logits(checkpoint("dense-hf"))
    assert np.corrcoef(full.ravel(), hf.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("name", ["dense-mlx-q4", "moe-mlx-q4", "dense-sidecar-q4"])
def test_quantized_mlx_layouts_load_and_approximate_full_precision(checkpoint, name):
    path = checkpoint(name)
    config = _config(path)
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    assert config["quantization_config"] == config["quantization"]
    tensors = _tensors(path)
    assert (
        tensors[
            "language_model.model.layers.0.mlp.gate_proj.weight"
            if "dense" in name
            else "language_model.model.layers.0.mlp.switch_mlp.gate_proj.weight"
        ].dtype
        == mx.uint32
    )
    quantized = _logits(path)
    full = _logits(checkpoint(name.removesuffix("-q4").replace("sidecar", "sidecar")))
    assert np.isfinite(quantized).all()
    assert np.corrcoef(full.ravel(), quantized.ravel())[0, 1] > 0.9


# --- what each layout's files hold ---


@pytest.mark.parametrize("arch", ["dense", "moe"])
def test_hf_layout_files(checkpoint, arch):
    path = checkpoint(f"{arch}-hf")
    spec = PRESETS[f"{arch}-hf"]
    config = _config(path)
    assert config["model_type"] == {"dense": "qwen3_5", "moe": "qwen3_5_moe"}[arch]
    assert config["architectures"] == [
        {"dense": "Qwen3_5ForConditionalGeneration", "moe": "Qwen3_5MoeForConditionalGeneration"}[
            arch
        ]
    ]
    assert config["text_config"]["mtp_num_hidden_layers"] == 1
    assert config["text_config"]["full_attention_interval"] == spec.full_attention_interval

    index = _index(path)
    shards = sorted(path.glob("model-*.safetensors"))
    assert [s.name for s in shards] == [
        f"model-{i:05d}-of-{spec.num_shards:05d}.safetensors" for i in range(1, spec.num_shards + 1)
    ]
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    tensors = {}
    for shard in shards:
        for name, value in mx.load(str(shard)).items():
            assert index["weight_map"][name] == shard.name
            tensors[name] = value
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())

    mtp = {n for n in tensors if n.startswith("mtp.")}
    assert mtp == (MOE_MTP_NAMES if arch == "moe" else DENSE_MTP_NAMES)
    assert {index["weight_map"][n] for n in mtp} == {shards[-1].name}
    assert "model.language_model.embed_tokens.weight" in tensors
    assert "model.language_model.norm.weight" in tensors
    assert "lm_head.weight" in tensors
    assert not any(n.startswith("language_model.") for n in tensors)

    conv = tensors["model.language_model.layers.0.linear_attn.conv1d.weight"]
    assert conv.shape[1] == 1 and conv.shape[2] == spec.linear_conv_kernel_dim  # (C, 1, K)
    if arch == "moe":
        gate_up = tensors["model.language_model.layers.0.mlp.experts.gate_up_proj"]
        down = tensors["model.language_model.layers.0.mlp.experts.down_proj"]
        e, i, d = spec.num_experts, spec.moe_intermediate_size, spec.hidden_size
        assert gate_up.shape == (e, 2 * i, d) and down.shape == (e, d, i)
        assert tensors["mtp.layers.0.mlp.experts.gate_up_proj"].shape == (e, 2 * i, d)
        assert not any("switch_mlp" in n for n in tensors)


@pytest.mark.parametrize("arch", ["dense", "moe"])
def test_hf_norms_are_offsets_of_the_mlx_norms(checkpoint, arch):
    hf = _tensors(checkpoint(f"{arch}-hf"))
    mlx = _tensors(checkpoint(f"{arch}-mlx"))
    checked = 0
    for name, value in mlx.items():
        hf_name = name.replace("language_model.model.", "model.language_model.")
        if name.startswith("language_model.mtp."):
            hf_name = name.removeprefix("language_model.")
        is_norm = name.endswith(MAIN_NORMS) or name.endswith(
            (
                "model.norm.weight",
                "mtp.norm.weight",
                "pre_fc_norm_embedding.weight",
                "pre_fc_norm_hidden.weight",
            )
        )
        if is_norm:
            np.testing.assert_array_equal(np.array(hf[hf_name]) + 1.0, np.array(value))
            checked += 1
        elif name.endswith("linear_attn.norm.weight"):  # the gated norm is absolute
            np.testing.assert_array_equal(np.array(hf[hf_name]), np.array(value))
            checked += 1
        elif name.endswith("conv1d.weight"):
            np.testing.assert_array_equal(np.array(hf[hf_name]), np.array(value).swapaxes(1, 2))
    assert checked > 10


@pytest.mark.parametrize("arch", ["dense", "moe"])
def test_mlx_layout_keeps_the_head_in_mlx_conventions(checkpoint, arch):
    path = checkpoint(f"{arch}-mlx")
    tensors = _tensors(path)
    index = _index(path)
    last_shard = sorted(set(index["weight_map"].values()))[-1]
    mtp = [n for n in tensors if n.startswith("language_model.mtp.")]
    assert len(mtp) == (19 if arch == "moe" else 15) + (1 if arch == "moe" else 0)  # gate/up split
    assert {index["weight_map"][n] for n in mtp} == {last_shard}
    assert not any(n.startswith("mtp.") or n.startswith("model.") for n in tensors)
    assert "language_model.lm_head.weight" in tensors
    assert tensors["language_model.model.layers.0.linear_attn.conv1d.weight"].shape[-1] == 1
    if arch == "moe":
        assert "language_model.mtp.layers.0.mlp.switch_mlp.up_proj.weight" in tensors
        assert not any("experts." in n for n in tensors)
    assert not (path / "mtp.safetensors").exists()


def test_quantized_mlx_layout_quantizes_the_head_too(checkpoint):
    path = checkpoint("moe-mlx-q4")
    tensors = _tensors(path)
    assert tensors["language_model.mtp.fc.weight"].dtype == mx.uint32
    assert "language_model.mtp.fc.scales" in tensors
    quantization = _config(path)["quantization"]
    # mlx-lm's MoE quant_predicate: router and shared-expert gate at 8 bits, MTP included.
    assert quantization["language_model.mtp.layers.0.mlp.gate"] == {"group_size": 64, "bits": 8}
    assert quantization["language_model.model.layers.0.mlp.shared_expert_gate"]["bits"] == 8


@pytest.mark.parametrize("arch", ["dense", "moe"])
def test_sidecar_holds_the_original_hf_head_and_mlx_lm_never_reads_it(
    checkpoint, arch, monkeypatch
):
    path = checkpoint(f"{arch}-sidecar")
    main = _tensors(path)
    assert not any("mtp" in n for n in main)
    assert not any("mtp" in n for n in _index(path)["weight_map"])
    sidecar = mx.load(str(path / "mtp.safetensors"))
    hf = _tensors(checkpoint(f"{arch}-hf"))
    assert set(sidecar) == {n for n in hf if n.startswith("mtp.")}
    for name, value in sidecar.items():
        assert value.dtype == hf[name].dtype
        np.testing.assert_array_equal(np.array(value), np.array(hf[name]))

    loaded: list[str] = []
    real_load = mx.load

    def spy(file, *args, **kwargs):
        loaded.append(Path(file).name)
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(mx, "load", spy)
    load(str(path))
    assert loaded and "mtp.safetensors" not in loaded


def test_sidecar_stays_full_precision_when_the_main_model_is_quantized(checkpoint):
    sidecar = mx.load(str(checkpoint("dense-sidecar-q4") / "mtp.safetensors"))
    assert all(v.dtype == mx.float32 for v in sidecar.values())
    assert not any(n.endswith((".scales", ".biases")) for n in sidecar)


@pytest.mark.parametrize("arch", ["dense", "moe"])
def test_stripped_has_no_head_but_declares_one(checkpoint, arch):
    path = checkpoint(f"{arch}-stripped")
    assert not any("mtp" in n for n in _tensors(path, "*.safetensors"))
    assert not (path / "mtp.safetensors").exists()
    assert _config(path)["text_config"]["mtp_num_hidden_layers"] == 1
    model, _ = load(str(path))
    with pytest.raises(FileNotFoundError):
        load_reference_mtp(path, model)


def test_tied_checkpoint_has_no_lm_head(checkpoint):
    path = checkpoint("dense-tied")
    assert "lm_head.weight" not in _tensors(path)
    assert _config(path)["text_config"]["tie_word_embeddings"] is True


@pytest.mark.parametrize("name", ["dense-hf", "moe-hf", "dense-mlx-q4", "dense-tied"])
def test_random_models_generate_varied_text(checkpoint, name):
    model, tokenizer = load(str(checkpoint(name)))
    for prompt in PROMPTS:
        tokens = greedy_generate(model, tokenizer.encode(prompt), 32)
        assert len(set(tokens)) >= 20, tokens
        assert len(set(tokens[-8:])) > 2, tokens  # not stuck in a short loop


def test_the_head_reads_back_identically_from_every_layout(checkpoint):
    outputs = []
    for layout in ("hf", "mlx", "sidecar"):
        path = checkpoint(f"moe-{layout}")
        model, tokenizer = load(str(path))
        mtp = load_reference_mtp(path, model)
        ids = tokenizer.encode("Hello there, cluster")
        hidden = model.language_model.model(mx.array([ids]))
        embeddings = model.language_model.model.embed_tokens(mx.array([ids[1:]]))
        outputs.append(np.array(mtp(hidden[:, :-1], embeddings)))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[0], outputs[2])


# --- determinism and the cache ---


def _file_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("name", ["moe-mlx-q4", "moe-partial"])
def test_same_spec_builds_byte_identical_files(tmp_path, name):
    first = build_checkpoint(PRESETS[name], tmp_path / "a")
    second = build_checkpoint(PRESETS[name], tmp_path / "b")
    assert _file_bytes(first) == _file_bytes(second)


def test_another_seed_builds_other_tensors_under_the_same_names(tmp_path):
    first = build_checkpoint(PRESETS["moe-mlx-q4"], tmp_path / "a")
    other = build_checkpoint(dataclasses.replace(PRESETS["moe-mlx-q4"], seed=99), tmp_path / "c")
    assert _tensors(other).keys() == _tensors(first).keys()
    assert _file_bytes(other)["config.json"] == _file_bytes(first)["config.json"]
    assert _file_bytes(other) != _file_bytes(first)


def test_rebuilding_into_a_directory_drops_the_old_files(tmp_path):
    build_checkpoint(PRESETS["dense-sidecar"], tmp_path)
    build_checkpoint(dataclasses.replace(PRESETS["dense-stripped"], num_shards=1), tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    load(str(tmp_path))


def test_ensure_checkpoint_builds_once_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("MACMESH_CHECKPOINT_CACHE", str(tmp_path))
    spec = PRESETS["dense-stripped"]
    path = ensure_checkpoint(spec)
    assert path == cached_path(spec) and path.parent == tmp_path
    assert path.name.startswith("dense-stripped-random-")
    stamp = (path / "config.json").stat().st_mtime_ns

    import node.checkpoints.builder as builder

    def must_not_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached checkpoint")

    monkeypatch.setattr(builder, "build_checkpoint", must_not_build)
    assert ensure_checkpoint(spec) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp dirs left behind
    assert cached_path(dataclasses.replace(spec, seed=5)) != path


def test_builds_by_an_older_builder_and_dead_temp_dirs_are_pruned(tmp_path, monkeypatch):
    monkeypatch.setenv("MACMESH_CHECKPOINT_CACHE", str(tmp_path))
    spec = PRESETS["dense-stripped"]
    prefix = f"{spec.name()}-{spec.spec_key()}-"
    old_build = tmp_path / (prefix + "00000000")
    recent_build = tmp_path / (prefix + "11111111")
    dead_temp = tmp_path / ".dense-stripped-xyz.tmp"
    other_spec = tmp_path / f"{spec.name()}-{'0' * 12}-00000000"
    for path in (old_build, recent_build, dead_temp, other_spec):
        path.mkdir()
    long_ago = 1_000_000_000
    for path in (old_build, dead_temp, other_spec):
        os.utime(path, (long_ago, long_ago))
    path = ensure_checkpoint(spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [path.name, recent_build.name, other_spec.name]
    )


def test_concurrent_processes_share_one_cached_build(tmp_path):
    code = (
        "from node.checkpoints import PRESETS, ensure_checkpoint;"
        "print(ensure_checkpoint(PRESETS['dense-sidecar']))"
    )
    env = {**os.environ, "MACMESH_CHECKPOINT_CACHE": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outputs[0] == outputs[1]
    assert [p.name for p in tmp_path.iterdir()] == [Path(outputs[0]).name]
    load(outputs[0])


# --- tokenizer ---


def test_tokenizer_round_trips_and_applies_the_chat_template(checkpoint):
    path = checkpoint("dense-mlx")
    _, tokenizer = load(str(path))
    for text in [
        "Hello, world!",
        "naïve café — 日本語 🙂",
        "def f(x):\n    return x * 2\n",
        "  spaces  ",
    ]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id in tokenizer.eos_token_ids
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(prompt)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert len(tokenizer.encode("<|im_end|>")) == 1
    assert len(tokenizer.get_vocab()) == _config(path)["text_config"]["vocab_size"]
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in tokenizer.encode("streaming text ok"):
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == "streaming text ok"


# --- constructed agreement ---


def _agreements(path: Path, n_tokens: int = 48, depth: int = 4, prompts=PROMPTS):
    model, tokenizer = load(str(path))
    mtp = load_reference_mtp(path, model)
    return [measure_agreement(model, mtp, tokenizer.encode(p), n_tokens, depth) for p in prompts]


def _assert_varied(reports) -> None:
    for report in reports:
        assert report.distinct_tokens >= 30, report.tokens
        assert report.period is None or report.period >= 16


@pytest.mark.parametrize("name", ["dense-high", "moe-high", "dense-high-mlx-q4"])
def test_high_agreement_heads_draft_what_the_target_says(checkpoint, name):
    reports = _agreements(checkpoint(name))
    for report in reports:
        assert report.first > 0.95, report.per_depth
        assert min(report.per_depth) > 0.9, report.per_depth  # chained drafts, K = 2..4
    _assert_varied(reports)


@pytest.mark.parametrize("name", ["dense-none", "moe-none"])
def test_none_agreement_heads_never_draft_the_target_token(checkpoint, name):
    reports = _agreements(checkpoint(name))
    assert all(r.first < 0.05 for r in reports), [r.per_depth for r in reports]
    _assert_varied(reports)


@pytest.mark.parametrize("name", ["dense-partial", "moe-partial"])
def test_partial_agreement_is_in_between(checkpoint, name):
    reports = _agreements(checkpoint(name))
    pooled = sum(r.overall * sum(r.counts) for r in reports) / sum(sum(r.counts) for r in reports)
    assert 0.35 < pooled < 0.8, [r.per_depth for r in reports]
    assert all(0.25 < r.first < 0.85 for r in reports)
    _assert_varied(reports)


@pytest.mark.parametrize("name", ["dense-high", "dense-partial"])
def test_constructed_targets_depend_on_history(checkpoint, name):
    """The target's logits for the same last token change with the context (so caches matter)."""
    model, _ = load(str(checkpoint(name)))
    a = model(mx.array([[10, 20, 30, 40, 50, 99]]))[0, -1]
    b = model(mx.array([[60, 70, 80, 90, 100, 99]]))[0, -1]
    assert float(mx.abs(a - b).max()) > 0.05


def test_agreement_level_dials_the_head(checkpoint):
    measured = []
    for level in (0.25, 0.75):
        path = checkpoint("dense-high", agreement_level=level)
        reports = _agreements(path, n_tokens=48, depth=1, prompts=PROMPTS[1:])
        measured.append(float(np.mean([r.first for r in reports])))
    assert 0.1 < measured[0] < 0.45
    assert 0.55 < measured[1] < 0.9


# --- spec ---


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"arch": "mamba"}, "arch"),
        ({"layout": "gguf"}, "layout"),
        ({"layout": "hf", "quant_bits": 4}, "quant_bits"),
        ({"agreement": "random", "agreement_level": 0.5}, "agreement_level"),
        ({"agreement": "high", "agreement_level": 1.5}, "agreement_level"),
        ({"agreement": "high", "tie_word_embeddings": True}, "untied"),
        ({"full_attention_interval": 1}, "full_attention_interval"),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads"),
        ({"dtype": "int8"}, "dtype"),
    ],
)
def test_bad_specs_are_rejected_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        CheckpointSpec(**fields)


def test_unknown_preset_names_the_choices():
    with pytest.raises(KeyError, match="dense-hf"):
        preset("dense-hff")


@pytest.mark.parametrize("name", ["dense-hf", "moe-hf", "dense-tied", "dense-high"])
def test_parameter_count_matches_the_real_model(name):
    spec = PRESETS[name]
    model = _instantiate(spec)
    main = sum(v.size for _, v in tree_flatten(model.parameters()))
    head = sum(
        v.size for _, v in tree_flatten(ReferenceMTP(model.language_model.args).parameters())
    )
    assert count_parameters(spec, include_mtp=False) == main
    assert count_parameters(spec) == main + head


def test_presets_vary_the_hybrid_pattern_and_bench_spec_is_250_to_300m():
    assert {s.full_attention_interval for s in PRESETS.values()} >= {2, 3, 4}
    spec = bench_spec()
    assert spec.dtype == "float32" and spec.arch == "dense"
    assert 250e6 <= count_parameters(spec, include_mtp=False) <= 300e6
    assert bench_spec(agreement_level=0.3).agreement_level == 0.3
