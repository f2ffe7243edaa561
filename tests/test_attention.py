"""liandan's packed training attention against attention written out by hand and against the
models' own eager attention: sliding windows, soft-capping, sinks, scaling, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from liandan import attention
from liandan.attention import allowed, causal_attention, packed_attention


def by_hand(q, k, v, scaling, window=None, softcap=None, sinks=None):
    """One example, every head, loops and math only: (1, H, t, D) -> (1, t, H, D)."""
    _, heads, t, dim = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(1, t, heads, dim, dtype=torch.float64)
    for h in range(heads):
        for i in range(t):
            keys = [j for j in range(t) if j <= i and (window is None or i - j < window)]
            scores = [float(q[0, h, i] @ k[0, h // group, j]) * scaling for j in keys]
            if softcap is not None:
                scores = [softcap * math.tanh(s / softcap) for s in scores]
            extra = [float(sinks[h])] if sinks is not None else []
            top = max(scores + extra)
            weights = [math.exp(s - top) for s in scores]
            norm = sum(weights) + sum(math.exp(s - top) for s in extra)
            for w, j in zip(weights, keys):
                out[0, i, h] += w / norm * v[0, h // group, j].double()
    return out


@pytest.mark.parametrize("window,softcap,with_sinks", [(None, None, False), (3, None, False), (None, 0.5, False),
                                                       (4, 0.7, False), (None, None, True), (2, 1.0, True)])  # fmt: skip
def test_causal_attention_is_the_formula(window, softcap, with_sinks):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 7, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    sinks = torch.randn(4) if with_sinks else None
    got = causal_attention(q, k, v, 0.3, window, softcap, sinks)
    torch.testing.assert_close(got.double(), by_hand(q, k, v, 0.3, window, softcap, sinks), rtol=1e-5, atol=1e-6)


def test_a_window_as_long_as_the_example_is_plain_causal_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    assert torch.equal(causal_attention(q, k, v, 0.5, window=5), causal_attention(q, k, v, 0.5))
    assert not torch.allclose(causal_attention(q, k, v, 0.5, window=4), causal_attention(q, k, v, 0.5))
    assert allowed(4, 2, torch.device("cpu")).tolist() == [[True, False, False, False], [True, True, False, False],
                                                          [False, True, True, False], [False, False, True, True]]  # fmt: skip


class Module(torch.nn.Module):
    """What packed_attention reads from an attention module."""

    def __init__(self):
        super().__init__()
        self.num_key_value_groups = 2
        self.is_causal = True


def packed_inputs(lengths, heads=4, kv_heads=2, dim=8, seed=0):
    torch.manual_seed(seed)
    t = sum(lengths)
    q = torch.randn(1, heads, t, dim, requires_grad=True)
    k = torch.randn(1, kv_heads, t, dim, requires_grad=True)
    v = torch.randn(1, kv_heads, t, dim, requires_grad=True)
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, starts


@pytest.mark.parametrize("options", [{}, {"sliding_window": 3}, {"softcap": 0.8, "sliding_window": 4}], ids=["plain", "window", "softcap"])
def test_long_and_short_examples_of_a_packed_row_match_each_example_alone(options, monkeypatch):
    """Above EAGER_MAX (here 5 tokens) an example goes through SDPA (with a window mask) unless
    soft-capping asks for the explicit path; every example must equal its attention alone, values
    and gradients."""
    monkeypatch.setattr(attention, "EAGER_MAX", 5)
    lengths = [4, 9, 6]
    q, k, v, starts = packed_inputs(lengths)
    out, _ = packed_attention(Module(), q, k, v, None, scaling=0.4, cu_seq_lens_q=starts, **options)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    offset = 0
    for n in lengths:
        part = slice(offset, offset + n)
        qs, ks, vs = (x.detach()[:, :, part].clone().requires_grad_(True) for x in (q, k, v))
        alone = causal_attention(qs, ks, vs, 0.4, options.get("sliding_window"), options.get("softcap"))
        torch.testing.assert_close(out[:, part], alone, rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, torch.autograd.grad(alone.square().sum(), (qs, ks, vs))):
            torch.testing.assert_close(got[:, :, part], want, rtol=1e-4, atol=1e-6)
        offset += n


def test_an_argument_it_does_not_know_runs_the_models_own_eager_attention_once_said(capsys):
    """A module passing an attention argument liandan does not reproduce gets its own
    `eager_attention_forward` per example (here Llama's, with an extra argument it ignores)."""
    from transformers.models.llama import modeling_llama

    class LlamaLike(Module):
        pass

    LlamaLike.__module__ = modeling_llama.__name__
    attention._warned.discard("LlamaLike")
    q, k, v, starts = packed_inputs([5, 3])
    out, _ = packed_attention(LlamaLike(), q, k, v, None, scaling=0.3, cu_seq_lens_q=starts, sliding_window=2, new_feature=7)
    plain, _ = packed_attention(LlamaLike(), q, k, v, None, scaling=0.3, cu_seq_lens_q=starts, sliding_window=2)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
    packed_attention(LlamaLike(), q, k, v, None, scaling=0.3, cu_seq_lens_q=starts, new_feature=7)
    err = capsys.readouterr().err
    assert err.count("new_feature") == 1 and "model's own eager attention" in err


def test_rows_without_packing_attend_causally_within_each_row():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    out, _ = packed_attention(Module(), q, k, v, None, scaling=0.25, sliding_window=3)
    for row in range(2):
        r = slice(row, row + 1)
        torch.testing.assert_close(out[r], causal_attention(q[r], k[r], v[r], 0.25, 3))
