"""Every speed optimisation leaves the numbers equal: the chunked output-head loss, per-example
attention for packed rows, and bf16 frozen weights with fp32 adapters."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import chat_row, write_jsonl

from liandan.assistant_masks import encode_chat
from liandan.attention import PACKED, use_training_attention
from liandan.batching import collate
from liandan.config import SFTConfig
from liandan.models import load_model
from liandan.objectives import micro_batch_loss, pair_logps, trained_token_nll
from liandan.train import train_sft


def examples(tok):
    pairs = [("hi", "Hello there."), ("What is the capital of France?", "Paris."), ("ok", "Fine, thank you. Let me help.")]
    return [encode_chat(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in pairs]


def test_head_loss_equals_the_models_own_logits(chat_model_dir, monkeypatch):
    """The chunked head on the last hidden states == cross-entropy of the model's logits."""
    import liandan.objectives as objectives

    model, tok = load_model(str(chat_model_dir), dtype="float32")
    batch = collate(examples(tok), packing=False, pad_id=tok.pad_token_id)
    assert objectives.plain_output_head(model) is not None
    fused, rows = trained_token_nll(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    trained = batch["targets"] != -100
    expected = F.cross_entropy(logits[trained], batch["targets"][trained], reduction="none")
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    assert rows.tolist() == trained.nonzero()[:, 0].tolist()
    monkeypatch.setattr(objectives, "plain_output_head", lambda model: None)  # the fallback path
    torch.testing.assert_close(trained_token_nll(model, batch)[0], expected, rtol=1e-5, atol=1e-5)
    per_row = pair_logps(model, batch)
    torch.testing.assert_close(per_row, -torch.stack([expected[rows == r].sum() for r in range(3)]))


def test_packed_attention_equals_padded_rows_in_loss_and_gradient(chat_model_dir):
    model, tok = load_model(str(chat_model_dir), dtype="float32")
    model.requires_grad_(True)
    items = examples(tok)
    results = []
    for packing in (False, True):
        original = use_training_attention(model, "auto", packing, torch.device("cpu"))
        assert model.config._attn_implementation == (PACKED if packing else original)
        loss, n = micro_batch_loss(model, collate(items, packing=packing, pad_id=tok.pad_token_id))
        loss.backward()
        results.append((loss.detach(), n, [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
        model.set_attn_implementation(original)
    (padded, n_padded, g_padded), (packed, n_packed, g_packed) = results
    assert n_padded == n_packed > 0
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_packed, g_padded):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture
def sft_data(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", [chat_row(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(12)])


def run(model_dir, data, out, **overrides):
    values = dict(model=str(model_dir), data=[str(data)], output_dir=str(out), max_steps=5, lr=5e-3, batch_size=4,
                  batch_tokens=512, max_length=64, mixed_precision="no", warmup_ratio=0.0, seed=3)  # fmt: skip
    values.update(overrides)
    return train_sft(SFTConfig(**values))


def test_packed_and_padded_training_follow_the_same_loss_curve(chat_model_dir, sft_data, tmp_path):
    packed = run(chat_model_dir, sft_data, tmp_path / "packed", packing=True)
    padded = run(chat_model_dir, sft_data, tmp_path / "padded", packing=False)
    assert packed.losses == pytest.approx(padded.losses, rel=1e-4)
    assert packed.tokens == padded.tokens > 0 and packed.seconds > 0
    saved = json.loads((tmp_path / "packed" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"


def test_bf16_lora_keeps_fp32_adapters_and_the_fp32_loss_curve(chat_model_dir, sft_data, tmp_path):
    from safetensors.torch import load_file

    fp32 = run(chat_model_dir, sft_data, tmp_path / "fp32")
    bf16 = run(chat_model_dir, sft_data, tmp_path / "bf16", mixed_precision="bf16", sample_prompts=["What is 1 plus 1?"])
    assert bf16.losses == pytest.approx(fp32.losses, rel=0.02)
    assert bf16.losses[-1] < bf16.losses[0]
    adapter = load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    # the run's samples were generated after training, with the model's own attention put back
    samples = [json.loads(line) for line in (tmp_path / "bf16" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 1 and isinstance(samples[0]["text"], str)


def test_frozen_weights_are_bf16_and_adapters_fp32_while_training(chat_model_dir):
    from liandan.prepare import attach_trainable
    from liandan.training_setup import freeze_in_bf16, set_adapter_input_casting

    model, _ = load_model(str(chat_model_dir), dtype="float32")
    model = attach_trainable(model, SFTConfig(data=["x"]), [])
    freeze_in_bf16(model)
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    flags = {m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")}
    assert flags == {False}
    set_adapter_input_casting(model, True)
    with torch.no_grad():  # outside autocast, with casting back on, mixed dtypes still run
        out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
