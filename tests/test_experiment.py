import json
import math

import pytest
import yaml
from typer.testing import CliRunner

from conftest import chat_row, write_jsonl
from liandan.cli import app
from liandan.errors import LiandanError
from liandan.evaluation import Evaluation
from liandan.experiment import EVAL_FILE, TRAINERS, ExperimentConfig, parse_seeds, run_experiment, summarise

runner = CliRunner()
SMALL = ["max_steps=3", "batch_tokens=96", "max_length=64", "mixed_precision=no", "warmup_ratio=0", "lora.rank=4"]


@pytest.fixture
def files(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [chat_row(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(8)])
    task = write_jsonl(tmp_path / "task.jsonl", [
        {"prompt": "What is 2 plus 2?", "checks": {"contains": "4"}},
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
    ])  # fmt: skip
    probes = write_jsonl(tmp_path / "probes.jsonl", [
        {"id": "p1", "category": "facts", "prompt": "Capital of France?", "checks": {"not_contains": ["zzzz"]}},
        {"id": "p2", "category": "arithmetic", "prompt": "What is 2 + 2?", "checks": {"regex": r"\b4\b"}},
    ])  # fmt: skip
    drift = write_jsonl(tmp_path / "drift.jsonl", [{"prompt": "Tell me about the sea."}])
    return data, task, probes, drift


def experiment_args(model_dir, files, out):
    data, task, probes, drift = files
    args = ["experiment", "sft", "--model", model_dir, "--data", data, "--seeds", "2", "--grid", "lr=1e-3,5e-3", "--out", out,
            "--task", task, "--probes", probes, "--drift", drift, "--max-new-tokens", "6", "--batch-size", "8"]  # fmt: skip
    return [str(a) for a in args] + [a for s in SMALL for a in ("--set", s)]


def by_hand(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of two values: (a + b) / 2 and |a - b| / sqrt(2)."""
    a, b = values
    return (a + b) / 2, abs(a - b) / math.sqrt(2)


def test_a_grid_over_seeds_trains_each_run_aggregates_and_reuses_them(tmp_path, chat_model_dir, files, monkeypatch):
    out = tmp_path / "exp"
    first = runner.invoke(app, experiment_args(chat_model_dir, files, out))
    assert first.exit_code == 0, first.output
    assert "± " in first.output and "lr=0.005" not in first.output  # the grid value as given: 5e-3

    # 2 grid points x 2 seeds: 4 runs, each in its own directory with its seed and lr recorded
    result = json.loads((out / "experiment.json").read_text())
    assert result["points"] == ["lr=1e-3", "lr=5e-3"] and result["seeds"] == [0, 1]
    runs = {(r["point"], r["seed"]): r for r in result["runs"]}
    assert len(runs) == 4
    for (point, seed), run in runs.items():
        assert run["dir"] == str(out / point / f"seed-{seed}")
        saved = yaml.safe_load((out / point / f"seed-{seed}" / "config.yaml").read_text())
        assert saved["seed"] == seed and saved["lr"] == float(point.split("=")[1])
        assert (out / point / f"seed-{seed}" / "adapter_model.safetensors").is_file()
    # the seed changes the run: same settings, other seed, another training loss
    assert runs["lr=5e-3", 0]["values"]["train.loss"] != runs["lr=5e-3", 1]["values"]["train.loss"]

    # mean and sd per point, computed by hand from each run's own files
    metrics = {m["key"]: m for m in result["metrics"]}
    assert {"train.loss", "task.score", "probes.score", "drift.perplexity"} <= set(metrics)
    before = json.loads((out / "before.json").read_text())["values"]
    for point in result["points"]:
        dirs = [out / point / f"seed-{s}" for s in (0, 1)]
        losses = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()][-1]["loss"] for d in dirs]
        drift = [json.loads((d / EVAL_FILE).read_text())["values"]["drift.perplexity"] for d in dirs]
        for key, values in (("train.loss", losses), ("drift.perplexity", drift)):
            row = metrics[key]["points"][point]
            mean, sd = by_hand(values)
            assert row["n"] == 2 and row["values"] == values and row["seeds"] == [0, 1]
            assert row["mean"] == pytest.approx(mean) and row["sd"] == pytest.approx(sd)
            assert (row["min"], row["max"]) == (min(values), max(values))
        change = metrics["drift.perplexity"]["points"][point]["delta"]
        assert change["mean"] == pytest.approx(by_hand(drift)[0] - before["drift.perplexity"])
        assert change["sd"] == pytest.approx(by_hand(drift)[1])
    assert "delta" not in metrics["train.loss"]["points"]["lr=1e-3"]  # the base model has no training loss

    # the page: one chart per metric, each with a dot per run
    page = (out / "experiment.html").read_text()
    assert page.count('<section class="metric"') == len(result["metrics"])
    for chunk in page.split('<section class="metric"')[1:]:
        assert chunk.count("<svg") == 1 and chunk.count('class="seed"') == 4
    assert "<script" not in page

    # run again: nothing is trained or evaluated, the figures are the same
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("adapter_model.safetensors")}

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setitem(TRAINERS, "sft", refuse)
    monkeypatch.setattr(Evaluation, "run", refuse)
    again = runner.invoke(app, experiment_args(chat_model_dir, files, out))
    assert again.exit_code == 0, again.output
    assert again.output.count("already trained, reused") == 4
    assert json.loads((out / "experiment.json").read_text())["metrics"] == result["metrics"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("adapter_model.safetensors")} == stamps


def test_a_bad_grid_key_is_one_line_naming_the_valid_keys(tmp_path):
    result = runner.invoke(app, ["experiment", "sft", "--grid", "lrate=1e-4,2e-4", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "--grid lrate: not a setting sft can vary; valid keys:" in line
    assert "lr," in line and "lora.rank" in line and "replay_ratio" in line and "seed," not in line
    assert not (tmp_path / "e").exists()

    seed = runner.invoke(app, ["experiment", "sft", "--grid", "seed=1,2", "--out", str(tmp_path / "e")])
    assert seed.exit_code == 2 and "(give --seeds)" in seed.output


def test_a_failed_run_stops_with_one_line_naming_its_directory(tmp_path, chat_model_dir, files):
    missing = tmp_path / "missing.jsonl"
    config = ExperimentConfig(stage="sft", values={"model": str(chat_model_dir)}, overrides=SMALL, seeds=[7],
                              grid=[f"data={missing}"], out=str(tmp_path / "exp"))  # fmt: skip
    with pytest.raises(LiandanError) as err:
        run_experiment(config)
    run_dir = tmp_path / "exp" / f"data={missing}".replace("/", "_") / "seed-7"
    assert str(err.value).startswith(f"run '{run_dir}' failed: ") and "missing.jsonl" in str(err.value)
    assert "\n" not in str(err.value)


def test_summarise_and_seeds_by_hand():
    # [1, 2, 4]: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9, over n - 1 = 2: 7/3
    stats = summarise([1.0, 2.0, 4.0])
    assert stats["n"] == 3 and stats["mean"] == pytest.approx(7 / 3) and stats["sd"] == pytest.approx(math.sqrt(7 / 3))
    assert (stats["min"], stats["max"]) == (1.0, 4.0)
    assert summarise([0.5])["sd"] is None and summarise([])["n"] == 0
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("1,5,9") == [1, 5, 9]
    with pytest.raises(LiandanError, match="--seeds"):
        parse_seeds("three")
