import json
import math
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_jsonl

from liandan.cli import app
from liandan.errors import LiandanError
from liandan.eval_sets import answer_nll, health, read_eval_set, read_set_spec, repetition, score_set
from liandan.evaluation import EvalConfig, build_result, evaluate
from liandan.prompts import read_general_prompts

runner = CliRunner()


@pytest.fixture
def sets(tmp_path):
    task = write_jsonl(tmp_path / "task.jsonl", [
        {"id": "a", "prompt": "What is the capital of France?", "checks": {"contains": "Paris"}},
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "Give JSON"}, {"role": "assistant", "content": '{"a": 1}'}]},
    ])  # fmt: skip
    probes = write_jsonl(tmp_path / "probes.jsonl", [
        {"id": "p1", "category": "facts", "prompt": "Capital of France?", "checks": {"contains_any": ["Paris"]}},
        {"id": "p2", "category": "arithmetic", "prompt": "What is 2 + 2?", "checks": {"regex": r"\b(4|four)\b"}},
        {"id": "p3", "category": "facts", "prompt": "Say anything.", "checks": {"not_contains": ["zzzz-never"]}},
    ])  # fmt: skip
    drift = write_jsonl(tmp_path / "drift.jsonl", [{"prompt": "Tell me about the sea."}, {"prompt": "How are you?"}])
    return task, probes, drift


def test_task_set_references_and_default_checks(sets):
    task = read_eval_set(sets[0], name="task")
    assert [i.id for i in task.items] == ["a", "task:2", "task:3"]
    assert [i.reference for i in task.items] == [None, "hi", '{"a": 1}']
    assert [list(i.checks.tests) for i in task.items] == [["contains"], ["reference"], ["reference"]]
    # the JSON reference is compared as parsed JSON, the text one as normalised text
    assert task.items[2].checks.tests["reference"]('{ "a" : 1 }', '{"a": 1}')
    assert task.items[1].checks.tests["reference"]("Hi.", "hi")


def test_schema_option_adds_json_and_schema_checks(tmp_path, sets):
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object"}')
    task = read_eval_set(sets[0], name="task", schema=str(schema))
    assert sorted(task.items[2].checks.tests) == ["json", "reference", "schema"]
    assert sorted(task.items[0].checks.tests) == ["contains", "json", "schema"]


def test_bad_task_sets_name_file_line_and_field(tmp_path):
    no_checks = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "ok", "checks": {"contains": "x"}}, {"prompt": "hi"}])
    with pytest.raises(LiandanError, match=r"n.jsonl:2: field 'checks': this record has no checks and no reference"):
        read_eval_set(no_checks, name="task")
    prompts_only = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    with pytest.raises(LiandanError, match=r"p.jsonl:1: field 'checks.reference': needs a reference answer"):
        read_eval_set(prompts_only, name="task", extra_checks={"reference": "exact"})
    twice = write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "reference": "b"}])
    with pytest.raises(LiandanError, match=r"t.jsonl:1: field 'reference': given twice"):
        read_eval_set(twice, name="task")
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(LiandanError, match="has no prompts"):
        read_set_spec(str(empty), name="probes")


def test_shipped_sets_are_valid_and_large_enough():
    probes = read_set_spec("default", name="probes")
    categories = {i.category for i in probes.items}
    assert len(probes.items) >= 150 and categories == {"facts", "arithmetic", "reasoning", "instructions", "translation"}
    assert len({i.id for i in probes.items}) == len(probes.items)
    assert len(read_general_prompts("default", "drift")) >= 40
    assert len(read_general_prompts("default", "general")) >= 150


def test_kept_counts_only_what_the_baseline_passed():
    from liandan.evaluation import add_kept

    def outs(*passed):
        return [{"passed": p} for p in passed]

    per_model = {"before": {"probes": {}}, "after": {"probes": {}}}
    add_kept(per_model, {"before": outs(True, True, False, False), "after": outs(True, False, True, True)}, "before")
    assert per_model["before"]["probes"]["kept"] == 1.0
    assert per_model["after"]["probes"]["kept"] == 0.5  # the two gains do not hide the loss


def test_repetition():
    assert repetition("a b c d a b c d") == pytest.approx(1 - 4 / 5)
    assert repetition("one two three") == 0.0
    assert repetition("x x x x x x") == pytest.approx(1 - 1 / 3)


