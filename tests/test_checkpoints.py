"""Checkpoints and failure: resume unpickles nothing and refuses changed data or settings; a torn
checkpoint is skipped; a diverged step changes nothing and a diverged run stops; a run killed
with SIGKILL at any moment resumes to the same result as an uninterrupted one."""

import json
import os
import pickle
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import chat_row, write_jsonl
from liandan.checkpoints import COMPLETE, INCOMPLETE, STATE_FILE, check_run_complete, rng_state, set_rng_state
from liandan.config import SFTConfig
from liandan.errors import LiandanError
from liandan.merge import merge
from liandan.train import train_sft


@pytest.fixture
def sft_data(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", [chat_row(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(10)])


def settings(model_dir, data, out, **overrides):
    values = {"model": str(model_dir), "data": [str(data)], "output_dir": str(out), "max_steps": 6, "lr": 5e-3, "batch_tokens": 96,
              "max_length": 64, "mixed_precision": "no", "warmup_ratio": 0.0, "seed": 3, "save_every": 1}  # fmt: skip
    values.update(overrides)
    return values


def config(*args, **overrides):
    return SFTConfig(**settings(*args, **overrides))


def metrics(run):
    """Every line of metrics.jsonl, parsed strictly: a bare NaN or Infinity is an error."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


class Planted:
    """A pickle that would create ``marker`` when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_resume_unpickles_nothing(tmp_path, chat_model_dir, sft_data):
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    first = train_sft(config(chat_model_dir, sft_data, out), stop_after=3).losses
    checkpoint = out / "checkpoints" / "step-000003"
    # What accelerate used to write and load with pickle: planted, and never read.
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "scheduler.bin", "optimizer.bin"):
        (checkpoint / name).write_bytes(pickle.dumps(Planted(marker)))
    rest = train_sft(config(chat_model_dir, sft_data, out), resume=True).losses
    assert len(first + rest) == 6 and not marker.exists()

    # The optimizer state itself replaced by a pickle: refused, and not run.
    out2 = tmp_path / "run2"
    train_sft(config(chat_model_dir, sft_data, out2), stop_after=3)
    checkpoint = out2 / "checkpoints" / "step-000003"
    (checkpoint / "optimizer.pt").write_bytes(pickle.dumps(Planted(marker)))
    state = json.loads((checkpoint / STATE_FILE).read_text())
    state["files"]["optimizer.pt"] = (checkpoint / "optimizer.pt").stat().st_size
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(LiandanError, match="not a tensors-only optimizer state"):
        train_sft(config(chat_model_dir, sft_data, out2), resume=True)
    assert not marker.exists()


def test_resume_refuses_changed_settings_or_data_unless_told(tmp_path, chat_model_dir, sft_data):
    out = tmp_path / "run"
    train_sft(config(chat_model_dir, sft_data, out), stop_after=2)
    with pytest.raises(LiandanError, match=r"settings \(lr\) differ"):
        train_sft(config(chat_model_dir, sft_data, out, lr=1e-3), resume=True)
    write_jsonl(sft_data, [chat_row(f"What is {i} times {i}?", f"It is {i * i}.") for i in range(10)])
    with pytest.raises(LiandanError, match="training data differ.*resume_changed=true"):
        train_sft(config(chat_model_dir, sft_data, out), resume=True)
    # Settings that do not change what a step computes may change; resume_changed forces the rest.
    result = train_sft(config(chat_model_dir, sft_data, out, log_every=2, resume_changed=True), resume=True)
    assert len(result.losses) == 4 and (out / "adapter_model.safetensors").is_file()


def test_torn_checkpoint_is_skipped_and_old_ones_rotated(tmp_path, chat_model_dir, sft_data, capsys):
    full = train_sft(config(chat_model_dir, sft_data, tmp_path / "full", save_every=0)).losses
    out = tmp_path / "run"
    first = train_sft(config(chat_model_dir, sft_data, out), stop_after=4).losses
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003", "step-000004"]  # save_total_limit 2
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    (out / "checkpoints" / "step-000004" / COMPLETE).unlink()  # as if the machine died while saving step 4
    rest = train_sft(config(chat_model_dir, sft_data, out), resume=True).losses
    assert "skipping checkpoint" in capsys.readouterr().err
    assert first[:3] + rest == pytest.approx(full, rel=1e-5)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]  # step 4's line was not doubled
    assert not (out / INCOMPLETE).exists()
    check_run_complete(out)


