"""Tiny causal LMs built from configs (hidden 64, 2 layers), for the training tests. Nothing is downloaded.

Every model is fp32 and seeded, so the same call builds the same weights on every run.
"""

from __future__ import annotations

import torch

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny_model(
    arch: str = "llama", vocab_size: int = 128, *, seed: int = 0, tie: bool = False, attn: str = "eager", **overrides
):
    """A tiny fp32 `arch` model ('llama', 'qwen2', 'gemma2', 'cohere', 'granite'); `overrides` go to its config."""
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM),
        "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM),
    }[arch]
    extra = {"head_dim": 16} if arch == "gemma2" else {}
    config = config_class(vocab_size=vocab_size, tie_word_embeddings=tie, **{**SIZES, **extra, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_class(config).float()
    model.config.use_cache = False
    return model


def list_config(model_dir: str, output_dir, **fields):
    """The SFTConfig of a training test's run: `model_dir` trained on records passed to train() as a list,
    into `output_dir`, without the prepared-data cache; `fields` are the run's other settings."""
    from sftlab import SFTConfig

    return SFTConfig(model=model_dir, output_dir=str(output_dir), use_cache=False, **fields)


def save_tiny_llama(folder: str, tokenizer, seed: int = 0, tie: bool = False) -> str:
    """A tiny Llama sized for `tokenizer`, saved with it (safetensors) so `model: folder` loads it."""
    model = tiny_model("llama", vocab_size=len(tokenizer), seed=seed, attn="sdpa", tie=tie)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
