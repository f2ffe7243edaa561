"""Jobs for the UI's Train tab: a real ``python -m liandan sft`` process on the tiny model, seen
from a second `Jobs` as a restarted UI would, stopped gracefully and resumed to the same losses as
an uninterrupted run; dead processes show as failed; bad recipes and busy directories are refused
before anything is launched; `cli_command` reads back as the same settings."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from conftest import chat_row, write_jsonl
from liandan.checkpoints import INCOMPLETE, PROGRESS
from liandan.config import SFTConfig, build, load_config, to_dict
from liandan.errors import LiandanError
from liandan.jobs import Job, Jobs, cli_command, job_id_for, process_start
from liandan.train import train_sft


@pytest.fixture
def sft_data(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", [chat_row(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(10)])


@pytest.fixture
def one_thread(monkeypatch):
    """One torch thread here and in the jobs: on a busy 2-core machine two threads per process
    made the tiny model's step 25x slower (1.25 s instead of 0.05 s), and both runs must compute alike."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


def recipe(model_dir, data, **overrides):
    values = dict(model=str(model_dir), data=[str(data)], max_steps=40, lr=5e-3, batch_tokens=96, max_length=64,
                  mixed_precision="no", warmup_ratio=0.0, seed=3)  # fmt: skip
    return {**values, **overrides}


