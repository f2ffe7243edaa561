"""`liandan quickstart` and `liandan bake` end to end on tiny models."""

import json

import pytest
from typer.testing import CliRunner

from conftest import write_jsonl

from liandan.bake import BakeConfig, bake
from liandan.errors import LiandanError
from liandan.plots import PALETTE
from liandan.quickstart import QuickstartConfig, quickstart

from browser import colour_pixels, render

runner = CliRunner()
SCHEMA = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}, "additionalProperties": False}


@pytest.fixture
def task(tmp_path):
    def chat(i):
        return {"messages": [{"role": "user", "content": f"Number {i} as JSON"}, {"role": "assistant", "content": json.dumps({"n": i})}]}

    train = write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(12)])
    test = write_jsonl(tmp_path / "test.jsonl", [chat(i) for i in range(20, 24)])
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    probes = write_jsonl(tmp_path / "probes.jsonl", [{"id": "p", "prompt": "Say fine", "category": "facts", "checks": {"contains": "fine"}}])
    return train, test, schema, probes


def test_quickstart_writes_report_and_summary_with_every_figure(tmp_path, stopping_model_dir, task, monkeypatch):
    from liandan import eval_sets, prompts

    train, test, schema, probes = task
    # small shipped-set stand-ins keep the test fast; the real ones are read in test_evaluate
    for module in (eval_sets, prompts):
        monkeypatch.setattr(module, "builtin_path", lambda name: probes if name == "probes" else tmp_path / "drift.jsonl")
    write_jsonl(tmp_path / "drift.jsonl", [{"prompt": "How are you?"}, {"prompt": "Hello"}])
    out = tmp_path / "qs"
    config = QuickstartConfig(model=str(stopping_model_dir), train=str(train), test=str(test), schema=str(schema), out=str(out),
                              replay="none", epochs=2, lr=5e-3, sft_overrides=["mixed_precision=no", "batch_tokens=256", "max_length=64"],
                              few_shot=2)  # fmt: skip
    summary = quickstart(config)
    for name in ("report.html", "results.json", "summary.json", "compare.html", "run/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    keys = set(saved["metrics"])
    assert {"task.score", "task.schema", "task.json", "health.stop_rate", "probes.score", "drift.perplexity"} <= keys
    for metric in saved["metrics"].values():
        assert metric["before"] is not None and metric["after"] is not None
        assert metric["delta"] == pytest.approx(metric["after"] - metric["before"])
    assert saved["training"]["steps"] >= 1 and saved["training"]["replay"] is None
    assert set(saved["seconds"]) == {"compare", "eval_before", "eval_few_shot", "train", "eval_after", "total"}
    # the prompt-only baseline beside before and after: its value, its change against before, and after against it
    assert saved["few_shot"] == {"name": f"{stopping_model_dir} + 2-shot", "examples": 2, "system": None}
    for key, metric in saved["metrics"].items():
        few = metric["few_shot"]
        assert few["value"] is not None and few["delta"] == pytest.approx(few["value"] - metric["before"]), key
        assert few["interval"] is not None and few["after_vs_few_shot"]["n"] >= 1, key
    cost = saved["metrics"]["cost.prompt_tokens"]  # every request of the baseline carries two example turns
    assert cost["few_shot"]["value"] > cost["before"] == cost["after"]
    assert cost["few_shot"]["after_vs_few_shot"]["diff"] == pytest.approx(cost["after"] - cost["few_shot"]["value"])
    # the report as a person sees it: a real browser renders its tables and plots
    dom, image = render(out / "report.html", tmp_path)
    assert '<table class="metrics">' in dom and dom.count('<table class="examples"') == 2  # task and probes
    assert "prompt only" in dom and "Prompt tokens per request" in dom
    # headline bars, retention by category, and a loss curve for before and after (both are run directories
    # here; the prompt-only column has before's weights, so no curve of its own)
    assert dom.count("<svg") == 4 and "Training loss" in dom
    for colour in PALETTE[:3]:  # before, prompt only and after, in the bar charts
        assert colour_pixels(image, colour) > 2500, colour


def test_quickstart_checks_inputs_before_any_work(tmp_path, task):
    train, test, schema, _ = task
    with pytest.raises(LiandanError, match="--train 'nope.jsonl' does not exist"):
        quickstart(QuickstartConfig(train="nope.jsonl", test=str(test), schema=str(schema), out=str(tmp_path / "q")))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(LiandanError, match="is not empty; pass --overwrite"):
        quickstart(QuickstartConfig(train=str(train), test=str(test), schema=str(schema), out=str(mine)))
    with pytest.raises(LiandanError, match="does not look like a quickstart directory"):
        quickstart(QuickstartConfig(train=str(train), test=str(test), schema=str(schema), out=str(mine), overwrite=True))
    assert (mine / "notes.txt").read_text() == "keep"
    with pytest.raises(LiandanError, match="replay_ratio must be between 0 and 1"):
        quickstart(QuickstartConfig(train=str(train), test=str(test), schema=str(schema), out=str(tmp_path / "q"), replay_ratio=2))
    assert not (tmp_path / "q").exists()
    # Looking like a quickstart directory is not enough: only one quickstart created (its marker) is replaced.
    (mine / "run").mkdir()
    (mine / "summary.json").write_text("{}")
    with pytest.raises(LiandanError, match="quickstart did not create it: it has no .liandan-quickstart file"):
        quickstart(QuickstartConfig(train=str(train), test=str(test), schema=str(schema), out=str(mine), overwrite=True))
    assert (mine / "notes.txt").read_text() == "keep"


def test_overwrite_replaces_only_once_the_new_result_is_complete(tmp_path):
    from liandan.quickstart import MARKER, fresh_output

    out = tmp_path / "qs"
    with fresh_output(out):
        (out / "summary.json").write_text("first")
    assert (out / MARKER).is_file()
    with pytest.raises(RuntimeError), fresh_output(out):  # a run that fails: the first result is put back
        (out / "summary.json").write_text("half")
        raise RuntimeError("training diverged")
    assert (out / "summary.json").read_text() == "first"
    assert (tmp_path / ".qs.failed" / "summary.json").read_text() == "half"
    with fresh_output(out):
        assert (out / "summary.json").exists() is False
        (out / "summary.json").write_text("second")
    assert (out / "summary.json").read_text() == "second" and not (tmp_path / ".qs.previous").exists()


def test_bake_trains_without_the_prompt_and_reports_its_cost(tmp_path, stopping_model_dir):
    from liandan.chat import render_chat
    from liandan.models import load_model

    system = "You are a terse assistant. Always answer in as few words as you can, and be kind about it."
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Question {i}?"} for i in range(6)])
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": f"Other question {i}?", "checks": {"regex": "fine"}} for i in range(3)])
    out = tmp_path / "baked"
    summary = bake(BakeConfig(model=str(stopping_model_dir), system=system, prompts=str(prompts), task=str(test),
                              output_dir=str(out), epochs=2, sft_overrides=["mixed_precision=no", "batch_tokens=256", "max_length=96"]))  # fmt: skip
    records = [json.loads(line) for line in (out / "bake-data.jsonl").read_text().splitlines()]
    assert len(records) == summary["teacher"]["kept"] >= 1
    assert all(r["messages"][0]["role"] == "user" for r in records)  # trained WITHOUT the system prompt
    _, tok = load_model(str(stopping_model_dir))
    with_ids = tok(render_chat(tok, [{"role": "system", "content": system}, {"role": "user", "content": "Question 0?"}])).input_ids
    without_ids = tok(render_chat(tok, [{"role": "user", "content": "Question 0?"}])).input_ids
    assert summary["prompt_tokens"] == len(with_ids) - len(without_ids) > 10
    assert summary["prefill_ms_with_prompt"] > 0 and "prefill_ms_saved" in summary
    assert set(summary["adherence"]) == {"original + system prompt", "original, no system prompt", "baked, no system prompt"}
    assert (out / "bake-report.html").is_file() and (out / "bake-summary.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()


def test_bake_needs_a_way_to_measure_adherence(tmp_path):
    with pytest.raises(LiandanError, match="bake needs a way to measure adherence"):
        bake(BakeConfig(system="Be brief.", output_dir=str(tmp_path / "b")))
    with pytest.raises(LiandanError, match="--system: file 'missing.txt' does not exist"):
        bake(BakeConfig(system="missing.txt", checks={"regex": "x"}, output_dir=str(tmp_path / "b")))
    assert not (tmp_path / "b").exists()


def test_bake_falls_back_to_the_plain_teacher_when_it_cannot_follow_the_checks(tmp_path, stopping_model_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Question {i}?"} for i in range(4)])
    summary = bake(BakeConfig(model=str(stopping_model_dir), system="Always say zzz.", prompts=str(prompts),
                              checks={"regex": "zzz"}, output_dir=str(tmp_path / "baked"), epochs=1,
                              sft_overrides=["mixed_precision=no", "max_length=96", "batch_tokens=256"]))  # fmt: skip
    teacher = summary["teacher"]
    assert teacher["passed_checks"] == 0 and teacher["filtered"] is False and teacher["kept"] == 4
    assert summary["adherence"]["original + system prompt"] == 0.0
