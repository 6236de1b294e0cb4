"""Model cards: what the planner must know about a model without loading it.

A card gives the bytes of every decoder layer, of the embedding (held by the first pipeline
stage) and of the final norm + LM head (held by the last), the KV cache one token costs in the
full-attention layers, the recurrent state one sequence costs in the GatedDeltaNet layers, and
the native-MTP capability. Cards ship as TOML files in ``node/placement/cards/``; cards for local
checkpoints are derived from their headers (``node.placement.checkpoint``).

TOML shorthand (expanded on load): ``layer_bytes`` may be one integer (every layer alike) or a
table keyed by layer type; ``layer_types`` may be replaced by ``full_attention_interval``.
"""

from __future__ import annotations

import re
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from node.placement.architecture import FULL, LINEAR, LayerType
from node.placement.errors import PlacementError, UnknownModelError

CARDS_DIR = Path(__file__).parent / "cards"
MAX_K_LIMIT = 8


class NativeMtpSpec(BaseModel):
    """The checkpoint's own multi-token-prediction head and how far to draft with it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    default_k: int = Field(ge=1, description="draft tokens per step by default")
    # The K policy chooses each cycle's K up to max_k (deeper only where drafts keep being
    # accepted and verify positions are cheap); 8 bounds the load-time cost measurement.
    max_k: int = Field(ge=1, le=MAX_K_LIMIT, description="largest K the policy may draft")
    num_layers: int = Field(default=1, ge=1, description="MTP decoder layers")
    head_bytes: int = Field(default=0, ge=0, description="MTP weights (the LM head is shared)")
    weights_in_checkpoint: bool | None = Field(
        default=None, description="True/False for a checkpoint on disk, None for a catalogue card"
    )

    @model_validator(mode="after")
    def _k_in_range(self) -> NativeMtpSpec:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k {self.default_k} is above max_k {self.max_k}")
        return self


class ModelCard(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1)
    source_repo: str | None = Field(
        default=None, description="the original Hugging Face repo (full precision, MTP head kept)"
    )
    conversions: list[str] = Field(
        default_factory=list,
        description="Hugging Face repos of conversions this card covers (precision from the name)",
    )
    model_type: str
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    vocab_size: int | None = None
    bytes: int = Field(ge=0, description="all weights: layers + embedding + head + MTP head")
    layer_bytes: list[int]
    layer_types: list[LayerType]
    embedding_bytes: int = Field(ge=0)
    head_bytes: int = Field(ge=0, description="final norm + lm_head (no lm_head when tied)")
    tie_word_embeddings: bool = False
    kv_bytes_per_token: int = Field(ge=0, description="all full-attention layers, one token")
    linear_state_bytes: int = Field(ge=0, description="all GatedDeltaNet layers, one sequence")
    context_length: int = Field(ge=1, description="longest context the model supports")
    bits: int = Field(ge=1, le=32, description="16 = bf16/fp16, 32 = fp32, else quantized")
    group_size: int | None = None
    native_mtp: NativeMtpSpec | None = None
    architecture: dict[str, Any] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _expand_shorthand(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        n = data.get("num_layers")
        interval = data.pop("full_attention_interval", None)
        if "layer_types" not in data and isinstance(n, int):
            if interval is None:
                data["layer_types"] = [FULL] * n
            else:
                data["layer_types"] = [
                    FULL if (i + 1) % int(interval) == 0 else LINEAR for i in range(n)
                ]
        per_layer = data.get("layer_bytes")
        if isinstance(per_layer, int) and isinstance(n, int):
            data["layer_bytes"] = [per_layer] * n
        elif isinstance(per_layer, dict) and isinstance(data.get("layer_types"), list):
            missing = set(data["layer_types"]) - set(per_layer)
            if missing:
                raise ValueError(f"layer_bytes has no entry for layer type(s) {sorted(missing)}")
            data["layer_bytes"] = [per_layer[kind] for kind in data["layer_types"]]
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        n = self.num_layers
        if len(self.layer_bytes) != n:
            raise ValueError(f"layer_bytes has {len(self.layer_bytes)} entries, num_layers is {n}")
        if len(self.layer_types) != n:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries, num_layers is {n}")
        if any(b < 0 for b in self.layer_bytes):
            raise ValueError("layer_bytes must not be negative")
        expected = sum(self.layer_bytes) + self.embedding_bytes + self.head_bytes + self.mtp_bytes
        if self.bytes != expected:
            raise ValueError(
                f"bytes is {self.bytes} but layers + embedding + head + MTP head add up to {expected}"
            )
        n_full = self.layer_types.count(FULL)
        n_linear = n - n_full
        if self.kv_bytes_per_token and (n_full == 0 or self.kv_bytes_per_token % n_full):
            raise ValueError(
                f"kv_bytes_per_token {self.kv_bytes_per_token} does not split evenly over "
                f"{n_full} full-attention layers"
            )
        if self.linear_state_bytes and (n_linear == 0 or self.linear_state_bytes % n_linear):
            raise ValueError(
                f"linear_state_bytes {self.linear_state_bytes} does not split evenly over "
                f"{n_linear} linear-attention layers"
            )
        return self

    @property
    def mtp_bytes(self) -> int:
        return self.native_mtp.head_bytes if self.native_mtp else 0

    @property
    def full_attention_layers(self) -> int:
        return self.layer_types.count(FULL)

    @property
    def linear_attention_layers(self) -> int:
        return self.layer_types.count(LINEAR)

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """KV bytes one full-attention layer caches per token (the MTP layer costs the same)."""
        n_full = self.full_attention_layers
        return self.kv_bytes_per_token // n_full if n_full else 0

    @property
    def linear_state_bytes_per_layer(self) -> int:
        n_linear = self.linear_attention_layers
        return self.linear_state_bytes // n_linear if n_linear else 0

    def weight_bytes(self, start: int, end: int) -> int:
        """Weights of decoder layers ``start`` up to (not including) ``end``."""
        return sum(self.layer_bytes[start:end])

    def kv_bytes_per_token_in(self, start: int, end: int) -> int:
        return self.layer_types[start:end].count(FULL) * self.kv_bytes_per_token_per_layer

    def linear_state_bytes_in(self, start: int, end: int) -> int:
        return self.layer_types[start:end].count(LINEAR) * self.linear_state_bytes_per_layer


# --- the shipped catalogue --------------------------------------------------------------------


def load_card_file(path: Path) -> ModelCard:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PlacementError(f"cannot read model card {str(path)!r}: {exc}") from None
    try:
        return ModelCard.model_validate(data)
    except ValidationError as exc:
        raise PlacementError(f"model card {str(path)!r} is invalid: {exc}") from None


@cache
def registry() -> dict[str, ModelCard]:
    """Shipped cards by id, read once per process."""
    cards: dict[str, ModelCard] = {}
    for path in sorted(CARDS_DIR.glob("*.toml")):
        card = load_card_file(path)
        if card.id in cards:
            raise PlacementError(f"two shipped cards share the id {card.id!r}")
        cards[card.id] = card
    return cards


def known_card_ids() -> list[str]:
    return sorted(registry())


_QUANT_SUFFIX = re.compile(r"^(?P<base>.+?)-(?:(?P<bits>[2-8])bit|(?P<half>bf16|fp16))$", re.I)


def precision_suffix(name: str) -> int | None:
    """Bits a name's ``-4bit`` / ``-8bit`` / ``-bf16`` suffix says (16 for bf16/fp16)."""
    match = _QUANT_SUFFIX.match(name)
    if match is None:
        return None
    return int(match["bits"]) if match["bits"] else 16


