"""Deterministic weights for a tiny Qwen3.5 model and its MTP head, in MLX conventions.

The model is mlx-lm's own ``qwen3_5`` / ``qwen3_5_moe`` ``Model`` built from the spec's config,
so every parameter name and shape is the real architecture's. Each tensor is drawn from a numpy
Generator seeded by (spec.seed, crc32(name)), so a tensor does not change when another is added.

"random": projections ~N(0, 1/fan_in), full-strength token mixers, depth-scaled MLPs, RMS-1
embeddings (0.1 when tied), so greedy generations stay varied.

Constructed agreement (``spec.agreement`` other than "random"):

* Embedding rows are random unit directions scaled to RMS 1. The LM head maps the direction of
  token ``a`` to token ``sigma(a)``: row ``sigma(a)`` of lm_head is ``LOGIT_SCALE * unit(E[a])``,
  where sigma is one random cycle through every ordinary token. Rows of special/added tokens are
  zero, so constructed targets never pick them greedily.
* MLP / expert outputs (down_proj) are small, so the token-only part of the model does not
  remap sigma. Token-mixer outputs (attention o_proj, GatedDeltaNet out_proj) are calibrated at
  build time (``calibrate_mixer_scale``): the largest scale on a 2**(k/16) grid at which the
  target still follows sigma on ``TARGET_CONSISTENCY`` of a probe sequence - 0.99 for
  "high"/"none" (context rarely moves the choice, but does change the logits), 0.6 for "partial"
  (context the head cannot see often moves it: agreement is history-dependent, not per token id).
  ``spec.mixer_scale`` skips the calibration (bench_spec does: a dozen forwards of a big model).
* The head's fc passes the embedding half through a matrix ``A`` (and the hidden half through
  a small random matrix), its decoder layer's outputs are small, so the head predicts
  ``sigma(next token)`` - exactly what the target will do unless context moves it. ``A = I`` for
  "high"/"partial", ``A = -I`` for "none" (the head then predicts the token the target is least
  likely to choose), and ``A = cos(theta) I + sin(theta) R`` (R a random rotation) when
  ``agreement_level`` is set: theta is calibrated so that the head maps ``agreement_level`` of
  the ordinary tokens to sigma(token), i.e. measured agreement ~= level x target consistency.
* "alternating": ``A`` is solved (least squares) so that the head maps the tokens of
  ``agreeing_tokens`` (alternate blocks of ``agreement_block`` tokens along sigma's cycle) to
  sigma(token) and every other token to its opposite ("none"): the target's greedy text walks
  the cycle, so it spends ``agreement_block`` tokens where drafts are accepted, then as many
  where they are rejected, and so on.  Exact when hidden_size >= the ordinary vocabulary (the
  embeddings are then linearly independent): the bench model (hidden 1024, 512 tokens).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3_5, qwen3_5_moe
from mlx_lm.models.qwen3_5 import TextModelArgs

from node.checkpoints.config import model_config
from node.checkpoints.reference_mtp import ReferenceMTP
from node.checkpoints.spec import CheckpointSpec
from node.checkpoints.tokenizer import special_token_ids

LOGIT_SCALE = 1.5
# Norm scales are 1 + k/128 (|k| <= 12): exactly representable in bf16/fp16/fp32, and so is
# scale - 1, so the HF offsets round-trip bit-exactly through mlx-lm's "+1" in sanitize.
NORM_JITTER_STEPS = 12
NORM_JITTER_UNIT = 1.0 / 128


# Constructed targets: MLP / expert outputs stay small (a token-only function would just remap
# sigma), token-mixer outputs are calibrated so the target follows sigma on this fraction of a
# probe sequence ("high"/"none": rarely leaves it; "partial": context often moves it).
TARGET_CONSISTENCY: dict[str, float] = {
    "high": 0.99,
    "none": 0.99,
    "partial": 0.6,
    "alternating": 0.99,
}
# Grid steps taken back from the calibrated scale (4 steps = /2**0.25): "high" must stay > 0.95
# on any prompt, and a 128-token probe is a noisy estimate of that.
SAFETY_STEPS: dict[str, int] = {"high": 4, "none": 4, "partial": 0, "alternating": 4}
_CONSTRUCTED_MLP_SCALE = 0.05
# Mixer scales are searched on the grid 2**(k/16), k in [_SCALE_GRID_LOW, _SCALE_GRID_HIGH].
_SCALE_GRID_LOW, _SCALE_GRID_HIGH = -32, 48
_PROBE_LENGTH = 128
_TIED_EMBED_STD = 0.1
_RANDOM_MIXER_SCALE = 1.0
# The MTP decoder layer's outputs: small, non-zero so the head's own KV cache matters a bit.
_MTP_LAYER_SCALES = (0.05, 0.03)
_MTP_HIDDEN_HALF_SCALE = 0.05

_OUTPUT_PROJECTIONS = ("o_proj.weight", "out_proj.weight", "down_proj.weight")
_MIXER_OUTPUTS = ("o_proj.weight", "out_proj.weight")


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _fan_in(shape: tuple[int, ...]) -> int:
    return shape[-1]


def _norm_scale(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    steps = rng.integers(-NORM_JITTER_STEPS, NORM_JITTER_STEPS + 1, size=shape)
    return (1.0 + steps * NORM_JITTER_UNIT).astype(np.float32)


def _unit_rows(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((rows, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _is_norm(name: str) -> bool:
    """RMSNorm scales: input/post_attention layernorms, q/k norms, final and MTP norms."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and "norm" in parts[-2]


