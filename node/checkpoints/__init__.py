"""Deterministic tiny Qwen3.5 / Qwen3.5-MoE checkpoints in every real layout.

    from node.checkpoints import CheckpointSpec, ensure_checkpoint, build_checkpoint, PRESETS
    path = ensure_checkpoint(PRESETS["dense-sidecar"])      # cached build, returns the directory
    path = build_checkpoint(CheckpointSpec(arch="moe", layout="mlx", quant_bits=4), out_dir)

The model is mlx-lm's own ``qwen3_5`` ("dense") / ``qwen3_5_moe`` ("moe") ``Model`` built from the
spec's config, so architecture, parameter names and shapes are the real ones. The same spec in
different layouts is the same model: ``mlx_lm.load`` gives identical logits for all of them
(quantized MLX layouts excepted, of course).

Every checkpoint directory holds
    config.json               top-level model_type "qwen3_5" | "qwen3_5_moe", architectures
                              ["Qwen3_5ForConditionalGeneration"] | ["Qwen3_5MoeForConditionalGeneration"],
                              tie_word_embeddings, and a nested text_config (model_type
                              "qwen3_5_text" | "qwen3_5_moe_text", mtp_num_hidden_layers: 1,
                              full_attention_interval, layer_types, rope_parameters, vocab_size, ...).
                              Quantized MLX layouts add "quantization" and "quantization_config"
                              ({"group_size", "bits", "mode"} plus per-path entries, as
                              mlx_lm.convert writes them).
    model-0000N-of-0000M.safetensors + model.safetensors.index.json
                              (weight_map, metadata.total_size; "model.safetensors" if one shard)
    generation_config.json    eos_token_id [<|im_end|>, <|endoftext|>]
    tokenizer.json, tokenizer_config.json   byte-level BPE, 512 tokens, Qwen chat template
    macmesh_checkpoint.json   the spec and builder version (informational)

Layouts (``spec.layout``):

``hf`` - the original Hugging Face layout, full precision.
    Main tensors ``model.language_model.embed_tokens.weight``, ``model.language_model.layers.{i}.…``,
    ``model.language_model.norm.weight``, ``lm_head.weight`` (absent when tied).
    GatedDeltaNet ``linear_attn.conv1d.weight`` is (C, 1, K).
    RMSNorm weights are OFFSETS (stored = scale - 1) for input_layernorm,
    post_attention_layernorm, the final norm, self_attn.q_norm/k_norm - exactly the norms
    mlx-lm's sanitize adds 1 to - but NOT linear_attn.norm (the gated norm is absolute).
    MoE experts fused: ``mlp.experts.gate_up_proj`` (E, 2*I, D), gate rows first, and
    ``mlp.experts.down_proj`` (E, D, I); plus ``mlp.gate.weight``,
    ``mlp.shared_expert.{gate,up,down}_proj.weight``, ``mlp.shared_expert_gate.weight``.
    MTP (top-level ``mtp.*``, all in the LAST shard): ``mtp.fc.weight`` (D, 2D),
    ``mtp.pre_fc_norm_embedding.weight``, ``mtp.pre_fc_norm_hidden.weight``, ``mtp.norm.weight``,
    ``mtp.layers.0.{input_layernorm, post_attention_layernorm}.weight``,
    ``mtp.layers.0.self_attn.{q,k,v,o}_proj.weight``, ``mtp.layers.0.self_attn.{q,k}_norm.weight``,
    ``mtp.layers.0.mlp.{gate,up,down}_proj.weight`` (dense; 15 tensors) or the MoE names above
    under ``mtp.layers.0.mlp.`` (19 tensors). Every MTP norm is an offset (scale - 1).

``mlx`` - as ``mlx_lm.convert`` writes it (names after mlx-lm's sanitize), WITH the head:
    ``language_model.model.…``, ``language_model.lm_head.weight``, conv1d (C, K, 1), absolute
    norms, experts split into ``mlp.switch_mlp.{gate,up,down}_proj.weight`` (E, I, D)/(E, D, I).
    MTP kept in the main shards (last one) as ``language_model.mtp.…`` in the same MLX
    conventions (``language_model.mtp.layers.0.mlp.switch_mlp.…`` for MoE), quantized like the
    rest when ``quant_bits`` is set (``.weight`` uint32 + ``.scales`` + ``.biases``; the MoE
    router / shared_expert_gate at 8 bits, group 64, per mlx-lm's quant_predicate, recorded in
    config["quantization"] under ``language_model.mtp.…`` paths).

``sidecar`` - MLX-converted main shards WITHOUT the head, plus ``mtp.safetensors`` in the same
    directory holding the head exactly as the ORIGINAL HF checkpoint stores it (``mtp.*`` names,
    offset norms, fused experts, full precision, the spec's dtype). mlx_lm.load globs only
    ``model*.safetensors`` and never reads it.

``stripped`` - MLX-converted, no MTP tensors anywhere, config still says mtp_num_hidden_layers: 1.

Everywhere: GatedDeltaNet ``A_log`` stays float32 (mlx-lm's cast_predicate); other tensors use
``spec.dtype``. MoE forwards need float32 or quantized weights on MLX's CPU backend.

MTP head semantics (see ``reference_mtp``): with h_t the main model's post-final-norm hidden at t,
``x = fc(concat([pre_fc_norm_embedding(embed(tok[t+1])), pre_fc_norm_hidden(h_t)]))``, one
full-attention decoder layer with its own KV cache, ``mtp.norm``, then the shared lm_head -> logits
for tok[t+2]. Chained drafts feed the head's post-norm output back as the hidden.

Constructed agreement (``spec.agreement``; ``weights`` explains the construction). Measured
greedy per-draft acceptance with the reference head (3 prompts x 48 tokens, depths 1..4):
"random" ~0; "high" 0.99-1.00 at every depth (>= 0.95 over 8 seeds); "partial" 0.6-0.75
(0.45-0.75 over seeds; history-dependent: the target's choice depends on context the head does
not see); "none" 0.00. ``agreement_level`` in [0, 1] dials the head on top of "high" (measured
first-draft ~= level: 0 -> 0.01, 0.25 -> 0.28, 0.5 -> 0.53, 0.75 -> 0.76, 0.9 -> 0.90,
1 -> 1.00; the 283M bench_spec at 0.8 measured 0.78) or on top of "partial" (~= level x 0.6).
Constructed targets follow one long cycle sigma through the ordinary tokens (greedy period 507
unless context moves it), never emit special tokens greedily (their lm_head rows are zero), so
generations run to max_tokens; random models generate varied text (>= 40 distinct of 48).
For exactness tests of speculative decoding prefer "partial" (many rejections, history matters)
or "random"; "high" rarely rejects.
"""

from node.checkpoints.builder import (
    CACHE_ENV,
    SIDECAR_FILE,
    build_checkpoint,
    cache_root,
    cached_path,
    ensure_checkpoint,
    ensure_preset,
)
from node.checkpoints.spec import (
    BUILDER_VERSION,
    PRESETS,
    Agreement,
    Arch,
    CheckpointSpec,
    Layout,
    bench_spec,
    count_parameters,
    preset,
)

__all__ = [
    "BUILDER_VERSION",
    "CACHE_ENV",
    "PRESETS",
    "SIDECAR_FILE",
    "Agreement",
    "Arch",
    "CheckpointSpec",
    "Layout",
    "bench_spec",
    "build_checkpoint",
    "cache_root",
    "cached_path",
    "count_parameters",
    "ensure_checkpoint",
    "ensure_preset",
    "preset",
]
