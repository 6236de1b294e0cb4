"""What a tiny checkpoint is: the spec, its validation and cache key, presets, parameter counts."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from node.checkpoints.tokenizer import vocab_size as tokenizer_vocab_size

Arch = Literal["dense", "moe"]
Layout = Literal["hf", "mlx", "sidecar", "stripped"]
Agreement = Literal["random", "high", "partial", "none", "alternating"]
DType = Literal["float32", "bfloat16", "float16"]

# Bump whenever the builder's output changes, so cached checkpoints rebuild.
BUILDER_VERSION = 1

MODEL_TYPES: dict[str, str] = {"dense": "qwen3_5", "moe": "qwen3_5_moe"}
ARCHITECTURES: dict[str, str] = {
    "dense": "Qwen3_5ForConditionalGeneration",
    "moe": "Qwen3_5MoeForConditionalGeneration",
}


@dataclass(frozen=True)
class CheckpointSpec:
    """A tiny Qwen3.5 checkpoint. Field names follow the HF / mlx-lm config keys."""

    arch: Arch = "dense"
    layout: Layout = "hf"
    agreement: Agreement = "random"
    agreement_level: float | None = None
    # "alternating": the head agrees on blocks of this many consecutive tokens of sigma's cycle
    # and disagrees on the blocks between, so generated text moves between easy and hard.
    agreement_block: int | None = None
    # Output scale of the token mixers in constructed targets; None = calibrate at build time
    # (a dozen probe forwards: instant for tiny models, set it for big ones).
    mixer_scale: float | None = None
    num_hidden_layers: int = 4
    hidden_size: int = 64
    intermediate_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 4
    linear_key_head_dim: int = 16
    linear_value_head_dim: int = 16
    linear_conv_kernel_dim: int = 4
    full_attention_interval: int = 4
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 32
    shared_expert_intermediate_size: int = 32
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    dtype: DType = "float32"
    quant_bits: int | None = None
    quant_group_size: int = 64
    num_shards: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("arch", self.arch, Arch)
        _check_choice("layout", self.layout, Layout)
        _check_choice("agreement", self.agreement, Agreement)
        _check_choice("dtype", self.dtype, DType)
        for name in (
            "num_hidden_layers",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "linear_num_key_heads",
            "linear_num_value_heads",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_conv_kernel_dim",
            "full_attention_interval",
            "num_shards",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.full_attention_interval <= self.num_hidden_layers:
            raise ValueError(
                f"full_attention_interval must be in [2, num_hidden_layers={self.num_hidden_layers}] "
                f"(a hybrid stack with at least one full-attention layer), got "
                f"{self.full_attention_interval}"
            )
        if self.linear_conv_kernel_dim < 2:
            raise ValueError(
                "linear_conv_kernel_dim must be >= 2 (mlx-lm recognises HF conv1d weights by "
                f"their kernel axis), got {self.linear_conv_kernel_dim}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(
                f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                f"linear_num_key_heads ({self.linear_num_key_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); set head_dim"
            )
        if self.arch == "moe" and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                f"[1, num_experts={self.num_experts}]"
            )
        if self.quant_bits is not None:
            if self.quant_bits not in (2, 3, 4, 5, 6, 8):
                raise ValueError(f"quant_bits must be one of 2,3,4,5,6,8, got {self.quant_bits}")
            if self.layout == "hf":
                raise ValueError(
                    "quant_bits needs an MLX layout (mlx, sidecar, stripped); the hf layout is "
                    "full precision"
                )
        if self.agreement_level is not None:
            if not 0.0 <= self.agreement_level <= 1.0:
                raise ValueError(f"agreement_level must be in [0, 1], got {self.agreement_level}")
            if self.agreement not in ("high", "partial"):
                raise ValueError(
                    f"agreement_level dials a constructed head; use agreement='high' or "
                    f"'partial', not {self.agreement!r}"
                )
        if (self.agreement == "alternating") != (self.agreement_block is not None):
            raise ValueError(
                "agreement='alternating' needs agreement_block (tokens per block) and only it "
                f"takes one; got agreement={self.agreement!r}, "
                f"agreement_block={self.agreement_block!r}"
            )
        if self.agreement_block is not None and self.agreement_block < 1:
            raise ValueError(f"agreement_block must be >= 1, got {self.agreement_block}")
        if self.mixer_scale is not None and not self.mixer_scale > 0:
            raise ValueError(f"mixer_scale must be > 0, got {self.mixer_scale}")
        if self.agreement != "random" and self.tie_word_embeddings:
            raise ValueError(
                f"agreement={self.agreement!r} needs an untied lm_head (the construction "
                "aligns lm_head rows to a permutation of the embeddings)"
            )

    @property
    def model_type(self) -> str:
        return MODEL_TYPES[self.arch]

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return tokenizer_vocab_size()

    @property
    def is_quantized(self) -> bool:
        return self.quant_bits is not None

    def with_layout(self, layout: Layout) -> CheckpointSpec:
        return dataclasses.replace(self, layout=layout)

    def name(self) -> str:
        """A short human-readable name for cache directories and tables."""
        parts = [self.arch, self.layout, self.agreement]
        if self.agreement_level is not None:
            parts.append(f"lvl{self.agreement_level:g}")
        if self.agreement_block is not None:
            parts.append(f"blk{self.agreement_block}")
        if self.dtype != "float32":
            parts.append({"bfloat16": "bf16", "float16": "fp16"}[self.dtype])
        if self.quant_bits is not None:
            parts.append(f"q{self.quant_bits}")
        return "-".join(parts)

    def spec_key(self) -> str:
        """Hash of every field."""
        payload = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def digest(self) -> str:
        """The cache key: ``<spec_key>-<builder_key>``."""
        return f"{self.spec_key()}-{builder_key()}"


def builder_key() -> str:
    """Hash of BUILDER_VERSION and the builder's code fingerprint."""
    payload = f"{BUILDER_VERSION}/{builder_fingerprint()}"
    return hashlib.sha256(payload.encode()).hexdigest()[:8]


