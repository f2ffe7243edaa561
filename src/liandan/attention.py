"""Attention for packed rows where no variable-length kernel exists (CPUs).

    from liandan.attention import use_training_attention
    original = use_training_attention(model, "auto", packing=True, device=torch.device("cpu"))
    ...train...
    restore_attention(model, original)

A packed row holds several examples one after another; each may attend only to itself. Given
only position ids, transformers builds one (T x T) block-diagonal mask for the whole row, and
SDPA on a CPU then computes every score of the row and masks most away: the cost grows with
the square of the row, not of the examples. `packed_attention` instead runs causal attention on
each example's slice (``cu_seq_lens_q``, written by `liandan.batching.collate`), so attention
costs sum(len_i^2) and no mask is built. An example of up to `EAGER_MAX` tokens attends in one
pass of batched matmuls (`causal_attention`); a longer one in blocks of queries, each recomputed
in backward (`blocked_causal_attention`), so that its memory grows with its length only. On
CUDA, flash attention (``attention: flash_attention_2``) does the same natively from the
position ids.

An example may also continue another one (``shared_prefix_of``, written by
`liandan.batching.collate_shared_prefixes`): GRPO's completions of one prompt each attend to the
prompt, which is in the row once, followed by each completion; the prompt is computed once
instead of once per completion, and its gradient collects every completion's.

It computes what the model's own attention module computes, for every family liandan trains:
the module's ``scaling`` (Gemma's ``query_pre_attn_scalar``), a ``sliding_window`` (Mistral,
Gemma 2/3, Qwen with sliding layers: a query sees itself and the ``window - 1`` keys before it),
logit soft-capping ``softcap * tanh(scores / softcap)`` (Gemma 2) and attention sinks ``s_aux``
(one extra logit per head that takes probability mass but has no value; gpt-oss). An argument it
does not know makes it run the model's own eager attention on each example instead, and say so
once: never a silently different function.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface

PACKED = "liandan_packed"

IGNORED = {"position_ids", "use_cache", "output_router_logits", "cu_seq_lens_k", "max_length_q", "max_length_k",
           "output_attentions", "output_hidden_states", "return_dict"}  # fmt: skip
"""Arguments a model passes through to its attention function that do not change attention."""

EAGER_MAX = 512
"""Examples up to this many tokens use `causal_attention`, which keeps their (t x t) attention
probabilities for backward: on a CPU, SDPA's fused kernel is slow in the backward pass for short
sequences (65 vs 41 ms per layer for eight examples of 60 to 450 tokens, forward and backward,
bf16). Longer ones use `blocked_causal_attention`, whose memory does not grow with the square of
the length."""

BLOCK_ROWS = 256
"""Queries per block in `blocked_causal_attention`. Measured against SDPA on one example, forward
and backward, bf16, 2 cores: 2,048 tokens with 9 / 3 heads (135M) 50 vs 101 ms, 15 / 5 (360M)
89 vs 156 ms, 32 / 8 (1.7B) 190 vs 292 ms; 8,192 tokens with 9 / 3 heads 765 vs 1,323 ms."""

_warned: set[str] = set()


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention interface: query (B, H, T, D), key/value (B, H_kv, T, D); returns
    (B, T, H, D). Each example of a packed row (``cu_seq_lens_q``), or each row of a batch without
    it (right-padded rows: padding comes after every real token, so causal attention never sees it),
    attends causally to itself."""
    starts = kwargs.pop("cu_seq_lens_q", None)
    prefix_of = kwargs.pop("shared_prefix_of", None)
    if query.shape[2] != key.shape[2]:
        raise RuntimeError("liandan's packed training attention runs whole sequences only (no cache); "
                           "generation must use the model's own attention")  # fmt: skip
    if starts is None:  # one example per row
        lengths, rows = [query.shape[2]], query.shape[0]
    else:
        lengths, rows = starts.diff().tolist(), 1
    prefixes = prefix_of.tolist() if prefix_of is not None else [-1] * (len(lengths) * rows)
    window = kwargs.pop("sliding_window", None)
    softcap = kwargs.pop("softcap", None)
    sinks = kwargs.pop("s_aux", None)
    if kwargs.get("is_causal", True) is True:  # False (bidirectional) is not what this computes
        kwargs.pop("is_causal", None)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    unknown = sorted(k for k, v in kwargs.items() if k not in IGNORED and v is not None and v is not False)
    if unknown:
        return own_attention_per_example(module, query, key, value, lengths, rows, prefixes, dropout, scaling, window,
                                         softcap, sinks, kwargs, unknown)  # fmt: skip
    dropout = dropout if module.training else 0.0
    outputs = []
    for q, k, v, prefix in with_prefixes(examples(query, key, value, lengths, rows), prefixes):
        attend = causal_attention if q.shape[2] <= EAGER_MAX else blocked_causal_attention
        outputs.append(attend(q, k, v, scaling, window, softcap, sinks, dropout, prefix))
    return joined(outputs, query), None


