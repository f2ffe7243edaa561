"""How a micro-batch becomes a loss (`liandan.objectives`), checked against numbers computed here
from the tiny model's own full logits, one sequence at a time with no padding or packing: the
SFT loss sum and its token count, the per-row reply log-probs, the LoRA (adapters off) and the
precomputed references, and the DPO loss and statistics built from them."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import PretrainedConfig
import torch.nn.functional as F

from liandan.config import SFTConfig
from liandan.encoding import encode_pair
from liandan.models import load_model
from liandan.objectives import (
    collate_pairs,
    dpo_objective,
    micro_batch_loss,
    pair_logps,
    plain_output_head,
    precompute_reference,
    reference_logps,
    sft_objective,
    trained_token_nll,
)
from liandan.prepare import attach_trainable
from liandan.preference import PreferencePair

# two examples written out by hand (ids inside the tiny model's 400-token vocabulary); trained
# targets: 42 and 8 in the first, 9 and 11 in the second, so 4 in all
SFT_EXAMPLES = [
    {"input_ids": [5, 17, 42, 8], "labels": [-100, -100, 42, 8]},
    {"input_ids": [3, 9, 11], "labels": [-100, 9, 11]},
]
PAIRS = [
    PreferencePair([{"role": "user", "content": "Is 1 a number?"}], "Yes, it is.", "I am fine, thank you.", "t:1"),
    PreferencePair([{"role": "user", "content": "What is the capital of France?"}], "Paris.", "The quick brown fox.", "t:2"),
    PreferencePair([{"role": "user", "content": "hi"}], "Hello world!", "No.", "t:3"),
]


@pytest.fixture
def loaded(chat_model_dir):
    return load_model(str(chat_model_dir), device="cpu", dtype="float32")


def encoded_pairs(tok, n=2):
    return [encode_pair(tok, p, 256) for p in PAIRS[:n]]


def lora_policy(model):
    """LoRA on every linear layer, with lora_B moved off its zero start so that the policy
    (adapters on) differs from the reference (adapters off)."""
    model = attach_trainable(model, SFTConfig(), [])
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    return model


# --- independent computations: one sequence alone through the model, plain PyTorch -----------


def own_logits(model, ids):
    """(T, V) fp32 logits of one unpadded sequence."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def summed_nll(model, example):
    """Cross-entropy of position t's logits against label t + 1, summed (-100 skipped)."""
    logits = own_logits(model, example["input_ids"])
    return F.cross_entropy(logits[:-1], torch.tensor(example["labels"][1:]), reduction="sum")


def reply_logp(model, example):
    """sum over trained labels t of log softmax(logits[t - 1])[label t]."""
    logp = own_logits(model, example["input_ids"]).log_softmax(-1)
    labels = example["labels"]
    return torch.stack([logp[t - 1, labels[t]] for t in range(1, len(labels)) if labels[t] != -100]).sum()


def all_reply_logps(model, pairs):
    """(chosen..., rejected...) as the batch orders its rows."""
    return torch.stack([reply_logp(model, p["chosen"]) for p in pairs] + [reply_logp(model, p["rejected"]) for p in pairs])


# ---------------------------------------------------------------------------------------------
# SFT


@pytest.mark.parametrize("packing", [True, False])
def test_sft_loss_is_the_summed_cross_entropy_of_the_models_own_logits(loaded, packing):
    model, tok = loaded
    objective = sft_objective(packing=packing, pad_id=tok.pad_token_id)
    assert (objective.name, objective.packing) == ("sft", packing)
    batch = objective.collate(SFT_EXAMPLES)
    loss, stats = objective.loss(model, batch)
    expected = summed_nll(model, SFT_EXAMPLES[0]) + summed_nll(model, SFT_EXAMPLES[1])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert stats == {}
    assert objective.count(batch) == 4
    assert micro_batch_loss(model, batch)[1] == 4
    torch.testing.assert_close(micro_batch_loss(model, batch)[0], expected, rtol=1e-5, atol=1e-5)


