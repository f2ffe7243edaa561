"""`liandan sft` and `liandan inspect-data` end to end through the CLI, on tiny models."""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import chat_row, write_jsonl

from liandan.cli import app
from liandan.config import SFTConfig
from liandan.train import train_sft

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def sft_file(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", [chat_row(f"What is {i} times 3?", f"{3 * i}.") for i in range(12)])


def settings(**values):
    base = dict(max_steps=4, batch_tokens=96, max_length=64, mixed_precision="no", seed=5, lr=5e-3, warmup_ratio=0.0)
    base.update(values)
    return [x for k, v in base.items() for x in ("--set", f"{k}={v}")]


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_cli_writes_a_run_directory_with_eval_loss(tmp_path, chat_model_dir, sft_file):
    out = tmp_path / "run"
    result = run("sft", "--model", chat_model_dir, "--data", sft_file, "--output-dir", out,
                 *settings(eval_fraction=0.25, eval_every=2))  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and all(v > 0 for v in evals)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["train_examples"] == 9 and manifest["data"]["eval_examples"] == 3
    assert (out / "adapter_model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert "Finished 4 steps" in result.output


def test_sft_cli_resume_continues_from_the_run_settings(tmp_path, chat_model_dir, sft_file):
    """A run interrupted after 2 of 5 steps, resumed with only `--resume -o DIR`, logs the same
    losses as a run that was never interrupted: the settings come from the run's config.yaml."""
    whole = tmp_path / "whole"
    assert run("sft", "--model", chat_model_dir, "--data", sft_file, "-o", whole, *settings(max_steps=5)).exit_code == 0
    cut = tmp_path / "cut"
    config = SFTConfig(model=str(chat_model_dir), data=[str(sft_file)], output_dir=str(cut), max_steps=5, batch_tokens=96,
                       max_length=64, mixed_precision="no", seed=5, lr=5e-3, warmup_ratio=0.0)  # fmt: skip
    train_sft(config, stop_after=2)
    assert not (cut / "adapter_model.safetensors").exists()
    result = run("sft", "--resume", "-o", cut)
    assert result.exit_code == 0, result.output
    assert losses(cut) == pytest.approx(losses(whole), rel=1e-5)


def test_sft_cli_refuses_to_overwrite_a_run(tmp_path, chat_model_dir, sft_file):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("sft", "--model", chat_model_dir, "--data", sft_file, "-o", out, *settings())
    assert result.exit_code == 2 and "is not empty" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_tracker_that_is_not_installed_is_a_clear_error(tmp_path, chat_model_dir, sft_file, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    result = run("sft", "--model", chat_model_dir, "--data", sft_file, "-o", tmp_path / "r", *settings(), "--set", "report_to=[wandb]")
    assert result.exit_code == 2 and "wandb is not installed" in result.stderr
    assert not (tmp_path / "r").exists()


def test_tensorboard_tracker_gets_the_metrics(tmp_path, chat_model_dir, sft_file):
    pytest.importorskip("tensorboardX")
    out = tmp_path / "run"
    result = run("sft", "--model", chat_model_dir, "--data", sft_file, "-o", out, *settings(), "--set", "report_to=[tensorboard]")
    assert result.exit_code == 0, result.output
    events = list(out.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def test_lora_on_a_base_model_trains_the_added_chatml_rows(tmp_path, bare_base_model_dir, sft_file, monkeypatch):
    """A base model given ChatML under LoRA: the new tokens' rows in the embeddings and in the
    untied output head train (PEFT's trainable token indices), the old rows stay frozen, and the
    run reloads with its tokens."""
    import liandan.train
    from liandan.models import load_adapter_model, load_model

    # The embedding rows as the model in memory sees them (base rows with the trained ones put in
    # place), before the first step and after the last.
    seen = {}
    real_prepare = liandan.train.prepare_sft

    def prepare_and_snapshot(*args, **kwargs):
        run = real_prepare(*args, **kwargs)
        seen["model"], seen["vocab"] = run.model, len(run.tokenizer)
        with torch.no_grad():
            seen["before"] = run.model.get_input_embeddings()(torch.arange(len(run.tokenizer))).clone()  # (V, H)
            seen["head_before"] = run.model.get_output_embeddings()(torch.eye(32)).t().clone()  # (V, H): the head's rows
        return run

    monkeypatch.setattr(liandan.train, "prepare_sft", prepare_and_snapshot)
    out = tmp_path / "run"
    config = SFTConfig(model=str(bare_base_model_dir), data=[str(sft_file)], output_dir=str(out), max_steps=3,
                       batch_tokens=256, max_length=64, mixed_precision="no", lr=1e-2)  # fmt: skip
    train_sft(config)
    tok = load_model(str(out), dtype="float32")[1]
    new_ids = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert "<|im_start|>" in tok.chat_template and min(new_ids) >= 400 and len(tok) == 402
    assert seen["vocab"] == 402
    with torch.no_grad():
        after = seen["model"].get_input_embeddings()(torch.arange(402))  # (V, H)
    before = seen["before"]
    assert torch.equal(after[:400], before[:400]), "old embedding rows changed in training"  # old rows frozen
    assert (after[new_ids] - before[new_ids]).abs().amax(dim=-1).min() > 1e-4  # both new rows trained, in memory
    with torch.no_grad():  # the untied output head: the same, so that the model learns to predict <|im_end|>
        head_after = seen["model"].get_output_embeddings()(torch.eye(32)).t()
    assert torch.equal(head_after[:400], seen["head_before"][:400])
    assert (head_after[new_ids] - seen["head_before"][new_ids]).abs().amax(dim=-1).min() > 1e-4
    model = load_adapter_model(out, tokenizer=tok)
    ids = torch.tensor([[5, 6, 7, *new_ids]])
    with torch.no_grad():
        trained = model.get_input_embeddings()(ids)
        with model.disable_adapter():
            initial = model.get_input_embeddings()(ids)
    torch.testing.assert_close(trained[0], after[[5, 6, 7, *new_ids]], rtol=0, atol=0)  # the run reloads as trained
    assert (trained[:, 3:] - initial[:, 3:]).abs().amax(dim=-1).min() > 1e-4  # both new rows trained


def test_inspect_data_highlights_and_summarises(tmp_path, chat_model_dir, sft_file):
    result = run("inspect-data", "--model", chat_model_dir, "--data", sft_file, "--show", 1)
    assert result.exit_code == 0, result.output
    assert f"{sft_file}:1" in result.output and f"{sft_file}:2" not in result.output
    assert "12 records (messages), 322 tokens, 44 trained" in " ".join(result.output.split())
    assert "every assistant turn ends in a trained stop token" in result.output


def test_inspect_data_reports_a_cut_off_stop_token(tmp_path, chat_model_dir, sft_file):
    result = run("inspect-data", "--model", chat_model_dir, "--data", sft_file, "--max-length", 20)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "12 truncated" in text and "lose a stop token" in text
