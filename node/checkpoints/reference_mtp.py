"""A small reference Qwen3.5 MTP head, used to build and to check the tiny checkpoints.

This is test and benchmark support, not the production drafter (that lives in
``node.inference.mtp``). It follows the head's semantics exactly:

    e = pre_fc_norm_embedding(embed(tok[t+1]))        # shared embedding of the main model
    h = pre_fc_norm_hidden(hidden[t])                 # main model's post-final-norm hidden
    x = fc(concat([e, h], -1))                        # Linear 2D -> D, no bias, embedding first
    x = layers[0](x, mask, cache)                     # one FULL-attention decoder layer, own KV cache
    out = norm(x)                                     # mtp.norm; logits = shared lm_head(out)

A chained draft (K > 1) feeds ``out`` back as the hidden together with the drafted token.
Parameter names are those of the MLX layout with the ``language_model.mtp.`` prefix removed
(``fc.weight``, ``layers.0.self_attn.q_proj.weight``, ``layers.0.mlp.switch_mlp.gate_proj.weight``,
absolute RMSNorm scales).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.models.qwen3_5 import DecoderLayer, TextModelArgs

# Norm scales the HF layout stores as offsets from 1 (stored = scale - 1), relative to ``mtp.``.
MTP_OFFSET_NORM_SUFFIXES = (
    "pre_fc_norm_embedding.weight",
    "pre_fc_norm_hidden.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "q_norm.weight",
    "k_norm.weight",
)


def is_mtp_offset_norm(name: str) -> bool:
    """True for MTP tensor names (``mtp.``-relative or not) whose HF value is an offset."""
    return name.endswith(MTP_OFFSET_NORM_SUFFIXES) or name in ("norm.weight", "mtp.norm.weight")


class ReferenceMTP(nn.Module):
    def __init__(self, args: TextModelArgs):
        super().__init__()
        d = args.hidden_size
        self.pre_fc_norm_embedding = nn.RMSNorm(d, eps=args.rms_norm_eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(d, eps=args.rms_norm_eps)
        self.fc = nn.Linear(2 * d, d, bias=False)
        # Any index with (i + 1) % interval == 0 makes mlx-lm build a full-attention layer.
        self.layers = [DecoderLayer(args, layer_idx=args.full_attention_interval - 1)]
        self.norm = nn.RMSNorm(d, eps=args.rms_norm_eps)

    def __call__(
        self, hidden: mx.array, next_embeddings: mx.array, cache: KVCache | None = None
    ) -> mx.array:
        e = self.pre_fc_norm_embedding(next_embeddings)
        h = self.pre_fc_norm_hidden(hidden)
        x = self.fc(mx.concatenate([e, h], axis=-1))
        mask = create_attention_mask(x, cache)
        x = self.layers[0](x, mask=mask, cache=cache)
        return self.norm(x)


def text_args(model: nn.Module) -> TextModelArgs:
    return model.language_model.args


def lm_head_logits(model: nn.Module, hidden: mx.array) -> mx.array:
    """The main model's shared LM head (or tied embedding) applied to ``hidden``."""
    lm = model.language_model
    if lm.args.tie_word_embeddings:
        return lm.model.embed_tokens.as_linear(hidden)
    return lm.lm_head(hidden)


# --- reading the MTP weights back out of each layout (mirrors the documented conventions) ---


def _load_tensors(path: Path, prefix: str) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for file in sorted(path.glob("*.safetensors")):
        for name, value in mx.load(str(file)).items():
            if name.startswith(prefix):
                out[name[len(prefix) :]] = value
    return out