def test_sft_count_skips_the_first_token_and_padding(loaded):
    _, tok = loaded
    objective = sft_objective(packing=False, pad_id=tok.pad_token_id, name="pretrain")
    assert objective.name == "pretrain"
    # every label trained, but the first token is never a target: 3 tokens give 2 targets
    every = {"input_ids": [7, 8, 9], "labels": [7, 8, 9]}
    assert objective.count(objective.collate([every])) == 2
    # padded next to a 4-token row, the 3-token row's padding adds nothing: 2 + 2
    assert objective.count(objective.collate([every, SFT_EXAMPLES[0]])) == 4
    assert objective.count(objective.collate([{"input_ids": [7, 8], "labels": [-100, -100]}])) == 0


@pytest.mark.parametrize("packing, rows", [(False, [0, 0, 1, 1]), (True, [0, 0, 0, 0])])
def test_trained_token_nll_per_token_and_row(loaded, packing, rows):
    model, tok = loaded
    batch = sft_objective(packing, tok.pad_token_id).collate(SFT_EXAMPLES)
    nll, got_rows = trained_token_nll(model, batch)
    first, second = (own_logits(model, e["input_ids"]).log_softmax(-1) for e in SFT_EXAMPLES)
    # first: position 1 predicts 42, position 2 predicts 8; second: position 0 -> 9, 1 -> 11
    expected = -torch.stack([first[1, 42], first[2, 8], second[0, 9], second[1, 11]])
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-5)
    assert got_rows.tolist() == rows
    assert nll.dtype == torch.float32


def test_trained_token_nll_falls_back_to_logits_when_the_head_has_lora(loaded, chat_model_dir):
    model, tok = loaded
    model = attach_trainable(model, SFTConfig(lora={"target_modules": ["lm_head"]}), [])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    assert plain_output_head(model) is None
    batch = sft_objective(False, tok.pad_token_id).collate(SFT_EXAMPLES)
    loss, count = micro_batch_loss(model, batch)
    expected = summed_nll(model, SFT_EXAMPLES[0]) + summed_nll(model, SFT_EXAMPLES[1])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert count == 4
    base, _ = load_model(str(chat_model_dir), device="cpu", dtype="float32")
    assert not torch.allclose(loss, summed_nll(base, SFT_EXAMPLES[0]) + summed_nll(base, SFT_EXAMPLES[1]))


# ---------------------------------------------------------------------------------------------
# plain_output_head


class Holder:
    def __init__(self, head, **config):
        self.head = head
        self.config = PretrainedConfig(**config)

    def get_output_embeddings(self):
        return self.head


def test_plain_output_head_is_the_models_bias_free_linear_head(loaded):
    model, _ = loaded
    assert plain_output_head(model) is model.lm_head
    assert plain_output_head(SimpleNamespace(module=model)) is model.lm_head  # DDP-style wrapper
    assert plain_output_head(Holder(torch.nn.Linear(4, 6, bias=False))) is not None


def test_plain_output_head_is_none_when_the_family_scales_its_logits():
    """Cohere's logit_scale, Granite's logits_scaling: not reproduced by token_nll, so the
    model's own logits are used."""
    head = torch.nn.Linear(4, 6, bias=False)
    assert plain_output_head(Holder(head, logit_scale=0.0625)) is None
    assert plain_output_head(Holder(head, logits_scaling=8.0)) is None
    assert plain_output_head(Holder(head, logits_scaling=1.0)) is head


def test_plain_output_head_keeps_the_head_under_lora_on_the_other_layers(loaded):
    model, _ = loaded
    head = model.lm_head
    assert plain_output_head(attach_trainable(model, SFTConfig(), [])) is head


class SubclassedLinear(torch.nn.Linear):
    pass


@pytest.mark.parametrize(
    "head",
    [
        torch.nn.Linear(4, 6, bias=True),
        SubclassedLinear(4, 6, bias=False),
        torch.nn.Sequential(torch.nn.Linear(4, 6, bias=False)),
        torch.nn.Embedding(6, 4),
    ],
    ids=["bias", "subclass", "sequential", "embedding"],
)
def test_plain_output_head_refuses_anything_else(head):
    assert plain_output_head(Holder(head)) is None