def test_checkpoints_by_minutes(tmp_path, chat_model_dir, sft_data):
    """save_every_minutes alone checkpoints (here: after every step, the interval being tiny);
    with both intervals at 0 there are none."""
    out = tmp_path / "timed"
    train_sft(config(chat_model_dir, sft_data, out, save_every=0, save_every_minutes=1e-9, save_total_limit=0), stop_after=3)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002", "step-000003"]
    train_sft(config(chat_model_dir, sft_data, tmp_path / "none", save_every=0, save_every_minutes=0))
    assert not (tmp_path / "none" / "checkpoints").exists()


def test_rng_state_holds_torch_python_and_numpy():
    state = rng_state()
    expected = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(2), np.random.randn())
    set_rng_state(state)
    again = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(2), np.random.randn())
    assert torch.equal(expected[0], again[0]) and expected[1:3] == again[1:3]
    assert np.array_equal(expected[3], again[3]) and expected[4] == again[4]
    random.gauss(0, 1)  # leaves a cached second gaussian in both generators
    np.random.randn()
    state = rng_state()
    expected = (random.gauss(0, 1), np.random.randn())
    set_rng_state(state)
    assert (random.gauss(0, 1), np.random.randn()) == expected


def test_fsdp_checkpoint_resumes_to_the_same_run(tmp_path):
    """FSDP2 (``fully_shard``) on 2 CPU processes: a checkpoint gathers the sharded LoRA weights
    and optimizer state whole (full shapes on disk, optimizer state keyed by name), and a fresh
    model with other LoRA init resumed from it continues with the same losses and ends with the
    same weights as the run that never stopped."""
    worker = Path(__file__).with_name("fsdp_checkpoint_worker.py")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker), str(tmp_path)],
                   check=True, capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    results = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in (0, 1)]
    for result in results:
        assert result["restored_step"] == 2
        assert result["resumed"] == result["straight"]
    main = results[0]
    assert main["max_weight_diff"] == 0.0 and main["weight_names"]
    assert main["saved_shapes"]["base_model.model.model.layers.0.mlp.down_proj.lora_A.default.weight"] == [4, 64]
    assert main["optimizer_keys"][0].startswith("base_model.model.")
    assert json.loads((tmp_path / "checkpoints" / "step-000002" / STATE_FILE).read_text())["layout"] == "fsdp"


def poison(monkeypatch, bad_steps):
    """Make the loss NaN on the given (0-based) steps: one micro-batch per step in these runs."""
    import liandan.train

    real_prepare = liandan.train.prepare_sft

    def prepare(*args, **kwargs):
        run = real_prepare(*args, **kwargs)
        real_loss, calls = run.objective.loss, [0]

        def loss(model, batch):
            loss_sum, stats = real_loss(model, batch)
            calls[0] += 1
            return (loss_sum * float("nan") if calls[0] - 1 in bad_steps else loss_sum), stats

        run.objective.loss = loss
        return run

    monkeypatch.setattr(liandan.train, "prepare_sft", prepare)


def test_a_diverged_step_changes_no_weight(tmp_path, chat_model_dir, sft_data, monkeypatch):
    train_sft(config(chat_model_dir, sft_data, tmp_path / "clean"), stop_after=2)
    poison(monkeypatch, {2})
    train_sft(config(chat_model_dir, sft_data, tmp_path / "skipped"), stop_after=3)
    clean = load_file(tmp_path / "clean" / "checkpoints" / "step-000002" / "weights.safetensors")
    skipped = load_file(tmp_path / "skipped" / "checkpoints" / "step-000003" / "weights.safetensors")
    assert clean.keys() == skipped.keys()
    for name in clean:
        assert torch.equal(clean[name], skipped[name]), name
    lines = metrics(tmp_path / "skipped")
    assert lines[2]["loss"] is None and lines[2]["grad_norm"] is None
    assert [m["skipped_steps"] for m in lines] == [0, 0, 1]


