"""GRPO's shared-prompt rows (`collate_shared_prefixes` + `packed_attention`) compute what padded
(prompt + completion) rows compute under the model's own attention: every completion token's
log-prob and every gradient, on every family of the test matrix, and in the attention itself
against the formula with the prompt written out in front of each completion."""

from __future__ import annotations

import pytest
import torch

from families import FAMILIES, build_family_dir

from liandan import attention
from liandan.attention import PACKED, causal_attention, packed_attention, use_training_attention
from liandan.batching import collate, collate_shared_prefixes
from liandan.losses import IGNORE_INDEX
from liandan.models import load_model
from liandan.objectives import trained_token_nll


def groups_of(vocab: int, seed: int = 0) -> list[tuple[list[int], list[list[int]]]]:
    """Three prompts (one of a single token: no shared part) with 3, 2 and 2 completions of
    different lengths, long enough that the families' 8-token sliding windows cut into them."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(5, vocab, (n,), generator=g).tolist()

    return [(ids(11), [ids(4), ids(9), ids(1)]), (ids(1), [ids(6), ids(3)]), (ids(7), [ids(12), ids(2)])]


def test_the_row_layout_by_hand():
    batch = collate_shared_prefixes([([10, 11, 12], [[20, 21], [30]]), ([40], [[50]])])
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 12, 30, 40, 50]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1]]
    assert batch["targets"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 20, 21, IGNORE_INDEX, 30, IGNORE_INDEX, 50, IGNORE_INDEX]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 2, 5, 7, 9]
    assert batch["shared_prefix_of"].tolist() == [-1, 0, 0, -1]
    assert batch["completion_of"].tolist() == [0, 0, 1, 2]


@pytest.mark.parametrize("options", [{}, {"sliding_window": 3}, {"softcap": 0.8, "sliding_window": 6}, {"sinks": True}],
                         ids=["plain", "window", "softcap", "sinks"])  # fmt: skip
@pytest.mark.parametrize("eager_max", [512, 2], ids=["explicit", "blocked"])
def test_a_completion_attends_to_its_prompt_as_if_written_after_it(options, eager_max, monkeypatch):
    """Prompt p (5 tokens) shared by completions a (4) and b (3): a's outputs equal causal
    attention over p + a, b's over p + b, and the gradients of p's keys and values are the sums
    of both; EAGER_MAX 2 sends the longer examples through blocks of 2 queries, each attending
    to the prompt and its part of the completion."""
    monkeypatch.setattr(attention, "EAGER_MAX", eager_max)
    monkeypatch.setattr(attention, "BLOCK_ROWS", 2)
    torch.manual_seed(0)
    sinks = torch.randn(4) if options.pop("sinks", False) else None
    lengths = [5, 4, 3]
    q, k, v = (torch.randn(1, h, 12, 8, requires_grad=True) for h in (4, 2, 2))
    starts = torch.tensor([0, 5, 9, 12], dtype=torch.int32)
    out, _ = packed_attention(attention_module(), q, k, v, None, scaling=0.4, cu_seq_lens_q=starts,
                              shared_prefix_of=torch.tensor([-1, 0, 0]), s_aux=sinks, **options)  # fmt: skip
    got = torch.autograd.grad(out.square().sum(), (q, k, v))
    window, softcap = options.get("sliding_window"), options.get("softcap")
    qs, ks, vs = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    total = 0
    for part in (slice(0, 5), slice(5, 9), slice(9, 12)):
        keys = torch.cat([torch.arange(0, 5), torch.arange(part.start, part.stop)]) if part.start else torch.arange(0, 5)
        alone = causal_attention(qs[:, :, keys], ks[:, :, keys], vs[:, :, keys], 0.4, window, softcap, sinks)[:, -(part.stop - part.start):]
        torch.testing.assert_close(out[:, part], alone, rtol=1e-5, atol=1e-6)
        total = total + alone.square().sum()
    # atol 1e-5: blocks sum a key's gradient over several matmuls, in another order than one pass;
    # a prompt's keys or values left out, or counted once, moves gradients by ~0.1
    for a, b in zip(got, torch.autograd.grad(total, (qs, ks, vs))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert sum(lengths) == 12


def attention_module():
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2  # what packed and SDPA attention read
    return module


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, tmp_path_factory):
    return build_family_dir(tmp_path_factory.mktemp(request.param), request.param)


def test_shared_prompt_rows_equal_padded_rows_on_every_family(family_dir):
    """Log-probs of every completion token and the gradient of every weight: liandan's shared
    rows with its packed attention against padded rows with the model's own attention."""
    model, tok = load_model(str(family_dir), dtype="float32")
    model.requires_grad_(True)
    groups = groups_of(len(tok))
    rows = [{"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c} for p, cs in groups for c in cs]
    padded = collate(rows, packing=False, pad_id=tok.pad_token_id)
    nll, which = trained_token_nll(model, padded)
    nll.sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    original = use_training_attention(model, "auto", True, torch.device("cpu"))
    assert model.config._attn_implementation == PACKED
    shared = collate_shared_prefixes(groups)
    completion_of = shared.pop("completion_of")
    got_nll, _ = trained_token_nll(model, shared)
    got_nll.sum().backward()
    model.set_attn_implementation(original)
    torch.testing.assert_close(completion_of, which)
    torch.testing.assert_close(got_nll, nll, rtol=1e-5, atol=1e-5)
    for (name, p), g in zip(model.named_parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
