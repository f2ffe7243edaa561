"""DPO and continued pre-training on the shared loop, with tiny models."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_jsonl

from liandan.cli import app
from liandan.config import DPOConfig, PretrainConfig, load_config
from liandan.errors import LiandanError
from liandan.train import train_dpo, train_pretrain


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"Is {i} a number?", "chosen": "Yes, it is.", "rejected": "I am fine, thank you."} for i in range(8)
    ])  # fmt: skip


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def reply_logp(model, tok, prompt: str, reply: str) -> tuple[float, int]:
    """log p(reply + <|im_end|> | prompt) under ``model``, and how many tokens that scores, worked
    out by hand: the ChatML text of the fixtures' template written out here, the reply's positions
    counted from the tokenizer's own ids, and the model's full logits (log_softmax + gather)."""
    head = tok(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    scored = tok(reply, add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids("<|im_end|>")]
    ids = head + scored + tok("\n", add_special_tokens=False).input_ids
    # the pieces tokenize as the whole text does, so these are the positions of the reply in it
    assert ids == tok(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{reply}<|im_end|>\n", add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # (T, V)
    logp = torch.log_softmax(logits, dim=-1)
    positions = range(len(head), len(head) + len(scored))  # token j is predicted at position j - 1
    return float(sum(logp[j - 1, ids[j]] for j in positions)), len(scored)


def pair_rows(model, tok, prompts: list[str], chosen: str, rejected: str) -> torch.Tensor:
    """Summed reply log-probs by hand: (2B,), every chosen reply first, then every rejected one."""
    return torch.tensor([reply_logp(model, tok, p, reply)[0] for reply in (chosen, rejected) for p in prompts])


def dpo_config(model, data, out, **kw):
    values = dict(model=str(model), data=[str(data)], output_dir=str(out), max_steps=12, lr=2e-2, batch_tokens=2048,
                  max_length=64, mixed_precision="no", warmup_ratio=0.0, lora={"dropout": 0.0}, seed=1)  # fmt: skip
    values.update(kw)
    return DPOConfig(**values)


def test_lora_reference_is_the_base_model_with_adapters_off(tmp_path, chat_model_dir, pairs_file):
    from liandan.models import load_model
    from liandan.objectives import reference_logps
    from liandan.prepare import prepare_dpo

    run = prepare_dpo(dpo_config(chat_model_dir, pairs_file, tmp_path / "r"), tmp_path / "r", main_process=True, resume=False)
    batch = run.objective.collate(run.train[:3])
    with torch.no_grad():  # move the adapters away from their zero start, so "off" differs from "on"
        for name, param in run.model.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)
    base, tok = load_model(str(chat_model_dir), dtype="float32")
    prompts = [f"Is {i} a number?" for i in range(3)]
    expected = pair_rows(base, tok, prompts, "Yes, it is.", "I am fine, thank you.")
    policy = pair_rows(run.model, tok, prompts, "Yes, it is.", "I am fine, thank you.")
    torch.testing.assert_close(reference_logps(run.model, batch), expected)
    assert not torch.allclose(policy, expected)
    assert expected.shape == (6,) and (expected < 0).all()


def test_dpo_raises_held_out_preference_accuracy(tmp_path, chat_model_dir, pairs_file):
    held_out = write_jsonl(tmp_path / "held.jsonl", [
        {"prompt": f"Is {i} a number?", "chosen": "Yes, it is.", "rejected": "I am fine, thank you."} for i in range(20, 24)
    ])  # fmt: skip
    out = tmp_path / "run"
    result = train_dpo(dpo_config(chat_model_dir, pairs_file, out, eval_data=[str(held_out)], eval_every=1))
    records = metrics(out)
    assert {"reward_chosen", "reward_rejected", "margin", "accuracy", "pairs", "eval_accuracy", "eval_margin"} <= set(records[0])
    assert records[0]["pairs"] == 8
    assert records[-1]["eval_margin"] > records[0]["eval_margin"] and records[-1]["eval_accuracy"] == 1.0
    assert result.losses[-1] < result.losses[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["train_pairs"] == 8 and manifest["dpo"]["reference"].startswith("the policy")
    assert (out / "adapter_model.safetensors").is_file()


def test_full_dpo_precomputes_the_reference(tmp_path, chat_model_dir, pairs_file):
    from liandan.models import load_model
    from liandan.prepare import prepare_dpo

    config = dpo_config(chat_model_dir, pairs_file, tmp_path / "r", full=True, lr=1e-3, max_steps=2)
    run = prepare_dpo(config, tmp_path / "r", main_process=True, resume=False)
    base, tok = load_model(str(chat_model_dir), dtype="float32")
    expected = [reply_logp(base, tok, "Is 0 a number?", reply)[0] for reply in ("Yes, it is.", "I am fine, thank you.")]
    assert run.train[0]["ref_logps"] == pytest.approx(tuple(expected), rel=1e-5)
    train_dpo(dpo_config(chat_model_dir, pairs_file, tmp_path / "full", full=True, lr=1e-3, max_steps=2))
    assert (tmp_path / "full" / "model.safetensors").is_file()


def test_dpo_settings_are_checked():
    with pytest.raises(LiandanError, match="beta must be above 0"):
        DPOConfig(beta=0)
    with pytest.raises(LiandanError, match="loss must be sigmoid, ipo, orpo, simpo or kto"):
        DPOConfig(loss="hinge")
    with pytest.raises(LiandanError, match=r"dpo: unknown setting 'replay' \(a setting of sft, which dpo does not use\)"):
        load_config(DPOConfig, None, ["replay=self"])


def test_pretrain_perplexity_on_its_own_text_falls(tmp_path, chat_model_dir):
    from liandan.models import load_tokenizer, resolve_model

    text = tmp_path / "corpus.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "run"
    config = PretrainConfig(model=str(chat_model_dir), data=[str(text)], eval_data=[str(text)], output_dir=str(out),
                            max_length=64, batch_tokens=256, max_steps=20, lr=2e-2, mixed_precision="no",
                            warmup_ratio=0.0, eval_every=1, full=True)  # fmt: skip
    result = train_pretrain(config)
    records = metrics(out)
    assert math.exp(records[-1]["eval_loss"]) < 0.5 * math.exp(records[0]["eval_loss"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["block_size"] == 64 and len(result.losses) == 20
    assert manifest["data"]["tokens"] > 64 * manifest["data"]["blocks"] - 64
    tok = load_tokenizer(resolve_model(str(chat_model_dir)))
    tokens = len(tok(text.read_text(), add_special_tokens=False).input_ids) + 1  # and the EOS after the document
    assert manifest["data"]["tokens"] == tokens and manifest["data"]["blocks"] == tokens // 64 + (tokens % 64 >= 16)


def test_pretrain_blocks_cover_the_text_with_eos_between_documents(chat_model_dir):
    from liandan.models import load_model
    from liandan.encoding import text_blocks

    _, tok = load_model(str(chat_model_dir))
    docs = [("a", "Hello world!"), ("b", "The quick brown fox.")]
    blocks, total = text_blocks(tok, docs, block=4)
    flat = [t for b in blocks for t in b["input_ids"]]
    expected = tok("Hello world!").input_ids + [tok.eos_token_id] + tok("The quick brown fox.").input_ids + [tok.eos_token_id]
    assert total == len(expected)
    assert flat == expected[: len(flat)] and all(len(b["input_ids"]) == 4 for b in blocks)
    assert len(flat) == len(expected) - len(expected) % 4  # only a tail too short for a block is left out
    assert all(b["labels"] == b["input_ids"] for b in blocks)


def test_dpo_and_pretrain_cli(tmp_path, chat_model_dir, pairs_file):
    runner = CliRunner()
    result = runner.invoke(app, ["dpo", "--model", str(chat_model_dir), "--data", str(pairs_file), "-o", str(tmp_path / "d"),
                                 "--set", "max_steps=2", "--set", "max_length=64", "--set", "mixed_precision=no"])  # fmt: skip
    assert result.exit_code == 0, result.output
    text = tmp_path / "t.txt"
    text.write_text("Hello world! " * 50)
    result = runner.invoke(app, ["pretrain", "--model", str(chat_model_dir), "--data", str(text), "--eval-data", str(text),
                                 "-o", str(tmp_path / "p"), "--set", "max_steps=2", "--set", "max_length=32",
                                 "--set", "batch_tokens=64", "--set", "mixed_precision=no"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "held-out perplexity" in result.output and "at the first evaluation" in result.output
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": "same", "rejected": "same"}])
    result = runner.invoke(app, ["dpo", "--model", str(chat_model_dir), "--data", str(bad), "-o", str(tmp_path / "never")])
    assert result.exit_code == 2 and f"{bad}:1: field 'rejected': is the same as 'chosen'" in " ".join(result.stderr.split())
    assert not (tmp_path / "never").exists()


def test_eval_reports_preference_accuracy_and_text_perplexity(tmp_path, chat_model_dir, pairs_file):
    from liandan.evaluation import EvalConfig, evaluate
    from liandan.models import load_model

    text = tmp_path / "held.txt"
    text.write_text("Hello world! The quick brown fox. " * 10)
    result = evaluate(EvalConfig(models=[str(chat_model_dir)], probes="none", drift="none", pairs=str(pairs_file),
                                 text=str(text), dtype="float32"))  # fmt: skip
    scores = result["scores"][str(chat_model_dir)]
    model, tok = load_model(str(chat_model_dir), dtype="float32")
    prompts = [f"Is {i} a number?" for i in range(8)]
    chosen = [reply_logp(model, tok, p, "Yes, it is.") for p in prompts]
    rejected = [reply_logp(model, tok, p, "I am fine, thank you.") for p in prompts]
    margins = torch.tensor([c - r for (c, _), (r, _) in zip(chosen, rejected)])
    assert scores["prefs"]["accuracy"] == pytest.approx(float((margins > 0).float().mean()))
    assert scores["prefs"]["margin"] == pytest.approx(float(margins.mean()), rel=1e-4)
    assert scores["text"]["perplexity"] == pytest.approx(math.exp(scores["text"]["nll"])) and 1 < scores["text"]["perplexity"] < 1000
    per_token = torch.tensor([c / n - r / m for (c, n), (r, m) in zip(chosen, rejected)])
    assert scores["prefs"]["accuracy_per_token"] == pytest.approx(float((per_token > 0).float().mean()))
    # the text's NLL: one block (the text and its EOS are far below 512 tokens), every next token scored
    ids = torch.tensor(tok(text.read_text(), add_special_tokens=False).input_ids + [tok.eos_token_id])
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0].float()  # (T, V)
    nll = -torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:, None]).mean()
    assert scores["text"]["nll"] == pytest.approx(float(nll), rel=1e-5)
    assert {m["key"] for m in result["metrics"]} == {"prefs.accuracy", "prefs.accuracy_per_token", "prefs.margin", "text.perplexity"}


def test_lora_dpo_in_bf16_follows_the_fp32_run(tmp_path, chat_model_dir, pairs_file):
    """bf16 autocast with bf16 frozen weights: the reference (adapters off) and the policy still
    give the fp32 run's losses, within bf16 rounding."""
    fp32 = train_dpo(dpo_config(chat_model_dir, pairs_file, tmp_path / "fp32", max_steps=4))
    bf16 = train_dpo(dpo_config(chat_model_dir, pairs_file, tmp_path / "bf16", max_steps=4, mixed_precision="bf16"))
    assert bf16.losses[0] == pytest.approx(0.6931, abs=0.01)  # policy == reference at the start: -log sigmoid(0)
    assert bf16.losses == pytest.approx(fp32.losses, rel=0.05, abs=0.02)
