"""Every family liandan trains computes exactly what the model itself computes.

For each family of `families.FAMILIES` (tiny random models whose sliding windows, soft-caps,
biases, norms, fused projections and experts all matter on these short examples), the loss of
the first training step -- which runs liandan's packed attention, chunked output head and fused
LoRA forward -- equals the loss of the same model's own transformers forward in fp32, on the
same tokens and assistant-only labels. Then a LoRA run learns to answer and stop, and its run
directory merges to the same model and loads in plain transformers + PEFT.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import chat_row, write_jsonl
from families import FAMILIES, build_family_dir

from liandan.config import DPOConfig, PretrainConfig, SFTConfig
from liandan.data import read_examples, read_texts
from liandan.encoding import encode_all, encode_pair, text_blocks
from liandan.models import load_model, release_model
from liandan.preference import read_pairs
from liandan.train import train_dpo, train_pretrain, train_sft

TOLERANCE = 1e-5  # relative difference of first-step losses, fp32
QUESTIONS = ["What is the capital of France?", "Hello, how are you today?", "Is this a tiny test?",
             "请将这段话翻译成英文。", "The quick brown fox jumps over the lazy dog, does it not?"]  # fmt: skip
ANSWERS = ["Paris is the capital of France. Let me help with that: the capital of France is Paris.",
           "I am fine, thank you.", "Yes, this is a tiny test for the quick brown fox.",
           "我想弄明白这两种大模型的差别。", "It does: the quick brown fox jumps over the lazy dog."]  # fmt: skip


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    return request.param, build_family_dir(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    # long enough (up to ~60 tokens) that an 8-token sliding window cuts into every example
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", [chat_row(q, a) for q, a in zip(QUESTIONS, ANSWERS)])


def settings(model_dir, data, out, **overrides):
    values = dict(model=str(model_dir), data=[str(data)], output_dir=str(out), max_steps=1, lr=1e-3, batch_tokens=4096,
                  max_length=128, mixed_precision="no", warmup_ratio=0.0, lora={"dropout": 0.0}, seed=0)  # fmt: skip
    values.update(overrides)
    return values


def own_nll_sum(model_dir, rows: list[dict]) -> tuple[float, int]:
    """Sum and count of the token losses of ``rows`` (input_ids, labels) under the model's own
    forward: transformers' model class, its own attention, fp32, one example at a time."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]  # (T-1, V)
            labels = torch.tensor(row["labels"][1:])
            total += float(F.cross_entropy(logits.double(), labels, ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    return total, count


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_sft_first_step_loss_is_the_models_own(family, chat_file, tmp_path, full, packing):
    name, model_dir = family
    result = train_sft(SFTConfig(**settings(model_dir, chat_file, tmp_path / "run", full=full, packing=packing)))
    model, tokenizer = load_model(str(model_dir), dtype="float32")
    release_model(model)
    rows, _ = encode_all(tokenizer, read_examples([str(chat_file)]).examples, 128)
    total, count = own_nll_sum(model_dir, rows)
    assert relative(result.losses[0], total / count) <= TOLERANCE, (name, result.losses[0], total / count)


def test_dpo_first_step_loss_is_the_models_own(family, tmp_path):
    """With sft_weight 1 the first DPO step's loss is log 2 (policy = reference) plus the mean
    per-token NLL of the chosen replies, which only the model's forward can supply."""
    name, model_dir = family
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": q, "chosen": a, "rejected": ANSWERS[(i + 1) % len(ANSWERS)]} for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))
    ])  # fmt: skip
    result = train_dpo(DPOConfig(**settings(model_dir, pairs_file, tmp_path / "run", sft_weight=1.0)))
    model, tokenizer = load_model(str(model_dir), dtype="float32")
    release_model(model)
    per_token = []
    for pair in read_pairs([str(pairs_file)]):
        total, count = own_nll_sum(model_dir, [encode_pair(tokenizer, pair, 128)["chosen"]])
        per_token.append(total / count)
    expected = torch.log(torch.tensor(2.0, dtype=torch.float64)).item() + sum(per_token) / len(per_token)
    assert relative(result.losses[0], expected) <= TOLERANCE, (name, result.losses[0], expected)


def test_pretrain_first_step_loss_is_the_models_own(family, tmp_path):
    name, model_dir = family
    text = tmp_path / "text.txt"
    text.write_text(" ".join(ANSWERS * 4), encoding="utf-8")
    result = train_pretrain(PretrainConfig(**settings(model_dir, text, tmp_path / "run", max_length=48, full=True)))
    model, tokenizer = load_model(str(model_dir), dtype="float32")
    release_model(model)
    blocks, _ = text_blocks(tokenizer, read_texts([str(text)]), 48)
    total, count = own_nll_sum(model_dir, blocks)
    assert relative(result.losses[0], total / count) <= TOLERANCE, (name, result.losses[0], total / count)


def test_full_run_learns_to_answer_and_stop(family, tmp_path):
    """Generation stops at the template's stop token: a run that learned to answer "Fine." ends
    its reply there, in every family."""
    from liandan import generate

    name, model_dir = family
    data = write_jsonl(tmp_path / "fine.jsonl", [chat_row(f"Question {i}?", "Fine.") for i in range(8)])
    train_sft(SFTConfig(**settings(model_dir, data, tmp_path / "run", full=True, max_steps=30, lr=2e-2)))
    model, tokenizer = load_model(str(tmp_path / "run"), dtype="float32")
    answer = generate(model, tokenizer, ["Question 3?"])[0]
    assert (answer.text, answer.stopped) == ("Fine.", True), name


