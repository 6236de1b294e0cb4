"""config.json / generation_config.json contents for a tiny checkpoint (pure)."""

from __future__ import annotations

from node.checkpoints.spec import ARCHITECTURES, CheckpointSpec, layer_types
from node.checkpoints.tokenizer import EOS_TOKEN, PAD_TOKEN, token_id

TRANSFORMERS_VERSION = "4.57.0.dev0"


def text_config(spec: CheckpointSpec) -> dict:
    """The nested ``text_config``, shaped like Qwen3.5's (mlx-lm reads what it knows)."""
    config: dict = {
        "model_type": f"{spec.model_type}_text",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_output_gate": True,
        "dtype": spec.dtype,
        "eos_token_id": token_id(EOS_TOKEN),
        "full_attention_interval": spec.full_attention_interval,
        "head_dim": spec.resolved_head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "layer_types": layer_types(spec),
        "linear_conv_kernel_dim": spec.linear_conv_kernel_dim,
        "linear_key_head_dim": spec.linear_key_head_dim,
        "linear_num_key_heads": spec.linear_num_key_heads,
        "linear_num_value_heads": spec.linear_num_value_heads,
        "linear_value_head_dim": spec.linear_value_head_dim,
        "max_position_embeddings": spec.max_position_embeddings,
        "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False,
        "num_attention_heads": spec.num_attention_heads,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_key_value_heads": spec.num_key_value_heads,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": spec.rope_theta,
            "partial_rotary_factor": spec.partial_rotary_factor,
            "mrope_section": [11, 11, 10],
            "mrope_interleaved": True,
        },
        "tie_word_embeddings": spec.tie_word_embeddings,
        "use_cache": True,
        "vocab_size": spec.vocab_size,
    }
    if spec.arch == "dense":
        config["intermediate_size"] = spec.intermediate_size
    else:
        config.update(
            {
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "moe_intermediate_size": spec.moe_intermediate_size,
                "norm_topk_prob": True,
                "num_experts": spec.num_experts,
                "num_experts_per_tok": spec.num_experts_per_tok,
                "router_aux_loss_coef": 0.001,
                "shared_expert_intermediate_size": spec.shared_expert_intermediate_size,
            }
        )
    return dict(sorted(config.items()))


def model_config(spec: CheckpointSpec) -> dict:
    """Top-level config.json (without quantization; the writer adds that for MLX layouts)."""
    return {
        "architectures": [ARCHITECTURES[spec.arch]],
        "model_type": spec.model_type,
        "text_config": text_config(spec),
        "tie_word_embeddings": spec.tie_word_embeddings,
        "transformers_version": TRANSFORMERS_VERSION,
    }


def generation_config() -> dict:
    return {
        "eos_token_id": [token_id(EOS_TOKEN), token_id(PAD_TOKEN)],
        "pad_token_id": token_id(PAD_TOKEN),
    }