def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, chat_model_dir, sft_data, monkeypatch):
    out = tmp_path / "run"
    poison(monkeypatch, set(range(3, 100)))
    with pytest.raises(LiandanError, match=r"diverged: 2 steps in a row \(up to step 5\).*step-000003"):
        train_sft(config(chat_model_dir, sft_data, out, max_steps=10, save_every=3, max_bad_steps=2))
    assert [m["skipped_steps"] for m in metrics(out)] == [0, 0, 0, 1, 2]
    assert (out / "checkpoints" / "step-000003" / COMPLETE).is_file()
    assert not (out / "adapter_model.safetensors").exists()
    with pytest.raises(LiandanError, match="unfinished training run"):
        check_run_complete(out)


def test_a_huge_learning_rate_is_caught(tmp_path, chat_model_dir, sft_data):
    with pytest.raises(LiandanError, match="diverged|non-finite"):
        train_sft(config(chat_model_dir, sft_data, tmp_path / "run", lr=1e30, max_grad_norm=0.0))
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_a_diverged_run_exits_non_zero_from_the_command_line(tmp_path, chat_model_dir, sft_data):
    from typer.testing import CliRunner

    from liandan.cli import app

    out = tmp_path / "run"
    options = [x for k, v in settings(chat_model_dir, sft_data, out, lr=1e30, max_grad_norm=0).items()
               if k not in ("model", "data", "output_dir") for x in ("--set", f"{k}={v}")]  # fmt: skip
    result = CliRunner().invoke(app, ["sft", "-m", str(chat_model_dir), "-d", str(sft_data), "-o", str(out), *options])
    assert result.exit_code == 2 and ("diverged" in result.stderr or "non-finite" in result.stderr), result.output
    assert (out / INCOMPLETE).is_file() and not (out / "adapter_model.safetensors").exists()
    metrics(out)  # valid JSON throughout


