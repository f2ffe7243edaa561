"""lm-evaluation-harness tasks run in process on the tiny chat model: the two local tasks in
tests/lm_eval_task/, per-item values checked against the reported metrics and, for multiple
choice, against the model's own log-likelihoods worked out here. Tests marked ``lmeval`` need the
lmeval extra; they skip without it, and fail instead when LIANDAN_REQUIRE_LMEVAL is set (CI)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from liandan.errors import LiandanError
from liandan.lm_eval_tasks import run_lm_eval
from liandan.models import load_model

TASKS = Path(__file__).parent / "lm_eval_task"
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


def require_lm_eval() -> None:
    if not HAS_LM_EVAL:
        reason = "lm-eval is not installed (pip install -e '.[lmeval]')"
        if os.environ.get("LIANDAN_REQUIRE_LMEVAL"):  # CI installs it: a skip there would hide the checks
            pytest.fail(reason + " but LIANDAN_REQUIRE_LMEVAL is set")
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def lm_eval_or_skip(request):
    if request.node.get_closest_marker("lmeval"):
        require_lm_eval()


@pytest.fixture(scope="module")
def chat_model(chat_model_dir):
    return load_model(str(chat_model_dir), dtype="float32")


@pytest.fixture(scope="module")
def both_tasks(chat_model, tmp_path_factory):
    """Both tiny tasks, run from another directory: their data_files are relative to the YAML."""
    require_lm_eval()  # a module fixture is set up before the autouse one above could skip
    model, tokenizer = chat_model
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("elsewhere"))
    try:
        return run_lm_eval(model, tokenizer, ["liandan_tiny_mc", "liandan_tiny_gen"], include_path=str(TASKS), batch_size=4)
    finally:
        os.chdir(cwd)


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / name).read_text(encoding="utf-8").splitlines()]


@pytest.mark.lmeval
def test_each_metric_lists_its_items_in_doc_order_and_their_mean_is_the_metric(both_tasks):
    for task, data, metrics in [
        ("liandan_tiny_mc", "tiny_mc.jsonl", {"acc", "acc_norm"}),
        ("liandan_tiny_gen", "tiny_gen.jsonl", {"exact_match"}),
    ]:
        result, n = both_tasks[task], len(rows(data))
        assert (result["n"], result["doc_ids"], result["num_fewshot"]) == (n, list(range(n)), 0)
        assert set(result["metrics"]) == metrics
        for metric in result["metrics"].values():
            assert len(metric["items"]) == n and set(metric["items"]) <= {0.0, 1.0}
            p = sum(metric["items"]) / n
            assert metric["value"] == pytest.approx(p)
            assert metric["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))  # lm-eval's sample stderr
            assert metric["higher_is_better"] is True


def choice_log_likelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log-softmax over the continuation's tokens given the context, the continuation's
    tokens being those the whole text has beyond the context's (lm-eval's split)."""
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    ids = torch.tensor([whole])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)  # (T-1, V): predicts tokens 1..T-1
    return sum(log_probs[i - 1, whole[i]].item() for i in range(n_context, len(whole)))


@pytest.mark.lmeval
def test_multiple_choice_items_match_the_models_own_log_likelihoods(both_tasks, chat_model):
    model, tokenizer = chat_model
    acc, acc_norm = [], []
    for row in rows("tiny_mc.jsonl"):
        context = f"Question: {row['question']}\nAnswer:"
        lls = [choice_log_likelihood(model, tokenizer, context, " " + choice) for choice in row["choices"]]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == row["answer"]))
        per_char = [ll / len(choice) for ll, choice in zip(lls, row["choices"])]  # acc_norm: per character of the choice
        acc_norm.append(float(max(range(len(lls)), key=per_char.__getitem__) == row["answer"]))
    assert 0 < sum(acc) < len(acc)  # right on some items and wrong on others, so the order is checked
    metrics = both_tasks["liandan_tiny_mc"]["metrics"]
    assert metrics["acc"]["items"] == acc
    assert metrics["acc_norm"]["items"] == acc_norm


@pytest.mark.lmeval
def test_limit_keeps_the_first_items_and_the_callers_random_state(both_tasks, chat_model):
    random.seed(123)
    state = random.getstate()
    torch_state = torch.random.get_rng_state()
    result = run_lm_eval(*chat_model, ["liandan_tiny_mc"], limit=3, include_path=TASKS)["liandan_tiny_mc"]
    assert (result["n"], result["doc_ids"]) == (3, [0, 1, 2])
    assert result["metrics"]["acc"]["items"] == both_tasks["liandan_tiny_mc"]["metrics"]["acc"]["items"][:3]
    assert random.getstate() == state and torch.equal(torch.random.get_rng_state(), torch_state)


@pytest.mark.lmeval
def test_an_unknown_task_is_one_line_with_near_matches(chat_model):
    """Slow (about 20 s): a name not in the folder is looked up among lm-eval's built-in tasks too."""
    with pytest.raises(LiandanError) as caught:
        run_lm_eval(*chat_model, ["liandan_tiny_mcq"], include_path=TASKS)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("unknown lm-eval task 'liandan_tiny_mcq': did you mean liandan_tiny_mc")