def hf_mtp_to_mlx(tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    """``mtp.``-relative HF tensors (offset norms, fused experts) -> MLX conventions."""
    out: dict[str, mx.array] = {}
    for name, value in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name.removesuffix("experts.gate_up_proj")
            mid = value.shape[-2] // 2
            out[base + "switch_mlp.gate_proj.weight"] = value[..., :mid, :]
            out[base + "switch_mlp.up_proj.weight"] = value[..., mid:, :]
        elif name.endswith("mlp.experts.down_proj"):
            out[name.removesuffix("experts.down_proj") + "switch_mlp.down_proj.weight"] = value
        elif is_mtp_offset_norm(name):
            out[name] = value + 1.0
        else:
            out[name] = value
    return out


def load_reference_mtp(checkpoint: Path, model: nn.Module) -> ReferenceMTP:
    """Build the reference head from whichever layout ``checkpoint`` has.

    Raises FileNotFoundError for a stripped checkpoint (no MTP tensors anywhere).
    """
    checkpoint = Path(checkpoint)
    mtp = ReferenceMTP(text_args(model))
    if (checkpoint / "mtp.safetensors").exists():
        weights = hf_mtp_to_mlx(
            {
                k.removeprefix("mtp."): v
                for k, v in mx.load(str(checkpoint / "mtp.safetensors")).items()
            }
        )
    elif mlx_weights := _load_tensors(checkpoint, "language_model.mtp."):
        weights = mlx_weights
        config = json.loads((checkpoint / "config.json").read_text())
        if quant := config.get("quantization"):
            per_path = {
                k.removeprefix("language_model.mtp."): v
                for k, v in quant.items()
                if k.startswith("language_model.mtp.")
            }

            def predicate(path: str, module: nn.Module) -> bool | dict:
                if f"{path}.scales" not in weights:
                    return False
                return per_path.get(path, True)

            nn.quantize(mtp, quant["group_size"], quant["bits"], class_predicate=predicate)
    elif hf_weights := _load_tensors(checkpoint, "mtp."):
        weights = hf_mtp_to_mlx(hf_weights)
    else:
        raise FileNotFoundError(f"no MTP tensors in {checkpoint}")
    mtp.load_weights(list(weights.items()), strict=True)
    mx.eval(mtp.parameters())
    return mtp


# --- measuring greedy agreement between the head's drafts and the target ---


@dataclass(frozen=True)
class AgreementReport:
    """Greedy agreement of a head with its target over one generated sequence.

    ``per_depth[j]`` is the acceptance rate of the (j+1)-th chained draft given that all the
    earlier drafts of the same chain were right (the per-draft acceptance of speculative
    decoding); ``tokens`` is the target's greedy sequence (prompt excluded).
    """

    per_depth: list[float]
    counts: list[int]
    tokens: list[int]

    @property
    def first(self) -> float:
        return self.per_depth[0]

    @property
    def overall(self) -> float:
        """Accepted drafts / proposed drafts over every depth."""
        accepted = sum(r * n for r, n in zip(self.per_depth, self.counts, strict=True))
        return accepted / max(1, sum(self.counts))

    @property
    def distinct_tokens(self) -> int:
        return len(set(self.tokens))

    @property
    def period(self) -> int | None:
        """Smallest p such that the second half of ``tokens`` repeats with period p."""
        tail = self.tokens[len(self.tokens) // 2 :]
        for p in range(1, len(tail)):
            if all(tail[i] == tail[i + p] for i in range(len(tail) - p)):
                return p
        return None


def greedy_generate(model: nn.Module, prompt: list[int], n_tokens: int) -> list[int]:
    """Plain greedy decoding with the target's own caches."""
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache=cache)
    out: list[int] = []
    for _ in range(n_tokens):
        tok = int(mx.argmax(logits[0, -1]).item())
        out.append(tok)
        logits = model(mx.array([[tok]]), cache=cache)
    return out


def measure_agreement(
    model: nn.Module, mtp: ReferenceMTP, prompt: list[int], n_tokens: int = 48, depth: int = 4
) -> AgreementReport:
    """Per-draft greedy acceptance of ``mtp`` for chains of up to ``depth`` drafts.

    The target's greedy sequence s is generated first (exact speculative decoding reproduces
    it). At every position t of the generated part the head, whose KV cache holds the true
    entries (hidden[i], s[i+1]) for i < t, drafts d1 = head(hidden[t], s[t+1]), then
    d_j = head(out_{j-1}, d_{j-1}); draft j is accepted when d1..dj equal s[t+2..t+j+1].
    """
    generated = greedy_generate(model, prompt, n_tokens)
    seq = prompt + generated
    lm = model.language_model
    hidden = lm.model(mx.array([seq]))  # post-final-norm hidden states of the target
    embed = lm.model.embed_tokens

    # One teacher-forced pass gives the head's KV entries for every position.
    full_cache = KVCache()
    mtp(hidden[:, :-1], embed(mx.array([seq[1:]])), cache=full_cache)
    keys, values = full_cache.keys, full_cache.values
    mx.eval(keys, values)

    accepted = np.zeros(depth, dtype=np.int64)
    proposed = np.zeros(depth, dtype=np.int64)
    start = len(prompt) - 1  # hidden[start] predicts the first generated token
    for t in range(start, len(seq) - 2):
        cache = KVCache()
        if t > 0:
            cache.update_and_fetch(keys[:, :, :t], values[:, :, :t])
        h = hidden[:, t : t + 1]
        tok = seq[t + 1]
        for j in range(depth):
            target_pos = t + 2 + j
            if target_pos >= len(seq):
                break
            out = mtp(h, embed(mx.array([[tok]])), cache=cache)
            draft = int(mx.argmax(lm_head_logits(model, out)[0, -1]).item())
            proposed[j] += 1
            if draft != seq[target_pos]:
                break
            accepted[j] += 1
            h, tok = out, draft
    rates = [float(a / p) if p else 0.0 for a, p in zip(accepted, proposed, strict=True)]
    return AgreementReport(per_depth=rates, counts=[int(p) for p in proposed], tokens=generated)