def test_merge_refuses_non_finite_weights_and_unfinished_runs(tmp_path, chat_model_dir, sft_data):
    out = tmp_path / "run"
    train_sft(config(chat_model_dir, sft_data, out, max_steps=2))
    weights = load_file(out / "adapter_model.safetensors")
    name = min(n for n in weights if "lora_B" in n)
    weights[name][0, 0] = float("nan")
    save_file(weights, out / "adapter_model.safetensors")
    with pytest.raises(LiandanError, match=r"weight '.*' has non-finite values"):
        merge(out, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    (out / INCOMPLETE).write_text("")
    with pytest.raises(LiandanError, match="unfinished training run"):
        merge(out, tmp_path / "merged")


def test_export_refuses_non_finite_weights(tmp_path, chat_model_dir):
    import shutil

    from liandan.export import export_gguf

    broken = tmp_path / "broken"
    shutil.copytree(chat_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][3, 4] = float("inf")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out.gguf"
    with pytest.raises(LiandanError, match=r"weight 'model.layers.1.mlp.down_proj.weight' has non-finite values"):
        export_gguf(str(broken), out)
    assert not out.exists()


def logged(run, step):
    """Whether metrics.jsonl has a line for ``step`` yet (a torn last line is not one)."""
    try:
        return any(line.startswith(f'{{"step": {step},') for line in (run / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return False


def test_killed_at_random_moments_resumes_to_the_same_run(tmp_path, chat_model_dir, sft_data):
    """SIGKILL one run at 20 seeded random moments (a checkpoint every step, so many land while a
    checkpoint is being written), resuming it each time: its per-step losses and final adapter
    equal those of a run that was never interrupted. Each run is forked from a server that
    imported liandan once (a fresh interpreter costs ~10 s of imports)."""
    import multiprocessing
    import random

    from liandan.checkpoints import latest_checkpoint

    steps, target, rng = 60, 20, random.Random(15)  # at most about 2.5 steps are done between two kills
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["liandan.train"])

    def run(settings, resume=False):
        return context.Process(target=train_sft, args=(settings,), kwargs={"resume": resume}, daemon=True)

    started = time.monotonic()
    reference = run(config(chat_model_dir, sft_data, tmp_path / "full", max_steps=steps, save_every=0))
    reference.start()
    reference.join(180)
    assert reference.exitcode == 0
    referenced = time.monotonic() - started
    out = tmp_path / "killed"
    run_config = config(chat_model_dir, sft_data, out, max_steps=steps)
    kills, torn, resumed_from, period, killing = 0, 0, [], None, time.monotonic()
    while kills < target:
        kept = latest_checkpoint(out, quiet=True)
        before = int(kept.name.split("-")[1]) if kept else 0
        if before >= steps - 3:  # too close to the end to be killed before it finishes (a slow spell let it run ahead)
            break
        resumed_from.append(before)
        child = run(run_config, resume=before > 0)
        child.start()
        deadline = time.monotonic() + 60
        while child.is_alive() and time.monotonic() < deadline:  # one new complete checkpoint: progress
            if any(int(p.name.split("-")[1]) > before for p in (out / "checkpoints").glob("step-*")):
                break
            time.sleep(0.005)
        saved = time.monotonic()
        if rng.random() < 0.5 or period is None:  # aim at the next checkpoint's writes: they start once its step is logged
            while child.is_alive() and time.monotonic() < deadline and not logged(out, before + 2):
                time.sleep(0.002)
            period = time.monotonic() - saved  # a step's time on this machine
            time.sleep(rng.uniform(0.0, 0.025))
        else:  # anywhere in the next step or two, or the checkpoint writes between them
            time.sleep(rng.uniform(0.0, 1.2 * period))
        assert child.is_alive(), f"the run ended ({child.exitcode}) before kill {kills + 1}; resumed from {resumed_from}"
        child.kill()
        child.join()
        kills += 1
        torn += any((out / "checkpoints").glob(".tmp-step-*"))  # killed while writing a checkpoint
    assert kills >= target // 2, f"only {kills} kills before the run neared its end; resumed from {resumed_from}"
    killed = time.monotonic() - killing
    child = run(config(chat_model_dir, sft_data, out, max_steps=steps, save_every=0), resume=True)  # the rest, quickly
    child.start()
    child.join(180)
    assert child.exitcode == 0
    print(f"{kills} kills ({torn} mid-checkpoint) in {killed:.1f} s, {time.monotonic() - started:.1f} s in all")
    print(f"reference run {referenced:.1f} s; resumed from steps {resumed_from}")
    assert [m["step"] for m in metrics(out)] == list(range(1, steps + 1))
    assert [m["loss"] for m in metrics(out)] == pytest.approx([m["loss"] for m in metrics(tmp_path / "full")], rel=1e-5)
    resumed = load_file(out / "adapter_model.safetensors")
    uninterrupted = load_file(tmp_path / "full" / "adapter_model.safetensors")
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=1e-5, atol=1e-6)
    check_run_complete(out)


def test_a_full_disk_at_the_final_save_ends_clearly_and_leaves_no_model(tmp_path, chat_model_dir, sft_data, monkeypatch):
    """ENOSPC while the final model is written: one LiandanError, no staging directory left, and the
    run directory still marked unfinished (so nothing takes it for a model)."""
    import errno

    import liandan.train

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(liandan.train, "save_config", full_disk)
    run = tmp_path / "run"
    with pytest.raises(LiandanError, match="could not write the final model .*No space left on device.*--resume") as caught:
        train_sft(config(chat_model_dir, sft_data, run, max_steps=2))
    assert "\n" not in str(caught.value)
    assert not (run / ".final-tmp").exists() and not (run / "adapter_model.safetensors").exists()
    assert (run / INCOMPLETE).is_file()
    with pytest.raises(LiandanError, match="unfinished training run"):
        check_run_complete(run)


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, chat_model_dir, sft_data, monkeypatch):
    """ENOSPC while checkpoint 3 is written: one LiandanError naming the checkpoint kept, no
    temporary directory left, checkpoint 2 intact, and --resume from it finishes the run with the
    losses of a run that never stopped."""
    import errno

    import liandan.checkpoints

    full = train_sft(config(chat_model_dir, sft_data, tmp_path / "full", save_every=0)).losses
    real_save_file = liandan.checkpoints.save_file

    def full_disk_at_step_3(tensors, path, *args, **kwargs):
        if ".tmp-step-000003" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(liandan.checkpoints, "save_file", full_disk_at_step_3)
    out = tmp_path / "run"
    with pytest.raises(LiandanError, match=r"checkpoint at step 3 .*No space left on device.*step-000002' is kept.*free some disk space") as caught:
        train_sft(config(chat_model_dir, sft_data, out))
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    monkeypatch.setattr(liandan.checkpoints, "save_file", real_save_file)
    rest = train_sft(config(chat_model_dir, sft_data, out), resume=True).losses
    assert rest == pytest.approx(full[2:], rel=1e-5)
    check_run_complete(out)