@functools.cache
def builder_fingerprint() -> str:
    """Hash of this package's source and the mlx / mlx-lm versions.

    Part of the cache key, so an edited builder never serves a stale cached checkpoint even if
    someone forgets to bump BUILDER_VERSION.
    """
    import mlx.core as mx
    import mlx_lm

    digest = hashlib.sha256(f"{mx.__version__}/{mlx_lm.__version__}".encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def _check_choice(field: str, value: object, literal: object) -> None:
    choices = get_args(literal)
    if value not in choices:
        raise ValueError(f"{field} must be one of {choices}, got {value!r}")


def is_full_attention(spec: CheckpointSpec, layer_idx: int) -> bool:
    """mlx-lm's rule: layer i is full attention when (i + 1) % full_attention_interval == 0."""
    return (layer_idx + 1) % spec.full_attention_interval == 0


def layer_types(spec: CheckpointSpec) -> list[str]:
    return [
        "full_attention" if is_full_attention(spec, i) else "linear_attention"
        for i in range(spec.num_hidden_layers)
    ]


def _mlp_params(spec: CheckpointSpec) -> int:
    d = spec.hidden_size
    if spec.arch == "dense":
        return 3 * d * spec.intermediate_size
    experts = spec.num_experts * 3 * d * spec.moe_intermediate_size
    shared = 3 * d * spec.shared_expert_intermediate_size
    return experts + shared + d * spec.num_experts + d  # + router + shared_expert_gate


def _attention_params(spec: CheckpointSpec) -> int:
    d, hd = spec.hidden_size, spec.resolved_head_dim
    q = d * spec.num_attention_heads * hd * 2  # queries and the output gate
    kv = 2 * d * spec.num_key_value_heads * hd
    o = spec.num_attention_heads * hd * d
    return q + kv + o + 2 * hd  # + q_norm, k_norm


def _linear_attention_params(spec: CheckpointSpec) -> int:
    d = spec.hidden_size
    key_dim = spec.linear_num_key_heads * spec.linear_key_head_dim
    value_dim = spec.linear_num_value_heads * spec.linear_value_head_dim
    conv_dim = 2 * key_dim + value_dim
    nv = spec.linear_num_value_heads
    projections = d * conv_dim + d * value_dim + 2 * d * nv + value_dim * d
    return (
        projections + conv_dim * spec.linear_conv_kernel_dim + 2 * nv + spec.linear_value_head_dim
    )


def count_parameters(spec: CheckpointSpec, *, include_mtp: bool = True) -> int:
    """Exact parameter count of the unquantized model (and its MTP head)."""
    d, v = spec.hidden_size, spec.vocab_size
    total = v * d + d  # embedding + final norm
    if not spec.tie_word_embeddings:
        total += v * d
    for i in range(spec.num_hidden_layers):
        mixer = (
            _attention_params(spec)
            if is_full_attention(spec, i)
            else _linear_attention_params(spec)
        )
        total += mixer + _mlp_params(spec) + 2 * d
    if include_mtp:
        total += 2 * d * d + 3 * d + _attention_params(spec) + _mlp_params(spec) + 2 * d
    return total


def _preset(**fields: object) -> CheckpointSpec:
    return CheckpointSpec(**fields)  # type: ignore[arg-type]


def _build_presets() -> dict[str, CheckpointSpec]:
    presets: dict[str, CheckpointSpec] = {}
    # The same dense model in every layout (full attention every 4th layer), and the same
    # MoE model in every layout (every 2nd layer), so layouts can be compared logit for logit.
    for layout in ("hf", "mlx", "sidecar", "stripped"):
        presets[f"dense-{layout}"] = _preset(arch="dense", layout=layout, seed=1)
        presets[f"moe-{layout}"] = _preset(
            arch="moe", layout=layout, full_attention_interval=2, seed=2
        )
    presets["dense-mlx-q4"] = _preset(arch="dense", layout="mlx", quant_bits=4, seed=1)
    presets["dense-sidecar-q4"] = _preset(arch="dense", layout="sidecar", quant_bits=4, seed=1)
    presets["moe-mlx-q4"] = _preset(
        arch="moe", layout="mlx", quant_bits=4, full_attention_interval=2, seed=2
    )
    presets["dense-hf-bf16"] = _preset(arch="dense", layout="hf", dtype="bfloat16", seed=1)
    presets["dense-mlx-bf16"] = _preset(arch="dense", layout="mlx", dtype="bfloat16", seed=1)
    presets["dense-tied"] = _preset(arch="dense", layout="hf", tie_word_embeddings=True, seed=3)
    # Constructed MTP agreement; the hybrid pattern varies (interval 3 here).
    for agreement in ("high", "partial", "none"):
        presets[f"dense-{agreement}"] = _preset(
            arch="dense",
            layout="hf",
            agreement=agreement,
            num_hidden_layers=6,
            full_attention_interval=3,
            seed=4,
        )
        presets[f"moe-{agreement}"] = _preset(
            arch="moe", layout="hf", agreement=agreement, full_attention_interval=2, seed=5
        )
    # Constructed heads in the converted layouts (MTP recovery + acceptance end to end).
    for layout in ("mlx", "sidecar", "stripped"):
        presets[f"dense-high-{layout}"] = presets["dense-high"].with_layout(layout)
    presets["dense-high-mlx-q4"] = dataclasses.replace(
        presets["dense-high"], layout="mlx", quant_bits=4
    )
    presets["moe-high-mlx-q4"] = dataclasses.replace(
        presets["moe-high"], layout="mlx", quant_bits=4
    )
    presets["moe-high-sidecar"] = presets["moe-high"].with_layout("sidecar")
    return presets


def preset(name: str, **overrides: object) -> CheckpointSpec:
    """``PRESETS[name]`` with some fields replaced; a clear error for unknown names."""
    if name not in PRESETS:
        raise KeyError(f"unknown checkpoint preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)  # type: ignore[arg-type]


PRESETS: dict[str, CheckpointSpec] = _build_presets()


def bench_spec(
    params: float = 270e6, agreement_level: float = 0.8, **overrides: object
) -> CheckpointSpec:
    """A fp32 qwen3_5 spec whose main model has about ``params`` parameters (for benchmarks).

    Width is fixed (hidden 1024, 8 query heads of 128 with 2 KV heads, GatedDeltaNet 8x128 keys
    and 16x128 values, intermediate 3072; ~16.7M parameters per layer) and the number of layers
    is chosen to land closest to ``params``; the MTP head adds ~15M. The head is the constructed
    "high" head dialled to ``agreement_level`` (measured per-draft acceptance ~= the level).
    """
    base: dict[str, object] = dict(
        arch="dense",
        layout="hf",
        agreement="high",
        agreement_level=agreement_level,
        hidden_size=1024,
        intermediate_size=3072,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        linear_num_key_heads=8,
        linear_num_value_heads=16,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        full_attention_interval=4,
        max_position_embeddings=8192,
        num_shards=4,
        seed=7,
        # Fixed instead of calibrated (calibration means a dozen forwards of the big model);
        # at width 1024 the target still follows sigma on ~all steps (see the bench script).
        mixer_scale=1.0,
    )
    base.update(overrides)

    def main_params(layers: int) -> int:
        return count_parameters(_preset(**{**base, "num_hidden_layers": layers}), include_mtp=False)

    interval = int(base["full_attention_interval"])  # type: ignore[call-overload]
    layers = min(range(interval, 257), key=lambda n: abs(main_params(n) - params))
    return _preset(**{**base, "num_hidden_layers": layers})
