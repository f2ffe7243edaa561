"""Stopping a run on request: SIGTERM or Ctrl-C finishes the step in progress, leaves a
checkpoint and nothing final, and the resumed run ends where an uninterrupted one does; a second
signal aborts at once; progress.json follows the run; the command exits with status 3."""

import dataclasses
import json
import os
import signal

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import chat_row, write_jsonl
from liandan.checkpoints import INCOMPLETE, PROGRESS
from liandan.config import GRPOConfig, SFTConfig
from liandan.errors import LiandanError
from liandan.prepare import prepare_grpo, prepare_sft
from liandan.train import TrainingStopped, train, train_sft


@pytest.fixture
def sft_data(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", [chat_row(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(10)])


def config(model_dir, data, out, **overrides):
    values = dict(model=str(model_dir), data=[str(data)], output_dir=str(out), max_steps=6, lr=5e-3, batch_tokens=96,
                  max_length=64, mixed_precision="no", warmup_ratio=0.0, seed=3)  # fmt: skip
    values.update(overrides)
    return SFTConfig(**values)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine two made the tiny model's steps 25x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def signalling(prepare, at_call: int, *signals: int):
    """``prepare`` whose objective sends ``signals`` to this process from its ``at_call``-th loss,
    that is inside an optimizer step, as Ctrl-C or ``kill`` would (one micro-batch per step here)."""

    def wrapped(*args, **kwargs):
        run = prepare(*args, **kwargs)
        loss, calls = run.objective.loss, [0]

        def signalled(model, batch):
            calls[0] += 1
            if calls[0] == at_call:
                for sig in signals:
                    signal.raise_signal(sig)
            return loss(model, batch)

        run.objective = dataclasses.replace(run.objective, loss=signalled)
        return run

    return wrapped


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def progress(run):
    return json.loads((run / PROGRESS).read_text())


def test_sigterm_stops_after_the_step_and_resume_ends_as_the_uninterrupted_run(tmp_path, chat_model_dir, sft_data):
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    full = tmp_path / "full"
    train_sft(config(chat_model_dir, sft_data, full))
    out = tmp_path / "stopped"
    with pytest.raises(TrainingStopped, match=rf"stopped at step 3 of 6, .*liandan sft --resume -o {out}$") as stopped:
        train(config(chat_model_dir, sft_data, out), signalling(prepare_sft, 3, signal.SIGTERM))
    assert (stopped.value.step, stopped.value.steps) == (3, 6)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # put back
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003"]  # save_every is 50: the stop's own
    assert (out / INCOMPLETE).is_file() and not (out / "adapter_model.safetensors").exists()
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    state = progress(out)
    assert {k: state[k] for k in ("stage", "step", "steps", "status", "pid")} == {
        "stage": "sft", "step": 3, "steps": 6, "status": "stopped", "pid": os.getpid()}  # fmt: skip
    assert state["seconds"] > 0 and state["eta_seconds"] > 0
    before = state["seconds"]

    train_sft(config(chat_model_dir, sft_data, out), resume=True)
    assert [m["loss"] for m in metrics(out)] == pytest.approx([m["loss"] for m in metrics(full)], rel=1e-5)
    resumed, uninterrupted = load_file(out / "adapter_model.safetensors"), load_file(full / "adapter_model.safetensors")
    assert all(float((resumed[k] - uninterrupted[k]).abs().max()) < 1e-6 for k in uninterrupted)
    state = progress(out)
    assert (state["step"], state["status"], state["eta_seconds"]) == (6, "finished", 0.0)
    assert state["seconds"] > before  # the time before the stop counts too
    assert not (out / INCOMPLETE).exists()


def test_a_second_signal_aborts_at_once(tmp_path, chat_model_dir, sft_data):
    handlers = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(config(chat_model_dir, sft_data, out, save_every=1), signalling(prepare_sft, 3, signal.SIGINT, signal.SIGINT))
    assert signal.getsignal(signal.SIGINT) is handlers
    # Aborted inside step 3: steps 1 and 2 were saved whole, nothing of step 3 was written.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert (progress(out)["step"], progress(out)["status"]) == (2, "failed")


def test_grpo_stops_at_the_end_of_its_round(tmp_path, chat_model_dir):
    """A GRPO checkpoint falls between rounds; a signal in a round's first iteration stops the run
    after its second."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say hello {i}"} for i in range(8)])
    out = tmp_path / "run"
    cfg = GRPOConfig(model=str(chat_model_dir), data=[str(prompts)], output_dir=str(out), max_steps=4, num_iterations=2,
                     rewards=["regex=[aeiou]"], max_length=64, max_completion_length=8, mixed_precision="no",
                     num_generations=2, batch_size=2, seed=3)  # fmt: skip
    with pytest.raises(TrainingStopped, match="stopped at step 2 of 4"):
        train(cfg, signalling(prepare_grpo, 1, signal.SIGTERM))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert [m["step"] for m in metrics(out)] == [1, 2] and progress(out)["status"] == "stopped"


def test_the_command_prints_how_to_resume_and_exits_with_status_3(tmp_path, chat_model_dir, sft_data, monkeypatch, capfd):
    from liandan import train as train_module
    from liandan.cli import app

    monkeypatch.setattr(train_module, "prepare_sft", signalling(prepare_sft, 2, signal.SIGINT))
    out = tmp_path / "run"
    options = ["--set", "max_steps=6", "--set", "batch_tokens=96", "--set", "max_length=64", "--set", "mixed_precision=no"]
    result = CliRunner().invoke(app, ["sft", "-m", str(chat_model_dir), "-d", str(sft_data), "-o", str(out), *options])
    assert result.exit_code == 3, result.output
    assert f"Run stopped at step 2 of 6, with a checkpoint; continue with: liandan sft --resume -o {out}" in result.output
    assert "SIGINT: stopping after this step with a checkpoint" in capfd.readouterr().err  # os.write to fd 2


def test_failed_and_refused_runs_in_progress_json(tmp_path, chat_model_dir, sft_data):
    out = tmp_path / "run"
    with pytest.raises(LiandanError, match="diverged"):
        train_sft(config(chat_model_dir, sft_data, out, lr=1e30, max_grad_norm=0.0))
    assert progress(out)["status"] == "failed" and progress(out)["eta_seconds"] is None
    # A run refused at the start (the directory is not empty) leaves the run that is there alone.
    (out / PROGRESS).write_text("theirs")
    with pytest.raises(LiandanError, match="not empty"):
        train_sft(config(chat_model_dir, sft_data, out))
    assert (out / PROGRESS).read_text() == "theirs"