def examples(query, key, value, lengths: list[int], rows: int):
    """(q, k, v) of each example: ``lengths`` along the sequence of each of ``rows`` rows. Split
    (not sliced) so that backward concatenates the slices' gradients instead of adding
    zero-padded copies of the whole row."""
    for row in range(rows):
        r = slice(row, row + 1)
        yield from zip(query[r].split(lengths, 2), key[r].split(lengths, 2), value[r].split(lengths, 2))


def with_prefixes(parts, prefixes: list[int]):
    """(q, k, v, p) of each example: an example that continues example j (``prefixes[i] = j``,
    -1 for none) gets j's keys and values before its own, and p = their length."""
    parts = list(parts)
    for (q, k, v), j in zip(parts, prefixes, strict=True):
        if j < 0:
            yield q, k, v, 0
        else:
            _, k_prefix, v_prefix = parts[j]
            yield q, torch.cat([k_prefix, k], dim=2), torch.cat([v_prefix, v], dim=2), k_prefix.shape[2]


def joined(outputs: list[torch.Tensor], query: torch.Tensor) -> torch.Tensor:
    """The examples' outputs, each (1, t, H, D), back in the batch's shape (B, T, H, D)."""
    return torch.cat(outputs, dim=1).view(query.shape[0], query.shape[2], query.shape[1], query.shape[3])


def causal_attention(query, key, value, scaling: float, window: int | None = None, softcap: float | None = None,
                     sinks: torch.Tensor | None = None, dropout: float = 0.0, prefix: int = 0) -> torch.Tensor:  # fmt: skip
    """Causal attention of one example as batched matmuls, each key/value head with its group
    of query heads. query (1, H, t, D), key/value (1, H_kv, prefix + t, D); returns (1, t, H, D).
    The first ``prefix`` keys come before the example (a shared prompt): every query sees them,
    within the window.

    scores = q k^T * scaling; with ``softcap``: softcap * tanh(scores / softcap) (before the mask,
    as Gemma 2 does); masked to the causal ``window`` (a query sees the ``window - 1`` tokens before
    it and itself); with ``sinks`` (H,): one more logit per head in the softmax, whose probability
    is then dropped."""
    _, heads, t, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    grouped = query.reshape(kv_heads, groups * t, dim)  # (H_kv, g*t, D)
    window = window if window is not None and window < prefix + t else None
    bias = causal_bias(t, groups, window, query.dtype, query.device, prefix)  # (g*t, prefix + t)
    if softcap is None:  # the scale and the mask folded into one baddbmm
        scores = torch.baddbmm(bias, grouped, key[0].transpose(1, 2), alpha=scaling)  # (H_kv, g*t, prefix + t)
    else:
        scores = torch.bmm(grouped, key[0].transpose(1, 2)) * scaling
        scores = torch.tanh(scores / softcap) * softcap + bias
    if sinks is None:
        probs = scores.softmax(-1)
    else:
        sink = sinks.to(scores.dtype).view(kv_heads, groups, 1, 1).expand(kv_heads, groups, t, 1).reshape(kv_heads, groups * t, 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    if dropout:
        probs = F.dropout(probs, dropout, training=True)
    out = torch.bmm(probs, value[0])  # (H_kv, g*t, D)
    return out.view(1, heads, t, dim).transpose(1, 2)  # (1, t, H, D)


def blocked_causal_attention(query, key, value, scaling: float, window: int | None = None, softcap: float | None = None,
                             sinks: torch.Tensor | None = None, dropout: float = 0.0, prefix: int = 0) -> torch.Tensor:  # fmt: skip
    """`causal_attention` of one long example, `BLOCK_ROWS` queries at a time, with the same
    arguments and result. A block of queries at a..b attends only to the keys before b (and,
    under a ``window``, none before the window of its first query): the (t x t) scores above the
    diagonal blocks are never computed. Each block runs under activation checkpointing, so its
    probabilities are recomputed in backward instead of kept: memory grows with the length, not
    its square (a random dropout mask is replayed, as checkpointing restores the RNG state)."""
    t = query.shape[2]
    recompute = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (query, key, value, sinks))
    outputs = []
    for a in range(0, t, BLOCK_ROWS):
        b = min(a + BLOCK_ROWS, t)
        first = 0 if window is None else max(0, prefix + a - window + 1)  # the first key any query of the block sees
        block = (query[:, :, a:b], key[:, :, first : prefix + b], value[:, :, first : prefix + b], scaling, window, softcap,
                 sinks, dropout, prefix + a - first)  # fmt: skip
        outputs.append(checkpoint(causal_attention, *block, use_reentrant=False) if recompute else causal_attention(*block))
    return torch.cat(outputs, dim=1)