def find_card(name: str) -> ModelCard | None:
    """A shipped card by id, source repo or conversion repo (case-insensitive), or one
    re-derived at another precision when the name ends in ``-4bit``, ``-8bit``, ``-bf16``…
    (``Qwen3.6-27B-8bit``, ``mlx-community/Qwen3.6-27B-4bit``). A card shipped at one
    precision (``Qwen3.5-122B-A10B-4bit``) also answers to its bare name."""
    by_name: dict[str, ModelCard] = {}
    for card in registry().values():
        by_name[card.id.lower()] = card
    for card in registry().values():
        if card.source_repo:
            by_name.setdefault(card.source_repo.lower(), card)
        for repo in card.conversions:
            bits = precision_suffix(repo.rsplit("/", 1)[-1])
            by_name.setdefault(
                repo.lower(), card if bits in (None, card.bits) else requantize(card, bits)
            )
        if stem := _QUANT_SUFFIX.match(card.id):  # "X-4bit" also answers to "X"
            by_name.setdefault(stem["base"].lower(), card)
    if (card := by_name.get(name.lower())) is not None:
        return card
    match = _QUANT_SUFFIX.match(name)
    if match and (base := by_name.get(match["base"].lower())) is not None:
        bits = int(match["bits"]) if match["bits"] else 16
        return requantize(base, bits)
    return None


def get_card(name: str) -> ModelCard:
    card = find_card(name)
    if card is None:
        raise UnknownModelError(
            f"unknown model {name!r}; known cards: {', '.join(known_card_ids())} "
            "(append -4bit/-8bit/-bf16 for another precision, or pass a checkpoint directory)"
        )
    return card


# --- other precisions ---------------------------------------------------------------------------

