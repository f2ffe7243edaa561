"""Tiny random models of every family liandan supports, built offline from transformers configs.

    from families import FAMILIES, build_family_dir
    path = build_family_dir(tmp_path / "gemma2", "gemma2")   # a model directory, ChatML template

Every model has hidden size 64 and two layers, the tests' ChatML tokenizer (conftest), and config
values that make each family's own features matter on short test sequences: sliding windows of
8 tokens, attention and final-logit soft-caps small enough to bend the scores (Gemma 2 also gets
a larger initialisation, so that its logits reach the cap), q/k/v biases,
q/k norms, Gemma's ``query_pre_attn_scalar`` and embedding scale, Phi-3's fused projections, and
a mixture of experts with 4 experts, 2 per token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import CHATML, build_tokenizer

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512)  # fmt: skip

FAMILIES: dict[str, dict] = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),  # q/k/v biases are built in
    "qwen3": dict(model_type="qwen3", head_dim=16, tie_word_embeddings=True),  # q/k RMS norms
    "mistral": dict(model_type="mistral", sliding_window=8, tie_word_embeddings=False),
    "gemma2": dict(model_type="gemma2", head_dim=16, sliding_window=8, attn_logit_softcapping=1.0,
                   final_logit_softcapping=5.0, query_pre_attn_scalar=24, initializer_range=0.2, hidden_activation="gelu_pytorch_tanh",
                   tie_word_embeddings=True),  # fmt: skip
    "gemma3_text": dict(model_type="gemma3_text", head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True),  # fmt: skip
    "phi3": dict(model_type="phi3", tie_word_embeddings=False),  # fused qkv_proj and gate_up_proj
    "qwen3_moe": dict(model_type="qwen3_moe", head_dim=16, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, norm_topk_prob=True, tie_word_embeddings=False),  # fmt: skip
}
"""Family name -> config overrides (``model_type`` picks the transformers config class)."""


def family_config(family: str, tokenizer):
    from transformers import AutoConfig

    options = dict(FAMILIES[family])
    model_type = options.pop("model_type")
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return AutoConfig.for_model(model_type, **COMMON, **ids, **options)


def build_family_dir(path: Path, family: str, seed: int = 0) -> Path:
    """Save a random ``family`` model with the ChatML test tokenizer to ``path``; returns it."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(CHATML, "<|im_end|>")
    config = family_config(family, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # Gemma's norms start at zero ("1 + weight"): give them values, so that a lost +1 shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(0.0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