def allowed(t: int, window: int | None, device: torch.device, prefix: int = 0) -> torch.Tensor:
    """(t, prefix + t) bool: query i (at prefix + i) may attend key j when j <= prefix + i and
    prefix + i - j < window, as transformers' sliding-window mask (``kv_idx > q_idx - sliding_window``)."""
    distance = torch.arange(prefix, prefix + t, device=device)[:, None] - torch.arange(prefix + t, device=device)[None, :]
    ok = distance >= 0
    if window is not None:
        ok &= distance < window
    return ok


@functools.lru_cache(maxsize=64)
def causal_bias(t: int, groups: int, window: int | None, dtype: torch.dtype, device: torch.device, prefix: int = 0) -> torch.Tensor:
    """0 where a query may attend, -inf elsewhere; one (t, prefix + t) block per query head of a group."""
    bias = torch.zeros(t, prefix + t, dtype=dtype, device=device).masked_fill(~allowed(t, window, device, prefix), float("-inf"))
    return bias.repeat(groups, 1)


def own_attention_per_example(module, query, key, value, lengths, rows, prefixes, dropout, scaling, window, softcap, sinks,
                              kwargs, unknown):  # fmt: skip
    """The model's own eager attention on each example, with its causal (and windowed) mask: for
    attention arguments `packed_attention` does not reproduce."""
    name = type(module).__name__
    if name not in _warned:
        _warned.add(name)
        Console(stderr=True).print(f"[yellow]packed attention: {name} passes {', '.join(unknown)}, which liandan's packed "
                                   "attention does not reproduce; using the model's own eager attention for each example[/]")  # fmt: skip
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(f"{name}: its attention takes {', '.join(unknown)} and its module has no eager_attention_forward; "
                           "train with packing off (--set packing=false)")  # fmt: skip
    extra = {k: v for k, v in (("sliding_window", window), ("softcap", softcap), ("s_aux", sinks)) if v is not None}
    outputs = []
    for q, k, v, prefix in with_prefixes(examples(query, key, value, lengths, rows), prefixes):
        mask = torch.zeros(q.shape[2], k.shape[2], dtype=q.dtype, device=q.device)
        mask = mask.masked_fill(~allowed(q.shape[2], window, q.device, prefix), torch.finfo(q.dtype).min)[None, None]
        outputs.append(eager(module, q, k, v, mask, dropout=dropout, scaling=scaling, **extra, **kwargs)[0])
    return joined(outputs, query), None


def register() -> None:
    AttentionInterface.register(PACKED, packed_attention)


def use_training_attention(model: Any, choice: str, packing: bool, device: torch.device) -> str:
    """Set the attention implementation for training and return the model's original one (to
    put back before the model is saved or generates). ``choice`` "auto": packed rows on a CPU
    use `packed_attention`; everything else keeps the model's own. A model with bidirectional
    attention layers keeps its own (packed rows then need flash attention or a mask)."""
    inner = getattr(model, "module", model)
    original = inner.config._attn_implementation
    if original != PACKED:
        own_model(inner).liandan_own_attention = original  # for `generation_attention`
    if choice == "auto":
        causal = all(getattr(m, "is_causal", True) for m in inner.modules())
        choice = PACKED if packing and device.type == "cpu" and causal else original
    if choice == PACKED:
        register()
    if choice != original:
        inner.set_attn_implementation(choice)
    return original


def restore_attention(model: Any, original: str) -> None:
    """Undo `use_training_attention`: the model's own attention (``original``, as it returned)
    again, and the causal masks the packed attention cached while training freed (a long
    example's blocks cache one per block start: tens of MB each)."""
    model.set_attn_implementation(original)
    causal_bias.cache_clear()


def own_model(model: Any) -> Any:
    """The transformers model inside a PEFT model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def generation_attention(model: Any) -> Iterator[None]:
    """The model's own attention while it generates inside a training run (GRPO's sampling):
    liandan's packed attention runs whole sequences only, without a KV cache."""
    inner = getattr(model, "module", model)
    if inner.config._attn_implementation != PACKED:
        yield
        return
    inner.set_attn_implementation(own_model(inner).liandan_own_attention)
    try:
        yield
    finally:
        inner.set_attn_implementation(PACKED)
