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


@pytest.fixture(autouse=True)
def lm_eval_or_skip(request):
    if request.node.get_closest_marker("lmeval") and not HAS_LM_EVAL:
        reason = "lm-eval is not installed (pip install -e '.[lmeval]')"
        if os.environ.get("LIANDAN_REQUIRE_LMEVAL"):  # CI installs it: a skip there would hide the checks
            pytest.fail(reason + " but LIANDAN_REQUIRE_LMEVAL is set")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def chat_model(chat_model_dir):
    return load_model(str(chat_model_dir), dtype="float32")


@pytest.fixture(scope="module")
def both_tasks(chat_model, tmp_path_factory):
    """Both tiny tasks, run from another directory: their data_files are relative to the YAML."""
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