def wait_for(condition, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_job_is_found_again_stopped_and_resumed_to_the_uninterrupted_run(tmp_path, chat_model_dir, sft_data, one_thread):
    settings = recipe(chat_model_dir, sft_data)
    reference = train_sft(SFTConfig(**settings, output_dir=str(tmp_path / "reference")))
    jobs, out = Jobs(tmp_path / "state"), tmp_path / "run"
    job = jobs.start("sft", settings, out)
    assert job.id == job_id_for(out.resolve()) and job.status == "running" and job.command[1:4] == ["-m", "liandan", "sft"]

    started = time.monotonic()
    wait_for(lambda: (jobs.progress(job.id)["step"] or 0) >= 2, "step 2 in progress.json")
    seen = jobs.progress(job.id)
    print(f"the job reached step 2 {time.monotonic() - started:.1f} s after its start")
    assert seen["stage"] == "sft" and seen["steps"] == 40 and seen["status"] == "running"
    assert len(seen["loss"]) >= 2 and seen["loss"][0][0] == 1 and seen["last"]["step"] >= 2
    again = Jobs(tmp_path / "state")  # a restarted UI
    assert [(j.id, j.status, j.pid) for j in again.list()] == [(job.id, "running", job.pid)]
    with pytest.raises(LiandanError, match=rf"'{out.resolve()}' is in use by running job {job.id}"):
        again.start("sft", settings, out)

    assert again.stop(job.id).status == "stopping"
    ended = wait_for(lambda: (j := jobs.get(job.id)).status not in ("running", "stopping") and j, "the job to stop", 60)
    assert ended.status == "stopped", jobs.progress(job.id)["log"]
    at = jobs.progress(job.id)["step"]
    assert 2 <= at < 40
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{at:06d}"]
    assert (out / INCOMPLETE).is_file() and not (out / "adapter_model.safetensors").exists()
    assert f"Run stopped at step {at} of 40, with a checkpoint; continue with: liandan sft --resume -o {out.resolve()}" in \
        jobs.progress(job.id, log_lines=100)["log"]  # fmt: skip

    resumed = Jobs(tmp_path / "state").resume(job.id)
    assert (resumed.id, resumed.status) == (job.id, "running") and "--resume" in resumed.command
    ended = wait_for(lambda: (j := jobs.get(job.id)).status not in ("running", "stopping") and j, "the job to finish")
    assert ended.status == "finished", jobs.progress(job.id)["log"]
    assert (out / "adapter_model.safetensors").is_file() and not (out / INCOMPLETE).exists()
    assert losses(out) == pytest.approx(reference.losses, rel=1e-5)
    final = jobs.progress(job.id)
    assert final["loss"] == [(s, loss) for s, loss in enumerate(losses(out), 1)] and final["eta_seconds"] is None
    assert (final["step"], final["steps"], final["status"]) == (40, 40, "finished")
    with pytest.raises(LiandanError, match="has finished"):
        jobs.resume(job.id)
    print(f"start, stop, resume and finish took {time.monotonic() - started:.1f} s")


def test_a_killed_process_is_failed_and_a_stop_before_training_has_nothing_to_resume(tmp_path, chat_model_dir, sft_data):
    jobs = Jobs(tmp_path / "state")
    killed = jobs.start("sft", recipe(chat_model_dir, sft_data), tmp_path / "killed")
    os.kill(killed.pid, signal.SIGKILL)
    wait_for(lambda: jobs.get(killed.id).status != "running", "the kill", 30)
    assert jobs.get(killed.id).status == "failed"
    assert "python" in jobs.progress(killed.id)["log"]  # the log's tail: here only the command line

    stopped = jobs.start("sft", recipe(chat_model_dir, sft_data), tmp_path / "stopped")
    jobs.stop(stopped.id)  # long before its loop (and its handlers): SIGTERM ends it at once
    wait_for(lambda: jobs.get(stopped.id).status != "stopping", "the stop", 30)
    assert jobs.get(stopped.id).status == "stopped"
    with pytest.raises(LiandanError, match="no complete checkpoint .* start it again"):
        jobs.resume(stopped.id)
    with pytest.raises(LiandanError, match="is not running"):
        jobs.stop(stopped.id)


def test_a_process_gone_without_a_final_status_is_failed(tmp_path):
    """progress.json still says running, but its process has ended (or its id is another
    process's now): failed, and saved as such."""
    jobs, out = Jobs(tmp_path / "state"), tmp_path / "run"
    out.mkdir()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    for pid, start in [(ended.pid, None), (os.getpid(), process_start(os.getpid()) + 1)]:
        (out / PROGRESS).write_text(json.dumps({"stage": "sft", "step": 3, "steps": 9, "status": "running", "pid": pid}))
        job = Job(id=job_id_for(out), stage="sft", run_dir=out, command=["liandan"], status="running", pid=pid,
                  started=time.time(), log_path=tmp_path / "log.txt", process_start=start)  # fmt: skip
        jobs.save(job)
        assert jobs.get(job.id).status == "failed"
        assert json.loads((tmp_path / "state" / job.id / "job.json").read_text())["status"] == "failed"
    (out / PROGRESS).write_text(json.dumps({"stage": "sft", "step": 3, "steps": 9, "status": "running", "pid": os.getpid()}))
    job.pid, job.process_start = os.getpid(), process_start(os.getpid())  # alive, the same process: running
    jobs.save(job)
    assert jobs.get(job.id).status == "running"


def test_bad_recipes_and_busy_directories_are_refused_before_launching(tmp_path, chat_model_dir, sft_data):
    jobs = Jobs(tmp_path / "state")
    cases = [
        ("sft", {"data": [str(sft_data)], "lr": -1}, "lr must be a finite number above 0"),
        ("sft", {"data": [str(sft_data)], "learning_rate": 1e-4}, "unknown setting 'learning_rate'"),
        ("sft", {"data": [str(sft_data)], "beta": 0.1}, "a setting of dpo and grpo"),
        ("sft", {"data": [str(tmp_path / "missing.jsonl")]}, "data file '.*missing.jsonl' does not exist"),
        ("sft", {}, "no training data"),
        ("rlhf", {"data": [str(sft_data)]}, "unknown stage 'rlhf'; expected one of sft, dpo, pretrain, grpo"),
    ]
    for stage, settings, message in cases:
        with pytest.raises(LiandanError, match=message):
            jobs.start(stage, settings, tmp_path / "run")
    # A run a liandan command is training (this process stands in for it).
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / PROGRESS).write_text(json.dumps({"stage": "sft", "step": 1, "steps": 9, "status": "running", "pid": os.getpid()}))
    with pytest.raises(LiandanError, match=rf"in use by a running liandan process \({os.getpid()}\)"):
        jobs.start("sft", recipe(chat_model_dir, sft_data), busy)
    (busy / PROGRESS).write_text(json.dumps({"stage": "sft", "step": 9, "steps": 9, "status": "finished", "pid": os.getpid()}))
    with pytest.raises(LiandanError, match="is not empty; resume its job"):
        jobs.start("sft", recipe(chat_model_dir, sft_data), busy)
    # ...and found as a job of its own when its folder is listed.
    assert [(j.id, j.status, j.command) for j in jobs.list([tmp_path])] == [(job_id_for(busy.resolve()), "finished", [])]
    assert not (tmp_path / "run").exists() and jobs.list() == jobs.list([tmp_path])


def test_cli_command_reads_back_as_the_same_settings(tmp_path):
    settings = {"data": [str(tmp_path / "my data.jsonl")], "lr": 5e-05, "lora": {"rank": 8}, "mixed_precision": "no",
                "sample_prompts": ["Hi: there", "yes", "1e-4"], "max_steps": 30, "replay": "self", "epochs": 3}  # fmt: skip
    command = cli_command("sft", settings, tmp_path / "out dir")
    words = shlex.split(command)
    assert words[:4] == ["liandan", "sft", "-o", str(tmp_path / "out dir")]
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    assert not any(o.startswith(("epochs=", "output_dir=")) for o in overrides)  # the default, and -o
    assert "mixed_precision=no" in overrides and "lora.rank=8" in overrides
    read_back = load_config(SFTConfig, None, overrides, output_dir=str(tmp_path / "out dir"))
    assert to_dict(read_back) == to_dict(build(SFTConfig, {**settings, "output_dir": str(tmp_path / "out dir")}, ""))
    with pytest.raises(LiandanError, match="lora.rank must be at least 1"):
        cli_command("sft", {"lora": {"rank": 0}}, "out")