def test_answer_nll_is_the_mean_log_likelihood_of_the_answer_tokens(chat_model_dir):
    from liandan.assistant_masks import encode_chat_example
    from liandan.models import load_model
    from liandan.prompts import prompts_from_strings

    model, tok = load_model(str(chat_model_dir), dtype="float32")
    prompts = prompts_from_strings(["hello there", "What is the capital of France?"])
    answers = ["Paris.", "I am fine, thank you."]
    sums, counts = [], []
    for prompt, answer in zip(prompts, answers):
        enc = encode_chat_example(tok, [{"role": "user", "content": prompt.text}, {"role": "assistant", "content": answer}])
        with torch.no_grad():
            logp = model(torch.tensor([enc.input_ids])).logits[0].log_softmax(-1)
        trained = [t for t in range(1, len(enc.input_ids)) if enc.labels[t] != -100]
        sums.append(-sum(float(logp[t - 1, enc.labels[t]]) for t in trained))
        counts.append(len(trained))
    mean = sum(sums) / sum(counts)
    assert answer_nll(model, tok, prompts, answers) == pytest.approx(mean, rel=1e-5)
    # per item, for the paired bootstrap: the same mean, and each answer's own sum and count
    # (a batch of 1 puts each answer in its own padded batch; the default batches them together)
    for batch_size in (1, 8):
        got_mean, got_sums, got_counts = answer_nll(model, tok, prompts, answers, batch_size=batch_size, per_item=True)
        assert got_mean == pytest.approx(mean, rel=1e-5) and got_counts == counts
        assert got_sums == pytest.approx(sums, rel=1e-5)


def test_evaluate_two_models_and_the_result_shape(chat_model_dir, sets):
    task, probes, drift = sets
    config = EvalConfig(models=[str(chat_model_dir), str(chat_model_dir) + "/"], task=str(task), probes=str(probes),
                        drift=str(drift), max_new_tokens=6, probe_max_new_tokens=4, drift_max_new_tokens=5, dtype="float32")  # fmt: skip
    seen = []
    result = evaluate(config, progress=lambda label, n: seen.append(n))
    a, b = result["models"]
    keys = [m["key"] for m in result["metrics"]]
    assert keys == ["task.score", "task.contains", "task.reference", "health.stop_rate", "health.mean_tokens",
                    "health.repetition", "cost.prompt_tokens", "probes.score", "probes.kept", "drift.perplexity"]  # fmt: skip
    for metric in result["metrics"]:  # the same model twice: every number equal
        assert metric["values"][a] == pytest.approx(metric["values"][b]), metric["key"]
    assert result["labels"] == {a: "before", b: "after"}
    assert math.isclose(result["scores"][a]["drift"]["perplexity"], math.exp(result["scores"][a]["drift"]["nll"]))
    assert 0 <= result["scores"][a]["health"]["stop_rate"] <= 1
    assert set(result["scores"][a]["probes"]["by_category"]) == {"facts", "arithmetic"}
    assert [s["name"] for s in result["sets"]] == ["task", "probes"]
    first = result["sets"][0]["examples"][0]
    assert first["prompt"] == "What is the capital of France?" and set(first["outputs"]) == {a, b}
    assert first["outputs"][a]["new_tokens"] <= 6 and set(first["outputs"][a]["checks"]) == {"contains"}
    assert sum(seen) == 2 * (3 + 3 + 2) + 2  # every prompt of every set, and the baseline's drift answers
    assert result["scores"][a]["probes"]["kept"] == 1.0
    for metric in result["metrics"]:  # the same model twice: no change, and never called significant
        interval = metric["intervals"][b]
        assert set(metric["intervals"]) == {b} and interval["diff"] == pytest.approx(0, abs=1e-6), metric["key"]
        assert interval["low"] <= 0 <= interval["high"] and not interval["significant"], metric["key"]
    drift = next(m for m in result["metrics"] if m["key"] == "drift.perplexity")["intervals"][b]
    assert drift["method"] == "bootstrap" and drift["n"] == 2 and drift["high"] - drift["low"] < 1e-3
    json.dumps(result)  # JSON-ready