SCALE_AND_BIAS_BITS = 32  # one bf16 scale + one bf16 bias per quantization group


def bits_per_weight(bits: int, group_size: int | None) -> float:
    """Storage bits per weight value: affine quantization adds a scale and a bias per group."""
    if bits >= 16 or not group_size:
        return float(bits)
    return bits + SCALE_AND_BIAS_BITS / group_size


def requantize(card: ModelCard, bits: int, group_size: int = 64) -> ModelCard:
    """The same model stored at ``bits`` (4, 8: affine with ``group_size``; 16: bf16).

    An approximation, on purpose: every weight byte is scaled by the ratio of bits per weight
    (``bits/16`` of the bf16 bytes plus the scales and biases, 32 bits per group). It treats
    norms, conv kernels and MoE routers as quantized too; they are under 0.1% of a model, so the
    error is far below the planner's headroom. KV cache and recurrent state are activations and
    keep their size. Use a checkpoint-derived card for exact bytes.
    """
    if not 2 <= bits <= 32:
        raise PlacementError(f"cannot re-derive a card at {bits} bits (2..32)")
    new_group = group_size if bits < 16 else None
    if bits == card.bits and new_group == card.group_size:
        return card
    ratio = bits_per_weight(bits, new_group) / bits_per_weight(card.bits, card.group_size)

    def scale(n: int) -> int:
        return round(n * ratio)

    layer_bytes = [scale(b) for b in card.layer_bytes]
    embedding, head = scale(card.embedding_bytes), scale(card.head_bytes)
    native_mtp = None
    if card.native_mtp is not None:
        native_mtp = card.native_mtp.model_copy(
            update={"head_bytes": scale(card.native_mtp.head_bytes)}
        )
    mtp = native_mtp.head_bytes if native_mtp else 0
    base_id = _QUANT_SUFFIX.match(card.id)
    stem = base_id["base"] if base_id else card.id
    suffix = f"{bits}bit" if bits < 16 else ("bf16" if bits == 16 else f"fp{bits}")
    return card.model_copy(
        update={
            "id": f"{stem}-{suffix}",
            "bits": bits,
            "group_size": new_group,
            "layer_bytes": layer_bytes,
            "embedding_bytes": embedding,
            "head_bytes": head,
            "native_mtp": native_mtp,
            "bytes": sum(layer_bytes) + embedding + head + mtp,
            "notes": [
                *card.notes,
                f"bytes scaled from the {card.id} card by {ratio:.4f} "
                f"({bits_per_weight(card.bits, card.group_size):g} -> "
                f"{bits_per_weight(bits, new_group):g} bits per weight)",
            ],
        }
    )


# --- writing cards ------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to a card")


def card_to_toml(card: ModelCard, comment: str = "") -> str:
    """A card as TOML, with the shorthand forms when they describe it exactly."""
    lines = [f"# {line}".rstrip() for line in comment.strip().splitlines()] if comment else []
    if lines:
        lines.append("")
    data = card.model_dump(exclude_none=True)
    native_mtp = data.pop("native_mtp", None)
    architecture = data.pop("architecture", {})
    notes = data.pop("notes", [])
    layer_types = data.pop("layer_types")
    layer_bytes = data.pop("layer_bytes")
    for key, value in data.items():
        lines.append(f"{key} = {_toml_value(value)}")
    interval = _interval_of(layer_types)
    if interval is not None:
        lines.append(f"full_attention_interval = {interval}")
    elif any(kind != FULL for kind in layer_types):  # all-full is the default
        lines.append(f"layer_types = {_toml_value(layer_types)}")
    by_type: dict[str, set[int]] = {}
    for kind, size in zip(layer_types, layer_bytes, strict=True):
        by_type.setdefault(kind, set()).add(size)
    if all(len(sizes) == 1 for sizes in by_type.values()):
        table = ", ".join(f"{kind} = {sizes.pop()}" for kind, sizes in sorted(by_type.items()))
        lines.append(f"layer_bytes = {{ {table} }}")
    else:
        lines.append(f"layer_bytes = {_toml_value(layer_bytes)}")
    if notes:
        lines.append(f"notes = {_toml_value(notes)}")
    if native_mtp:
        lines += ["", "[native_mtp]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in native_mtp.items()]
    if architecture:
        lines += ["", "[architecture]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in architecture.items()]
    return "\n".join(lines) + "\n"


def _interval_of(layer_types: list[str]) -> int | None:
    """The full_attention_interval that reproduces ``layer_types``, if one does."""
    n = len(layer_types)
    if all(kind == FULL for kind in layer_types):
        return None
    for interval in range(2, n + 1):
        expected = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(n)]
        if expected == layer_types:
            return interval
    return None