# ---------------------------------------------------------------------------------------------
# DPO batches and log-probs


def test_collate_pairs_by_hand():
    pairs = [
        {"chosen": {"input_ids": [11, 12, 13], "labels": [-100, 12, 13]}, "rejected": {"input_ids": [21, 22], "labels": [-100, 22]}},
        {"chosen": {"input_ids": [31, 32], "labels": [-100, 32]}, "rejected": {"input_ids": [41, 42, 43, 44], "labels": [-100, -100, 43, 44]}},
    ]  # fmt: skip
    batch = collate_pairs(pairs, pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "targets"}
    # every chosen row first, then every rejected row
    assert batch["input_ids"].tolist() == [[11, 12, 13, 0], [31, 32, 0, 0], [21, 22, 0, 0], [41, 42, 43, 44]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["targets"].tolist() == [[12, 13, -100, -100], [32, -100, -100, -100], [22, -100, -100, -100], [-100, 43, 44, -100]]
    pairs[0]["ref_logps"] = (-1.0, -2.0)
    assert "ref_logps" not in collate_pairs(pairs, pad_id=0)  # only some pairs have one: none is used
    pairs[1]["ref_logps"] = (-3.0, -4.0)
    assert collate_pairs(pairs, pad_id=0)["ref_logps"].tolist() == [-1.0, -3.0, -2.0, -4.0]


def test_pair_logps_sum_each_replys_token_log_probs(loaded):
    model, tok = loaded
    pairs = encoded_pairs(tok)
    batch = collate_pairs(pairs, tok.pad_token_id)
    assert batch["attention_mask"].min() == 0  # the rows really are padded
    with torch.no_grad():
        got = pair_logps(model, batch)
    torch.testing.assert_close(got, all_reply_logps(model, pairs), rtol=1e-5, atol=1e-5)
    assert got.shape == (4,) and (got < 0).all()


def test_reference_logps_uses_precomputed_values_as_given():
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "ref_logps": torch.tensor([-1.5, -2.5])}
    assert reference_logps(None, batch) is batch["ref_logps"]  # no model needed