def test_lora_run_merges_and_loads_in_plain_peft(family, chat_file, tmp_path):
    """A LoRA run directory merges to the same model, and loads in transformers + PEFT alone."""
    from peft import PeftModel

    from liandan.merge import merge

    name, model_dir = family
    run = tmp_path / "run"
    train_sft(SFTConfig(**settings(model_dir, chat_file, run, max_steps=3, lr=1e-2)))
    model, tokenizer = load_model(str(run), dtype="float32")
    ids = torch.tensor([tokenizer(" ".join(ANSWERS))["input_ids"][:40]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        assert not torch.allclose(base(input_ids=ids).logits, want, atol=1e-3), name  # the adapters do something
        merged, _ = load_model(str(merge(run, tmp_path / "merged")), dtype="float32")
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4, msg=name)
        plain = PeftModel.from_pretrained(base, run).eval()
        torch.testing.assert_close(plain(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5, msg=name)
    manifest = json.loads((run / "manifest.json").read_text())
    adapted = set(manifest["adapted_modules"])
    if name == "qwen3_moe":  # the experts' fused weights are adapted, the router is not
        assert {"q_proj", "o_proj", "experts"} <= adapted and "gate" not in adapted, adapted
    else:
        assert {"o_proj", "down_proj"} <= adapted, (name, adapted)


def test_fused_lora_forward_is_pefts_with_trained_adapters(family):
    """The fused LoRA forward (`liandan.lora_fusion`) on every adapted layer of every family,
    with non-zero adapters, gives PEFT's logits and gradients."""
    from liandan.lora_fusion import fuse_lora_layers
    from liandan.prepare import attach_trainable

    name, model_dir = family
    model, tokenizer = load_model(str(model_dir), dtype="float32")
    model = attach_trainable(model, SFTConfig(data=["unused"], lora={"dropout": 0.0}), [])
    torch.manual_seed(1)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0.0, 0.2)
    ids = torch.tensor([tokenizer(" ".join(ANSWERS))["input_ids"][:40]])

    def logits_and_grads():
        model.zero_grad()
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    want, want_grads = logits_and_grads()
    unfuse = fuse_lora_layers(model)
    assert sum("forward" in m.__dict__ for m in model.modules()) >= 2 * 2  # at least o_proj and down_proj of each layer
    try:
        got, got_grads = logits_and_grads()
    finally:
        unfuse()
    assert sum("forward" in m.__dict__ for m in model.modules()) == 0  # put back
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
    for key, grad in want_grads.items():
        torch.testing.assert_close(got_grads[key], grad, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_activation_checkpointing_gives_the_same_training(family, chat_file, tmp_path, full):
    """Recomputing each decoder layer in backward (``activation_checkpointing``) instead of keeping
    its activations changes nothing but memory: the same losses and trained weights, every family."""
    from safetensors.torch import load_file

    name, model_dir = family
    runs = {}
    for checkpointing in (False, True):
        out = tmp_path / f"checkpointing-{checkpointing}"
        result = train_sft(SFTConfig(**settings(model_dir, chat_file, out, full=full, max_steps=3, lr=1e-2,
                                                 activation_checkpointing=checkpointing)))  # fmt: skip
        runs[checkpointing] = result.losses, load_file(out / ("model.safetensors" if full else "adapter_model.safetensors"))
    (plain_losses, plain_weights), (losses, weights) = runs[False], runs[True]
    assert losses == pytest.approx(plain_losses, rel=1e-6), name
    assert weights.keys() == plain_weights.keys()
    for key, value in plain_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_long_examples_attending_in_query_blocks_train_as_the_model_does(family, chat_file, tmp_path, monkeypatch, full):
    """Examples above `attention.EAGER_MAX` tokens attend in blocks of queries, each recomputed in
    backward (`blocked_causal_attention`). With EAGER_MAX 8 and blocks of 5 queries every example
    here (up to ~60 tokens, an 8-token window in the sliding families) takes that path: a training
    run's first loss is the model's own (with checkpointed decoder layers around the blocks, too),
    and a packed micro-batch's gradients equal those of the one-pass attention."""
    from liandan import attention
    from liandan.attention import use_training_attention
    from liandan.batching import collate
    from liandan.objectives import micro_batch_loss
    from liandan.prepare import attach_trainable

    name, model_dir = family
    model, tokenizer = load_model(str(model_dir), dtype="float32")
    rows, _ = encode_all(tokenizer, read_examples([str(chat_file)]).examples, 128)
    assert min(len(r["input_ids"]) for r in rows) > 8 and max(len(r["input_ids"]) for r in rows) > 3 * 5
    model = attach_trainable(model, SFTConfig(data=["unused"], full=full, lora={"dropout": 0.0}), [])
    use_training_attention(model, "auto", packing=True, device=torch.device("cpu"))
    torch.manual_seed(1)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0.0, 0.2)  # non-zero adapters, so that every gradient flows
    batch = collate(rows, packing=True, pad_id=0)

    def loss_and_grads():
        model.zero_grad()
        total, count = micro_batch_loss(model, batch)
        (total / count).backward()
        return float(total / count), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    want, want_grads = loss_and_grads()
    monkeypatch.setattr(attention, "EAGER_MAX", 8)
    monkeypatch.setattr(attention, "BLOCK_ROWS", 5)
    got, got_grads = loss_and_grads()
    assert got == pytest.approx(want, rel=1e-6), name
    for key, grad in want_grads.items():
        torch.testing.assert_close(got_grads[key], grad, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
    release_model(model)

    result = train_sft(SFTConfig(**settings(model_dir, chat_file, tmp_path / "run", full=full, activation_checkpointing=True)))
    total, count = own_nll_sum(model_dir, rows)
    assert relative(result.losses[0], total / count) <= TOLERANCE, (name, result.losses[0], total / count)
