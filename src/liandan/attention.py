"""Attention for packed rows where no variable-length kernel exists (CPUs).

    from liandan.attention import use_training_attention
    original = use_training_attention(model, "auto", packing=True, device=torch.device("cpu"))

A packed row holds several examples one after another; each may attend only to itself. Given
only position ids, transformers builds one (T x T) block-diagonal mask for the whole row, and
SDPA on a CPU then computes every score of the row and masks most away: the cost grows with
the square of the row, not of the examples. `packed_attention` instead runs causal SDPA on each
example's slice (``cu_seq_lens_q``, written by `liandan.batching.collate`), so attention costs
sum(len_i^2) and no mask is built. On CUDA, flash attention (``attention: flash_attention_2``)
does the same natively from the position ids.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PACKED = "liandan_packed"


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention interface: query (B, H, T, D), key/value (B, H_kv, T, D);
    returns (B, T, H, D). Without ``cu_seq_lens_q`` it is plain SDPA (padded rows, generation)."""
    starts = kwargs.pop("cu_seq_lens_q", None)
    if starts is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    lengths = starts.diff().tolist()
    outputs = []
    # split (not slicing) so that backward concatenates the slices' gradients instead of adding
    # zero-padded copies of the whole row
    for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2)):
        if q.shape[2] <= EAGER_MAX and not (dropout and module.training):
            outputs.append(causal_attention(q, k, v, scaling if scaling is not None else q.shape[-1] ** -0.5))
        else:
            outputs.append(sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)[0])
    return torch.cat(outputs, dim=1), None  # (1, T, H, D)


EAGER_MAX = 512
"""Examples up to this many tokens use `causal_attention`: on a CPU, SDPA's fused kernel is slow
in the backward pass for short sequences (65 vs 41 ms per layer for eight examples of 60 to
450 tokens, forward and backward, bf16); longer ones use SDPA, whose memory does not grow with
the square of the length."""


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention of one example as batched matmuls, each key/value head with its group
    of query heads. query (1, H, t, D), key/value (1, H_kv, t, D); returns (1, t, H, D).
    The scale and the causal mask are folded into one ``baddbmm``."""
    _, heads, t, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    grouped = query.reshape(kv_heads, groups * t, dim)  # (H_kv, g*t, D)
    bias = causal_bias(t, groups, query.dtype, query.device)  # (g*t, t)
    scores = torch.baddbmm(bias, grouped, key[0].transpose(1, 2), alpha=scaling)  # (H_kv, g*t, t)
    out = torch.bmm(scores.softmax(-1), value[0])  # (H_kv, g*t, D)
    return out.view(1, heads, t, dim).transpose(1, 2)  # (1, t, H, D)


@functools.lru_cache(maxsize=64)
def causal_bias(t: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """0 where a query may attend, -inf above the diagonal; one (t, t) block per query head of a group."""
    future = torch.ones(t, t, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(t, t, dtype=dtype, device=device).masked_fill(future, float("-inf")).repeat(groups, 1)


def register() -> None:
    AttentionInterface.register(PACKED, packed_attention)


def use_training_attention(model: Any, choice: str, packing: bool, device: torch.device) -> str:
    """Set the attention implementation for training and return the model's original one (to
    put back before the model is saved or generates). ``choice`` "auto": packed rows on a CPU
    use `packed_attention`; everything else keeps the model's own."""
    inner = getattr(model, "module", model)
    original = inner.config._attn_implementation
    if choice == "auto":
        choice = PACKED if packing and device.type == "cpu" else original
    if choice == PACKED:
        register()
    if choice != original:
        inner.set_attn_implementation(choice)
    return original