def test_lora_reference_is_the_base_models_log_probs(loaded, chat_model_dir):
    model, tok = loaded
    policy = lora_policy(model)
    pairs = encoded_pairs(tok)
    batch = collate_pairs(pairs, tok.pad_token_id)
    base, _ = load_model(str(chat_model_dir), device="cpu", dtype="float32")
    expected = all_reply_logps(base, pairs)
    got = reference_logps(policy, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not got.requires_grad
    # ...while the policy itself (adapters on) scores the replies differently
    with torch.no_grad():
        on = pair_logps(policy, batch)
    torch.testing.assert_close(on, all_reply_logps(policy, pairs), rtol=1e-5, atol=1e-5)
    assert (on - expected).abs().max() > 0.01


# ---------------------------------------------------------------------------------------------
# dpo_objective


def test_lora_dpo_loss_and_statistics_from_independent_log_probs(loaded, chat_model_dir):
    model, tok = loaded
    policy = lora_policy(model)
    pairs = encoded_pairs(tok)
    beta = 0.5
    objective = dpo_objective(tok.pad_token_id, beta=beta, label_smoothing=0.0, kind="sigmoid", sft_weight=0.0)
    assert (objective.name, objective.packing) == ("dpo", False)
    batch = objective.collate(pairs)
    assert objective.count(batch) == 2
    loss, stats = objective.loss(policy, batch)

    base, _ = load_model(str(chat_model_dir), device="cpu", dtype="float32")
    pc, pr = all_reply_logps(policy, pairs).split(2)
    rc, rr = all_reply_logps(base, pairs).split(2)
    expected = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    torch.testing.assert_close(loss, expected.sum(), rtol=1e-4, atol=1e-5)
    assert abs(loss.item() - 2 * math.log(2)) > 1e-3  # the policy is not the reference
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    torch.testing.assert_close(stats["reward_chosen"], chosen.sum(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats["reward_rejected"], rejected.sum(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats["margin"], (chosen - rejected).sum(), rtol=1e-4, atol=1e-5)
    assert stats["accuracy"].item() == float((chosen > rejected).sum())

    loss.backward()  # only the adapters learn
    grads = {name: p.grad for name, p in policy.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in name for name in grads)
    assert any(g.abs().sum() > 0 for name, g in grads.items() if "lora_A" in name)


def test_ipo_dpo_with_an_sft_term_from_independent_log_probs(loaded, chat_model_dir):
    model, tok = loaded
    policy = lora_policy(model)
    pairs = encoded_pairs(tok)
    beta, sft_weight = 0.5, 0.3
    objective = dpo_objective(tok.pad_token_id, beta=beta, label_smoothing=0.0, kind="ipo", sft_weight=sft_weight)
    with torch.no_grad():
        loss, _ = objective.loss(policy, objective.collate(pairs))
    base, _ = load_model(str(chat_model_dir), device="cpu", dtype="float32")
    pc, pr = all_reply_logps(policy, pairs).split(2)
    rc, rr = all_reply_logps(base, pairs).split(2)
    # the chosen reply's tokens, counted from its labels (the first token is never a target)
    tokens = torch.tensor([sum(label != -100 for label in p["chosen"]["labels"][1:]) for p in pairs])
    assert (tokens > 0).all()
    h = (pc - rc) - (pr - rr)
    expected = (h - 1 / (2 * beta)) ** 2 - sft_weight * pc / tokens
    torch.testing.assert_close(loss, expected.sum(), rtol=1e-4, atol=1e-5)


def test_precompute_reference_stores_the_starting_models_log_probs(loaded):
    model, tok = loaded
    model = attach_trainable(model, SFTConfig(full=True), [])  # full fine-tuning: no adapters
    pairs = encoded_pairs(tok, n=3)
    expected = [(reply_logp(model, p["chosen"]).item(), reply_logp(model, p["rejected"]).item()) for p in pairs]
    # chunks of 2 pairs: [0, 1] then [2], so a chunk's rows are (chosen..., rejected...) of its own pairs
    precompute_reference(model, pairs, tok.pad_token_id, batch_size=2)
    assert model.training  # put back in training mode for the loop
    for pair, (chosen, rejected) in zip(pairs, expected):
        assert pair["ref_logps"] == pytest.approx((chosen, rejected), rel=1e-5, abs=1e-5)

    beta = 0.5
    objective = dpo_objective(tok.pad_token_id, beta=beta, label_smoothing=0.0, kind="sigmoid", sft_weight=0.0)
    batch = objective.collate(pairs)
    assert "ref_logps" in batch
    # the untouched policy is its own reference: h = 0 for every pair, loss 3 * log 2
    loss, stats = objective.loss(model, batch)
    assert loss.item() == pytest.approx(3 * math.log(2), abs=1e-4)
    assert stats["margin"].item() == pytest.approx(0.0, abs=1e-4)

    # stored references that put every chosen reply 1 nat lower and every rejected one 1 nat
    # higher than the policy gives h = 1 - (-1) = 2: loss per pair log(1 + e^(-2 beta)) = log(1 + e^-1)
    for pair, (chosen, rejected) in zip(pairs, expected):
        pair["ref_logps"] = (chosen - 1.0, rejected + 1.0)
    loss, stats = objective.loss(model, objective.collate(pairs))
    assert loss.item() == pytest.approx(3 * math.log(1 + math.exp(-1)), abs=1e-4)
    assert loss.item() == pytest.approx(3 * 0.313262, abs=1e-4)
    assert stats["accuracy"].item() == 3.0
    assert stats["reward_chosen"].item() == pytest.approx(3 * beta * 1.0, abs=1e-4)
