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
    """Above EAGER_MAX (here 5 tokens) an example attends in blocks of BLOCK_ROWS queries (here
    4: the 9-token example in blocks of 4, 4, 1); every example must equal its attention alone,
    values and gradients."""
    monkeypatch.setattr(attention, "EAGER_MAX", 5)
    monkeypatch.setattr(attention, "BLOCK_ROWS", 4)
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


@pytest.mark.parametrize("window,softcap,with_sinks,prefix", [(None, None, False, 0), (5, None, False, 0), (None, 0.6, True, 0),
                                                              (4, None, False, 6), (None, None, True, 3), (2, 0.9, False, 5)])  # fmt: skip
@pytest.mark.parametrize("block", [1, 3, 7, 40])
def test_blocked_causal_attention_is_causal_attention(window, softcap, with_sinks, prefix, block, monkeypatch):
    """Blocks of queries (one row, a few, and more than the example), each attending only to the
    keys it may see, recomputed in backward: the same outputs and gradients as one (t x t) pass,
    with windows (whose first block's keys are cut off at the window), soft-caps, sinks and a
    shared prefix of keys before the example."""
    monkeypatch.setattr(attention, "BLOCK_ROWS", block)
    torch.manual_seed(1)
    t = 17
    q = torch.randn(1, 4, t, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, prefix + t, 8, requires_grad=True) for _ in range(2))
    sinks = torch.randn(4, requires_grad=True) if with_sinks else None
    inputs = (q, k, v) + ((sinks,) if with_sinks else ())
    want = causal_attention(q, k, v, 0.3, window, softcap, sinks, prefix=prefix)
    want_grads = torch.autograd.grad(want.square().sum(), inputs)
    got = attention.blocked_causal_attention(q, k, v, 0.3, window, softcap, sinks, prefix=prefix)
    got_grads = torch.autograd.grad(got.square().sum(), inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_blocked_attention_keeps_no_probabilities_and_replays_its_dropout(monkeypatch):
    """Each block is checkpointed: backward recomputes its probabilities (none of the (t x t)
    kind are saved), and dropout draws the same mask again, so the gradients are those of the
    forward that ran, as without checkpointing."""
    monkeypatch.setattr(attention, "BLOCK_ROWS", 4)
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, h, 10, 8, requires_grad=True) for h in (4, 2, 2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(tuple(x.shape)) or x, lambda x: x):
        out = attention.blocked_causal_attention(q, k, v, 0.3)
    # only the blocks' inputs, (1, heads, rows, 8) slices of q, k and v: no (kv_heads, rows, keys) probabilities
    assert saved and all(len(shape) == 4 and shape[-1] == 8 for shape in saved), saved
    grads = {}
    for replayed in (True, False):
        if not replayed:  # the same blocks run plainly, keeping their probabilities
            monkeypatch.setattr(attention, "checkpoint", lambda f, *args, use_reentrant: f(*args))
        torch.manual_seed(3)
        out = attention.blocked_causal_attention(q, k, v, 0.3, dropout=0.5)
        grads[replayed] = torch.autograd.grad(out.square().sum(), (q, k, v))
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b)
    torch.manual_seed(3)
    assert not torch.equal(attention.blocked_causal_attention(q, k, v, 0.3, dropout=0.5), attention.blocked_causal_attention(q, k, v, 0.3))


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