@pytest.mark.lmeval
def test_a_task_whose_dataset_is_on_the_hub_is_refused_and_the_hub_setting_restored(chat_model, tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub_offline = huggingface_hub.constants.HF_HUB_OFFLINE  # read once at import: put back as it was
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    (tmp_path / "hub_task.yaml").write_text(
        "task: liandan_hub_task\ndataset_path: liandan-tests/no-such-dataset\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n",
        encoding="utf-8",
    )
    with pytest.raises(LiandanError) as caught:
        run_lm_eval(*chat_model, ["liandan_hub_task"], include_path=tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("lm-eval task 'liandan_hub_task' needs data that is not on this machine")
    assert "liandan-tests/no-such-dataset" in message and "Hub is off" in message
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ
    assert huggingface_hub.constants.HF_HUB_OFFLINE is hub_offline


def test_without_lm_eval_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(LiandanError, match=r"lm-eval is not installed .*pip install 'liandan\[lmeval\]'"):
        run_lm_eval(object(), object(), ["liandan_tiny_mc"], include_path=TASKS)


# ---------------------------------------------------------------------------------------------
# In `liandan eval`: each task's metrics before vs after, with paired intervals


def fake(doc_ids: list[int], acc: list[float], length: list[float]) -> dict:
    return {"t": {"n": len(doc_ids), "doc_ids": doc_ids, "num_fewshot": 0, "metrics": {
        "acc": {"value": sum(acc) / len(acc), "stderr": None, "higher_is_better": True, "items": acc},
        "len": {"value": sum(length) / len(length), "stderr": None, "higher_is_better": False, "items": length}}}}  # fmt: skip


def test_metric_rows_pair_the_models_document_by_document():
    from liandan.lm_eval_tasks import metric_rows

    before = fake([0, 1, 2, 3, 4, 5], [1, 1, 0, 0, 0, 1], [5, 6, 7, 8, 9, 10])
    # The same documents in another order: doc 2 and doc 3 gained, doc 5 lost.
    after = fake([5, 4, 3, 2, 1, 0], [0, 0, 1, 1, 1, 1], [11, 10, 9, 8, 7, 6])
    acc, length = metric_rows({"a": before, "b": after}, ["a", "b"])
    assert acc["key"] == "lm_eval.t:acc" and acc["format"] == "percent" and acc["better"] == "higher"
    assert acc["values"] == {"a": 0.5, "b": pytest.approx(4 / 6)}
    interval = acc["intervals"]["b"]
    # 2 gained, 1 lost: McNemar's exact p = 2 * P(X <= 1 | n=3, 1/2) = 2 * 4/8 = 1.0
    assert (interval["method"], interval["n"], interval["p"], interval["significant"]) == ("mcnemar-exact", 6, 1.0, False)
    assert interval["diff"] == pytest.approx(1 / 6)
    assert length["format"] == "number" and length["better"] == "lower"
    assert length["intervals"]["b"]["method"] == "bootstrap" and length["intervals"]["b"]["diff"] == pytest.approx(1.0)


@pytest.mark.lmeval
def test_eval_shows_each_task_before_and_after(tmp_path, chat_model_dir, stopping_model_dir):
    """`liandan eval --lm-eval` adds each task's metrics to the table and the JSON, the second
    model with its paired interval; the values are those of `run_lm_eval` on each model."""
    from typer.testing import CliRunner

    from liandan.cli import app

    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(chat_model_dir), "--model", str(stopping_model_dir), "--probes", "none", "--drift", "none",
            "--lm-eval", "liandan_tiny_mc", "--lm-eval-include", str(TASKS), "--lm-eval-limit", "6", "--device", "cpu",
            "--dtype", "float32", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "liandan_tiny_mc" in result.output  # its row in the table (wrapped to the terminal width)
    rows = {m["key"]: m for m in json.loads(out.read_text())["metrics"]}
    acc = rows["lm_eval.liandan_tiny_mc:acc"]
    assert acc["intervals"][str(stopping_model_dir)]["n"] == 6
    for spec in (chat_model_dir, stopping_model_dir):
        model, tokenizer = load_model(str(spec), device="cpu", dtype="float32")
        direct = run_lm_eval(model, tokenizer, ["liandan_tiny_mc"], include_path=str(TASKS), limit=6)
        assert acc["values"][str(spec)] == pytest.approx(direct["liandan_tiny_mc"]["metrics"]["acc"]["value"])


def test_eval_refuses_an_unknown_lm_eval_task_before_loading_a_model(tmp_path):
    from typer.testing import CliRunner

    from liandan.cli import app

    if not HAS_LM_EVAL:
        pytest.skip("lm-eval is not installed")
    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "no-such-model"), "--lm-eval", "liandan_tiny_mcq",
                                      "--lm-eval-include", str(TASKS), "--probes", "none", "--drift", "none"])  # fmt: skip
    assert result.exit_code == 2
    assert "unknown lm-eval task 'liandan_tiny_mcq': did you mean liandan_tiny_mc" in result.output


@pytest.mark.lmeval
def test_lm_eval_through_serve_scores_as_in_process(chat_model, chat_model_dir):
    """lm-eval's own local-completions client, pointed at `liandan serve`, gives the in-process
    scores on both tiny tasks (log-likelihoods through logprobs + echo, generation through
    completions)."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from liandan.serve import create_app
    from test_serve_cli import served

    model, tokenizer = chat_model
    tasks = ["liandan_tiny_mc", "liandan_tiny_gen"]
    direct = run_lm_eval(model, tokenizer, tasks, include_path=str(TASKS), batch_size=1)
    with served(create_app(model, tokenizer, model_name="tiny")) as (address, _):
        client = LocalCompletionsAPI(base_url=f"http://{address[0]}:{address[1]}/v1/completions", model="tiny",
                                     tokenizer_backend="huggingface", tokenizer=str(chat_model_dir), num_concurrent=1)  # fmt: skip
        remote = run_lm_eval(client, None, tasks, include_path=str(TASKS))
    for task in tasks:
        for metric, found in direct[task]["metrics"].items():
            assert remote[task]["metrics"][metric]["items"] == found["items"], (task, metric)