def _generic_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Init by role: norms ~1, GatedDeltaNet decay params, projections ~N(0, 1/fan_in).

    Output projections get their per-construction scale later (``_scale_outputs``).
    """
    if _is_norm(name):
        return _norm_scale(rng, shape)
    if name.endswith("A_log"):
        return np.log(rng.uniform(1.0, 16.0, size=shape)).astype(np.float32)
    if name.endswith("dt_bias"):
        return rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
    if name.endswith("conv1d.weight"):  # MLX (C, K, 1)
        return _normal(rng, shape, 1.0 / math.sqrt(shape[1]))
    return _normal(rng, shape, 1.0 / math.sqrt(_fan_in(shape)))


def _scale_outputs(
    values: dict[str, np.ndarray], mixer_scale: float, mlp_scale: float
) -> dict[str, np.ndarray]:
    """Scale the token mixers' (o_proj, out_proj) and the MLPs' (down_proj) output weights."""
    scaled = dict(values)
    for name, value in values.items():
        if name.endswith(_MIXER_OUTPUTS):
            scaled[name] = value * np.float32(mixer_scale)
        elif name.endswith(_OUTPUT_PROJECTIONS):
            scaled[name] = value * np.float32(mlp_scale)
    return scaled


def _fill(
    module: nn.Module,
    seed: int,
    prefix: str,
    make: Callable[[str, tuple[int, ...], np.random.Generator], np.ndarray],
) -> dict[str, np.ndarray]:
    """One tensor per parameter of ``module``, seeded by (seed, crc32(prefix + name))."""
    return {
        name: make(name, tuple(param.shape), _rng(seed, prefix + name))
        for name, param in tree_flatten(module.parameters())
    }


def sigma_cycle(spec: CheckpointSpec) -> np.ndarray:
    """sigma as an array: sigma[a] is the token the constructed target says after token a.

    One cycle through every ordinary token; special tokens map to themselves (never produced).
    """
    vocab = spec.vocab_size
    specials = set(special_token_ids())
    ordinary = np.array([t for t in range(vocab) if t not in specials])
    order = _rng(spec.seed, "sigma").permutation(ordinary)
    sigma = np.arange(vocab)
    sigma[order] = np.roll(order, -1)
    return sigma


def agreeing_tokens(spec: CheckpointSpec) -> np.ndarray:
    """Ordinary tokens whose next token an "alternating" head predicts right: positions
    0..block-1, 2*block..3*block-1, ... of sigma's cycle."""
    assert spec.agreement_block is not None
    specials = set(special_token_ids())
    ordinary = np.array([t for t in range(spec.vocab_size) if t not in specials])
    order = _rng(spec.seed, "sigma").permutation(ordinary)  # sigma_cycle's order
    positions = np.arange(len(order))
    return np.sort(order[(positions // spec.agreement_block) % 2 == 0])


def _cast(spec: CheckpointSpec, name: str, value: np.ndarray) -> mx.array:
    array = mx.array(value)
    if name.endswith("A_log"):  # mlx-lm's cast_predicate keeps A_log in float32
        return array
    return array.astype(getattr(mx, spec.dtype))


def _random_scales(spec: CheckpointSpec) -> tuple[float, float]:
    """Random init: full-strength token mixers, depth-scaled MLPs.

    Weaker mixers leave the next token a function of the current one, and greedy decoding of
    a random function falls into short cycles; strong mixers keep generations varied.
    """
    return _RANDOM_MIXER_SCALE, 1.0 / math.sqrt(2 * spec.num_hidden_layers)


def _instantiate(spec: CheckpointSpec) -> nn.Module:
    module = qwen3_5_moe if spec.arch == "moe" else qwen3_5
    return module.Model(module.ModelArgs.from_dict(model_config(spec)))


def _load(spec: CheckpointSpec, module: nn.Module, values: dict[str, np.ndarray]) -> None:
    module.load_weights([(k, _cast(spec, k, v)) for k, v in values.items()], strict=True)
    mx.eval(module.parameters())


def build_model(spec: CheckpointSpec) -> nn.Module:
    """mlx-lm's Model for the spec with the spec's deterministic weights (unquantized)."""
    model = _instantiate(spec)
    model.eval()
    values = _fill(model, spec.seed, "", _generic_tensor)
    _construct_embeddings(spec, values)
    if spec.agreement == "random":
        _load(spec, model, _scale_outputs(values, *_random_scales(spec)))
    else:
        mixer_scale = spec.mixer_scale or calibrate_mixer_scale(spec, model, values)
        _load(spec, model, _scale_outputs(values, mixer_scale, _CONSTRUCTED_MLP_SCALE))
    return model


def probe_sequence(spec: CheckpointSpec) -> list[int]:
    """Ordinary tokens that follow sigma with random jumps, like the constructed target's output.

    Jumps happen as often as the target is meant to leave sigma, so the probe's contexts look
    like the generated text the consistency is calibrated for.
    """
    rng = _rng(spec.seed, "probe")
    jump_probability = 1.0 - TARGET_CONSISTENCY.get(spec.agreement, 1.0)
    sigma = sigma_cycle(spec)
    ordinary = np.setdiff1d(np.arange(spec.vocab_size), special_token_ids())
    seq = [int(rng.choice(ordinary))]
    while len(seq) < _PROBE_LENGTH:
        jump = rng.random() < jump_probability
        seq.append(int(rng.choice(ordinary)) if jump else int(sigma[seq[-1]]))
    return seq


def sigma_consistency(spec: CheckpointSpec, model: nn.Module, tokens: list[int]) -> float:
    """Fraction of positions where the target's greedy next token is sigma(current token)."""
    logits = model(mx.array([tokens]))
    predicted = np.array(mx.argmax(logits[0], axis=-1))
    return float(np.mean(predicted == sigma_cycle(spec)[np.array(tokens)]))


def calibrate_mixer_scale(
    spec: CheckpointSpec, model: nn.Module, values: dict[str, np.ndarray]
) -> float:
    """Largest grid scale of the token mixers' outputs keeping sigma-consistency >= target.

    Consistency falls as the mixers (attention, GatedDeltaNet) grow; bisection over the grid
    2**(k/16) keeps the result stable against tiny float differences between machines.
    """
    target = TARGET_CONSISTENCY[spec.agreement]
    probe = probe_sequence(spec)

    def consistent(k: int) -> bool:
        _load(spec, model, _scale_outputs(values, 2.0 ** (k / 16), _CONSTRUCTED_MLP_SCALE))
        return sigma_consistency(spec, model, probe) >= target

    lo, hi = _SCALE_GRID_LOW, _SCALE_GRID_HIGH
    if not consistent(lo):
        raise ValueError(f"cannot construct agreement={spec.agreement!r} for {spec.name()}")
    if consistent(hi):
        lo = hi
    while hi - lo > 1:  # invariant: consistent(lo), not consistent(hi)
        mid = (lo + hi) // 2
        if consistent(mid):
            lo = mid
        else:
            hi = mid
    return 2.0 ** ((lo - SAFETY_STEPS[spec.agreement]) / 16)


def _construct_embeddings(spec: CheckpointSpec, values: dict[str, np.ndarray]) -> None:
    embed_key = "language_model.model.embed_tokens.weight"
    vocab, dim = values[embed_key].shape
    if spec.agreement == "random":
        # A tied head scores tokens against the residual stream, which a large embedding would
        # dominate: the model would echo its input token forever. Keep it small then.
        std = _TIED_EMBED_STD if spec.tie_word_embeddings else 1.0
        values[embed_key] = _normal(_rng(spec.seed, embed_key), (vocab, dim), std)
        if not spec.tie_word_embeddings:
            head_key = "language_model.lm_head.weight"
            values[head_key] = _normal(
                _rng(spec.seed, head_key), (vocab, dim), 1.0 / math.sqrt(dim)
            )
        return
    unit = _unit_rows(_rng(spec.seed, embed_key), vocab, dim)
    values[embed_key] = unit * math.sqrt(dim)
    sigma = sigma_cycle(spec)
    head = np.zeros((vocab, dim), dtype=np.float32)
    specials = special_token_ids()
    ordinary = np.setdiff1d(np.arange(vocab), specials)
    head[sigma[ordinary]] = LOGIT_SCALE * unit[ordinary]
    values["language_model.lm_head.weight"] = head


def _random_rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def calibrate_theta(
    spec: CheckpointSpec,
    embed: np.ndarray,
    lm_head: np.ndarray,
    rotation: np.ndarray,
    level: float,
    embed_norm: np.ndarray,
    out_norm: np.ndarray,
) -> float:
    """Rotation angle whose head maps a ``level`` fraction of ordinary tokens a to sigma(a).

    Ignores the head's small decoder-layer and hidden-half contributions; the measured
    agreement is reported by ``measure_agreement``.
    """
    sigma = sigma_cycle(spec)
    ordinary = np.setdiff1d(np.arange(embed.shape[0]), special_token_ids())
    e = embed[ordinary] * embed_norm  # pre_fc_norm_embedding of an RMS-1 row
    # logits(theta) = cos(theta) * direct + sin(theta) * rotated: two matmuls for all angles.
    direct = (e * out_norm) @ lm_head.T
    rotated = ((e @ rotation.T) * out_norm) @ lm_head.T
    wanted = sigma[ordinary]
    best_theta, best_gap = 0.0, float("inf")
    for theta in np.linspace(0.0, math.pi / 2, 721):
        predicted = np.argmax(math.cos(theta) * direct + math.sin(theta) * rotated, axis=1)
        hit = float(np.mean(predicted == wanted))
        if abs(hit - level) < best_gap - 1e-9:
            best_theta, best_gap = float(theta), abs(hit - level)
    return best_theta


def build_mtp(spec: CheckpointSpec, model: nn.Module) -> ReferenceMTP:
    """The MTP head in MLX conventions, constructed per ``spec.agreement``."""
    args: TextModelArgs = model.language_model.args
    mtp = ReferenceMTP(args)
    mtp.eval()
    values = _fill(mtp, spec.seed, "language_model.mtp.", _generic_tensor)
    if spec.agreement == "random":
        values = _scale_outputs(values, *_random_scales(spec))
    else:
        values = _scale_outputs(values, *_MTP_LAYER_SCALES)
        values["fc.weight"] = _constructed_fc(spec, model, values)
    _load(spec, mtp, values)
    return mtp


def _alternating_embed_half(
    spec: CheckpointSpec, model: nn.Module, values: dict[str, np.ndarray]
) -> np.ndarray:
    """``A`` with ``A (e_a * w_in) = +-(e_a / w_out)``: after the head's final norm (scale
    w_out) the output points along +e_a (predicts sigma(a)) or -e_a (its opposite)."""
    embed = np.array(model.language_model.model.embed_tokens.weight.astype(mx.float32))
    ordinary = np.setdiff1d(np.arange(embed.shape[0]), special_token_ids())
    if spec.hidden_size < len(ordinary):
        raise ValueError(
            f"agreement='alternating' needs hidden_size >= {len(ordinary)} (one independent "
            f"embedding per ordinary token), got {spec.hidden_size}"
        )
    w_in = values["pre_fc_norm_embedding.weight"]
    w_out = values["norm.weight"]
    sign = np.where(np.isin(ordinary, agreeing_tokens(spec)), 1.0, -1.0)[:, None]
    x = embed[ordinary] * w_in  # [n, D]
    y = sign * embed[ordinary] / w_out
    # Minimum-norm solution of A x_a = y_a for every a: A = Y^T (X X^T)^-1 X.
    a = np.linalg.solve((x @ x.T).astype(np.float64), x.astype(np.float64)).T @ y
    return a.T.astype(np.float32)


def _constructed_fc(
    spec: CheckpointSpec, model: nn.Module, values: dict[str, np.ndarray]
) -> np.ndarray:
    dim = spec.hidden_size
    rng = _rng(spec.seed, "language_model.mtp.fc.weight")
    hidden_half = _normal(rng, (dim, dim), _MTP_HIDDEN_HALF_SCALE / math.sqrt(dim))
    if spec.agreement == "none":
        embed_half = -np.eye(dim, dtype=np.float32)
    elif spec.agreement == "alternating":
        embed_half = _alternating_embed_half(spec, model, values)
    elif spec.agreement_level is None:
        embed_half = np.eye(dim, dtype=np.float32)
    else:
        rotation = _random_rotation(_rng(spec.seed, "mtp-rotation"), dim)
        lm = model.language_model
        theta = calibrate_theta(
            spec,
            embed=np.array(lm.model.embed_tokens.weight.astype(mx.float32)),
            lm_head=np.array(lm.lm_head.weight.astype(mx.float32)),
            rotation=rotation,
            level=spec.agreement_level,
            embed_norm=values["pre_fc_norm_embedding.weight"],
            out_norm=values["norm.weight"],
        )
        embed_half = math.cos(theta) * np.eye(dim, dtype=np.float32) + math.sin(theta) * rotation
    return np.concatenate([embed_half, hidden_half], axis=1).astype(np.float32)