def test_few_shot_column_is_the_first_model_prompted_and_pays_for_it_per_request(tmp_path, chat_model_dir, sets):
    """The prompt-only baseline: the first model with a system prompt and 2 examples before each task
    prompt, compared with the plain first model item by item; probes and drift are the plain model's."""
    from transformers import AutoTokenizer

    task, probes, drift = sets
    # "Say hi" is also an eval prompt: it must never be an example, so exactly the other two are drawn
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                                   for q, a in [("Say hi", "hi"), ("Name a colour", "Blue."), ("One word", "Yes")]])  # fmt: skip
    model = str(chat_model_dir)
    config = EvalConfig(models=[model], task=str(task), probes=str(probes), drift=str(drift), max_new_tokens=4, probe_max_new_tokens=3,
                        drift_max_new_tokens=3, dtype="float32", few_shot=2, few_shot_data=str(train), few_shot_system="Be brief.")  # fmt: skip
    seen = []
    result = evaluate(config, progress=lambda label, n: seen.append(label))
    few = f"{model} + 2-shot"
    assert result["models"] == [model, few] and result["labels"] == {model: "before", few: "prompt only"}
    assert sum(1 for label in seen if label.startswith(few)) == 1  # the task set only: one batch of 3 prompts
    # the added turns, counted by hand: <|im_start|> ROLE\nCONTENT <|im_end|> \n for each
    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    added = sum(2 + len(tok(f"{role}\n{content}\n", add_special_tokens=False)["input_ids"]) for role, content in
                [("system", "Be brief."), ("user", "Name a colour"), ("assistant", "Blue."), ("user", "One word"), ("assistant", "Yes")])  # fmt: skip
    cost = next(m for m in result["metrics"] if m["key"] == "cost.prompt_tokens")
    assert (cost["label"], cost["better"]) == ("Prompt tokens per request", "lower")
    assert cost["values"][few] - cost["values"][model] == pytest.approx(added) and added > 20
    assert cost["intervals"][few]["low"] == cost["intervals"][few]["high"] == pytest.approx(added)  # every request pays the same
    for metric in result["metrics"]:  # compared with the first model like any other column, paired over the same items
        assert set(metric["intervals"]) == {few}, metric["key"]
        if metric["key"].split(".")[0] in ("probes", "drift"):  # the weights are the same: the plain model's own figures
            assert metric["values"][few] == metric["values"][model] and metric["intervals"][few]["diff"] == 0, metric["key"]
    assert result["scores"][few]["task"]["score"] is not None and result["sets"][0]["examples"][0]["prompt"] == "What is the capital of France?"
    assert set(result["sets"][1]["examples"][0]["outputs"]) == {model, few}
    json.dumps(result)


