"""Tiny models of the decoder-only families people fine-tune, built from configs: nothing is downloaded.

`ARCHITECTURES[name](vocab_size=128, seed=0, **overrides)` builds a seeded fp32 model (hidden 64, 4 heads,
2 layers, few experts) with `use_cache=False`; `overrides` go to its config (e.g. `output_router_logits=True`
for the MoE ones). Hybrids get one layer of each kind, so both the attention path and the recurrent path
(Mamba2, gated delta-net, short convolution) are exercised. `KINDS[name]` says which: "dense", "moe" or
"hybrid"; `RECURRENT[name]` names a hybrid's non-attention layer type.

Attention is "sdpa" where the class supports it, else "eager" (gpt-oss has no sdpa path).
"""

from __future__ import annotations

import torch

# Special-token ids inside the tiny vocabulary: several configs default to ids of the real one (151329, 128004).
HIDDEN = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_hidden_layers=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# Experts small enough to be cheap, more than one picked per token, so routing matters.
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)


def _build(config_class, model_class, vocab_size, seed, overrides, **fields):
    import transformers

    config_class = getattr(transformers, config_class)
    model_class = getattr(transformers, model_class)
    config = config_class(**{**HIDDEN, "vocab_size": vocab_size, "tie_word_embeddings": False, **fields, **overrides})
    config.use_cache = False
    config._attn_implementation = "sdpa" if model_class._supports_sdpa else "eager"
    torch.manual_seed(seed)
    model = model_class(config).float()
    model.config.use_cache = False
    return model


def _family(config_class, model_class, **fields):
    def build(vocab_size: int = 128, seed: int = 0, **overrides):
        return _build(config_class, model_class, vocab_size, seed, overrides, **fields)

    build.config_class, build.model_class = config_class, model_class
    return build


# One sliding-window layer and one global layer, windows shorter than the test rows.
SLIDING = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
# DeepSeek's multi-head latent attention: low-rank K/V (and Q for V3); no grouped K/V heads.
MLA = dict(
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    head_dim=8,
    num_key_value_heads=4,
    n_routed_experts=4,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    **MOE,
)
MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16, mamba_expand=2)

ARCHITECTURES = {
    # Dense attention.
    "llama": _family("LlamaConfig", "LlamaForCausalLM"),
    "qwen3": _family("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma3": _family("Gemma3TextConfig", "Gemma3ForCausalLM", **SLIDING),
    "olmo2": _family("Olmo2Config", "Olmo2ForCausalLM"),
    "olmo3": _family("Olmo3Config", "Olmo3ForCausalLM", **SLIDING),
    "glm4": _family("Glm4Config", "Glm4ForCausalLM"),
    "phi3": _family("Phi3Config", "Phi3ForCausalLM"),
    "cohere2": _family("Cohere2Config", "Cohere2ForCausalLM", **SLIDING),
    "smollm3": _family("SmolLM3Config", "SmolLM3ForCausalLM"),
    # num_kv_shared_layers=0: with 2 layers, a KV-sharing layer would have no earlier layer of its kind to read.
    "gemma3n": _family(
        "Gemma3nTextConfig",
        "Gemma3nForCausalLM",
        **SLIDING,
        vocab_size_per_layer_input=128,
        hidden_size_per_layer_input=16,
        laurel_rank=8,
        num_kv_shared_layers=0,
    ),
    # Mixture of experts.
    "mixtral": _family("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": _family("Qwen3MoeConfig", "Qwen3MoeForCausalLM", num_experts=4, **MOE),
    # YaRN as the released models use it, scaled so original length x factor = max_position_embeddings.
    "gpt_oss": _family(
        "GptOssConfig",
        "GptOssForCausalLM",
        num_local_experts=4,
        num_experts_per_tok=2,
        **SLIDING,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=150000.0,
            factor=32.0,
            beta_fast=32.0,
            beta_slow=1.0,
            truncate=False,
            original_max_position_embeddings=8,
        ),
    ),
    "llama4": _family(
        "Llama4TextConfig", "Llama4ForCausalLM", num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=128
    ),
    "deepseek_v3": _family("DeepseekV3Config", "DeepseekV3ForCausalLM", q_lora_rank=32, **MLA),
    "deepseek_v2": _family("DeepseekV2Config", "DeepseekV2ForCausalLM", q_lora_rank=None, **MLA),
    "glm4_moe": _family(
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        **MOE,
    ),
    # Hybrids: attention plus a layer that carries state along the sequence. Granite 4 calls its
    # Mamba2 layers "linear_attention"; its validator wants mamba_n_heads x mamba_d_head = 2 x hidden.
    "granitemoehybrid": _family(
        "GraniteMoeHybridConfig",
        "GraniteMoeHybridForCausalLM",
        layer_types=["linear_attention", "full_attention"],
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=64,
        **MAMBA2,
    ),
    "qwen3_next": _family(
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        layer_types=["linear_attention", "full_attention"],
        num_experts=4,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        shared_expert_intermediate_size=32,
        **MOE,
    ),
    "lfm2": _family("Lfm2Config", "Lfm2ForCausalLM", layer_types=["conv", "full_attention"]),
    # Falcon-H1 runs Mamba2 and attention side by side in every layer; mamba_d_ssm = 2 x hidden.
    "falcon_h1": _family("FalconH1Config", "FalconH1ForCausalLM", mamba_d_ssm=128, **MAMBA2),
    # Nemotron-H blocks are one mixer each: Mamba2, attention, or an MLP.
    "nemotron_h": _family(
        "NemotronHConfig",
        "NemotronHForCausalLM",
        layers_block_type=["linear_attention", "full_attention", "mlp"],
        mamba_num_heads=8,
        mamba_head_dim=16,
        ssm_state_size=16,
        chunk_size=16,
        expand=2,
    ),
}

KINDS = {
    **dict.fromkeys(
        ["llama", "qwen3", "gemma3", "olmo2", "olmo3", "glm4", "phi3", "cohere2", "smollm3", "gemma3n"], "dense"
    ),
    **dict.fromkeys(["mixtral", "qwen3_moe", "gpt_oss", "llama4", "deepseek_v3", "deepseek_v2", "glm4_moe"], "moe"),
    **dict.fromkeys(["granitemoehybrid", "qwen3_next", "lfm2", "falcon_h1", "nemotron_h"], "hybrid"),
}
RECURRENT = {
    "granitemoehybrid": "mamba2",
    "qwen3_next": "gated delta-net",
    "lfm2": "short convolution",
    "falcon_h1": "mamba2 beside attention",
    "nemotron_h": "mamba2",
}