def test_eval_cli_writes_reports_and_bad_input_writes_nothing(tmp_path, chat_model_dir, sets):
    task, probes, drift = sets
    html, data = tmp_path / "r.html", tmp_path / "r.json"
    args = ["eval", "--model", str(chat_model_dir), "--task", str(task), "--probes", str(probes), "--drift", "none",
            "--max-new-tokens", "4", "--dtype", "float32"]  # fmt: skip
    result = runner.invoke(app, [*args, "--out", str(html), "--out", str(data)])
    assert result.exit_code == 0, result.output
    assert "Retention: probes still passed" in result.output and "<svg" in html.read_text()
    assert json.loads(data.read_text())["models"] == [str(chat_model_dir)]

    bad_schema = tmp_path / "bad.json"
    bad_schema.write_text("{oops")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for extra, message in [
        (["--schema", str(bad_schema)], "is not valid JSON"),
        (["--probes", str(empty)], "has no prompts"),
        (["--check", "predicate=nowhere_module:f"], "cannot import 'nowhere_module:f'"),
        (["--check", "nonsense"], "expected KEY=VALUE"),
        (["--few-shot", "2"], "--few-shot needs --few-shot-data"),
        (["--few-shot", "9", "--few-shot-data", str(write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"}] * 2))],
         "--few-shot 9: '" + str(tmp_path / "train.jsonl") + "' has only 2 examples"),
    ]:
        out = tmp_path / "never.html"
        result = runner.invoke(app, [*args, *extra, "--out", str(out)])
        assert result.exit_code == 2 and message in " ".join(result.stderr.split()), (extra, result.stderr)
        assert not out.exists()


def fake_generations(texts, stopped, tokens):
    return [SimpleNamespace(text=t, stopped=s, new_tokens=n) for t, s, n in zip(texts, stopped, tokens, strict=True)]


def test_build_result_compares_every_metric_item_by_item(tmp_path):
    """Two models' per-item results, made without models: each metric gets the paired interval of
    the second against the first, by the method its kind needs."""
    task = read_eval_set(write_jsonl(tmp_path / "task.jsonl", [{"prompt": f"q{i}", "checks": {"contains": "yes"}} for i in range(30)]),
                         name="task")  # fmt: skip
    probes = read_eval_set(write_jsonl(tmp_path / "probes.jsonl", [{"prompt": f"p{i}", "checks": {"contains": "ok"}} for i in range(20)]),
                           name="probes")  # fmt: skip
    runs = {  # before fails every task prompt, after passes them all; after forgets 2 of the 18 probes passed before
        "base": (["no"] * 30, ["ok"] * 18 + ["x"] * 2, [False] * 50, [40] * 50),
        "tuned": (["yes"] * 30, ["ok"] * 16 + ["x"] * 4, [True] * 50, [10] * 50),
    }
    per_model, outputs, items = {}, {"task": {}, "probes": {}}, {}
    for name, (task_texts, probe_texts, stopped, tokens) in runs.items():
        task_gens = fake_generations(task_texts, stopped[:30], tokens[:30])
        probe_gens = fake_generations(probe_texts, stopped[30:], tokens[30:])
        outputs["task"][name], task_scores = score_set(task, task_gens)
        outputs["probes"][name], probe_scores = score_set(probes, probe_gens)
        per_model[name] = {"task": task_scores, "probes": probe_scores, "health": health(task_gens + probe_gens)}
    nll = {"base": [2.0, 4.0, 3.0], "tuned": [2.0, 4.0, 3.0]}  # drift: the same answers, equally likely
    margins = {"base": [-0.5, 0.5, -0.2, 1.0], "tuned": [0.5, 1.5, 0.8, 2.0]}  # every margin +1
    for name in runs:
        per_model[name]["drift"] = {"nll": 9 / 6, "perplexity": math.exp(9 / 6)}
        per_model[name]["prefs"] = {"accuracy": sum(m > 0 for m in margins[name]) / 4, "margin": sum(margins[name]) / 4}
        items[name] = {"drift": {"nll_sums": nll[name], "tokens": [2, 2, 2]},
                       "prefs": {"margins": margins[name], "per_token_margins": margins[name]}}  # fmt: skip
    config = EvalConfig(models=list(runs))
    result = build_result(config, per_model, outputs, task, probes, {m: str(tmp_path / m) for m in runs}, items)
    got = {m["key"]: m["intervals"]["tuned"] for m in result["metrics"]}
    assert all(set(m["intervals"]) == {"tuned"} for m in result["metrics"])  # the baseline is not compared with itself

    # 30 of 30 gained: McNemar p = 2 / 2^30; a large, significant gain
    assert got["task.score"]["method"] == "mcnemar-exact" and got["task.score"]["n"] == 30
    assert got["task.score"]["p"] == pytest.approx(2 / 2**30) and got["task.score"]["diff"] == 1.0
    assert got["task.score"]["significant"] and got["task.score"]["low"] > 0.8 and got["task.contains"] == got["task.score"]
    # kept: over the 18 probes the baseline passed only; 2 lost, none gained -> p = 2 * 1/4 = 0.5
    assert got["probes.kept"]["n"] == 18 and got["probes.kept"]["diff"] == pytest.approx(-2 / 18)
    assert got["probes.kept"]["p"] == 0.5 and not got["probes.kept"]["significant"]
    assert got["probes.score"]["n"] == 20 and got["probes.score"]["diff"] == pytest.approx(-0.1)
    # health pools all 50 generations: every one now stops, and each is 30 tokens shorter
    assert got["health.stop_rate"]["n"] == 50 and got["health.stop_rate"]["significant"]
    assert got["health.mean_tokens"]["method"] == "bootstrap"
    assert (got["health.mean_tokens"]["low"], got["health.mean_tokens"]["high"]) == (-30, -30)
    assert got["drift.perplexity"]["diff"] == 0 and (got["drift.perplexity"]["low"], got["drift.perplexity"]["high"]) == (0, 0)
    assert got["prefs.margin"]["diff"] == pytest.approx(1) and got["prefs.margin"]["significant"]
    assert got["prefs.accuracy"]["diff"] == 0.5 and got["prefs.accuracy"]["p"] == 0.5  # 2 gained of 4: too few to tell
    assert json.loads(json.dumps(result))["metrics"][0]["intervals"]["tuned"] == got["task.score"]

    without = build_result(config, per_model, outputs, task, probes, {m: str(tmp_path / m) for m in runs})
    assert "intervals" not in next(m for m in without["metrics"] if m["key"] == "drift.perplexity")  # no per-item data
