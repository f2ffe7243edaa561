"""lm-evaluation-harness tasks run in this process over a model that is already loaded.

Needs the lmeval extra (``pip install 'liandan[lmeval]'``, which pins lm-eval 0.4.13).

    from liandan.models import load_model
    from liandan.lm_eval_tasks import run_lm_eval

    model, tokenizer = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    results = run_lm_eval(model, tokenizer, ["liandan_tiny_mc"], include_path="tests/lm_eval_task")
    results["liandan_tiny_mc"]["metrics"]["acc"]["value"]

What comes back, for each task that ran (a group's member tasks each get their own entry):

    {"liandan_tiny_mc": {
        "n": 10,                        # items scored (after `limit`)
        "doc_ids": [0, 1, ..., 9],      # the items, in this order in every list below
        "num_fewshot": 0,
        "metrics": {"acc": {"value": 0.2, "stderr": 0.133, "higher_is_better": True,
                            "items": [1.0, 0.0, ...]},   # None when the metric is not a mean of items
                    "acc_norm": {...}}}}

A metric measured after a filter other than lm-eval's "none" is named ``metric,filter``
(``exact_match,strict-match``), as lm-eval names it. ``stderr`` is lm-eval's own (None where it
has none). Items follow ``doc_ids``, so two models' lists pair item by item.

A local task is one lm-eval YAML file per task in a folder passed as ``include_path``, next to
its data (see tests/lm_eval_task/ for a multiple-choice and a generation task):

    task: my_quiz
    dataset_path: json
    dataset_kwargs: {data_files: {test: quiz.jsonl}}   # relative to this YAML file's folder
    test_split: test
    output_type: multiple_choice                        # or generate_until, loglikelihood
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_choice: "{{choices}}"
    doc_to_target: answer                               # index of the right choice
    metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]

lm-eval alone reads a relative ``data_files`` path from the current directory; here it is read
from the YAML file's folder when the file is there. The Hugging Face Hub is switched off while
tasks load and run, so a built-in task works only if its dataset is already in the local
datasets cache: nothing is downloaded by surprise, and a task that would need to is refused.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any

from .errors import LiandanError
from .uncertainty import paired_bootstrap_mean, paired_proportions

INSTALL_HINT = "pip install 'liandan[lmeval]'"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: int | None = None,
    include_path: str | os.PathLike | None = None,
    batch_size: int = 8,
    seed: int = 0,
    verbose: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run lm-eval ``tasks`` on ``model`` (a loaded transformers causal LM, or an lm-eval model
    object such as its ``local-completions`` client of `liandan serve`, when ``tokenizer`` is
    None) and return, per task,
    its metrics with lm-eval's stderr and the per-item values in ``doc_id`` order (see the module
    docstring). ``limit`` keeps the first items of each task; ``seed`` seeds lm-eval's sampling and
    few-shot choice, and the caller's random states are restored afterwards. lm-eval's logging and
    progress bars are silenced unless ``verbose``."""
    if not tasks:
        raise LiandanError("no lm-eval task given: name at least one (for example hellaswag, or a task in the include_path folder)")
    if limit is not None and limit < 1:
        raise LiandanError(f"limit must be a positive number of items per task, got {limit}")
    evaluator, HFLM = _import_lm_eval()
    with _quiet_offline_and_seeded(verbose, seed):
        manager = _task_manager(tasks, include_path)
        loaded = _load_tasks(manager, tasks)
        for task in loaded["tasks"].values():
            if task.get_config("num_fewshot") is None:  # as lm-eval's own CLI does
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=seed)
        lm = model if tokenizer is None else HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        raw = evaluator.evaluate(lm, loaded, limit=limit, log_samples=True)
    return {name: _task_result(name, task, raw) for name, task in loaded["tasks"].items()}


def check_tasks(tasks: list[str], include_path: str | os.PathLike | None = None) -> None:
    """Fail before any model loads: lm-eval missing, or a task name it does not know."""
    _import_lm_eval()
    with _quiet_offline_and_seeded(verbose=False, seed=0):
        manager = _task_manager(tasks, include_path)
        for name in tasks:
            _known(manager, name)


def metric_rows(results: dict[str, dict], models: list[str]) -> list[dict]:
    """Rows for `liandan.evaluation`'s table from each model's `run_lm_eval` results: one per task
    and metric, keyed ``lm_eval.TASK:METRIC``, with each later model's paired difference from the
    first and its 95% interval (`liandan.uncertainty`: McNemar and Newcombe when every item scores
    0 or 1, as accuracy does; else a paired bootstrap of the mean), over the items both scored."""
    rows = []
    for task, first in (results.get(models[0]) or {}).items():
        for metric, found in first["metrics"].items():
            per_model = {m: (results.get(m) or {}).get(task) for m in models}
            values = {m: r["metrics"].get(metric, {}).get("value") if r else None for m, r in per_model.items()}
            scored = [r["metrics"][metric]["items"] for r in per_model.values() if r and r["metrics"].get(metric, {}).get("items")]
            binary = bool(scored) and all(v in (0.0, 1.0) for items in scored for v in items)
            row = {"key": f"lm_eval.{task}:{metric}", "label": f"lm-eval {task}: {metric}",
                   "better": "lower" if found.get("higher_is_better") is False else "higher",
                   "format": "percent" if binary else "number", "values": values}  # fmt: skip
            intervals = {m: c for m in models[1:] if (c := _paired(per_model[models[0]], per_model[m], metric, binary))}
            if intervals:
                row["intervals"] = intervals
            rows.append(row)
    return rows


def _paired(before: dict | None, after: dict | None, metric: str, binary: bool) -> dict | None:
    """One model's difference from the baseline on one metric, over the documents both scored."""
    if not before or not after:
        return None
    b, a = before["metrics"].get(metric, {}).get("items"), after["metrics"].get(metric, {}).get("items")
    if not b or not a:
        return None
    b_by_doc, a_by_doc = dict(zip(before["doc_ids"], b)), dict(zip(after["doc_ids"], a))
    common = [doc for doc in before["doc_ids"] if doc in a_by_doc]
    if not common:
        return None
    x, y = [b_by_doc[d] for d in common], [a_by_doc[d] for d in common]
    return paired_proportions([v == 1.0 for v in x], [v == 1.0 for v in y]) if binary else paired_bootstrap_mean(x, y)


def _import_lm_eval():
    try:
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:
        raise LiandanError(f"lm-eval is not installed ({error}); install it with: {INSTALL_HINT}") from None
    return evaluator, HFLM


@contextlib.contextmanager
def _quiet_offline_and_seeded(verbose: bool, seed: int):
    """Hub off (the variables for child processes, the module flags that huggingface_hub and
    datasets read once at import for this one), lm-eval's logging and progress bars quiet, the
    random generators seeded; all put back afterwards."""
    import datasets.config
    import huggingface_hub.constants
    import numpy as np
    import torch

    saved_env = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    saved_flags = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    lm_eval_logger = logging.getLogger("lm_eval")
    saved_level = lm_eval_logger.level
    saved_random, saved_numpy = random.getstate(), np.random.get_state()
    os.environ.update(dict.fromkeys(OFFLINE_VARIABLES, "1"))
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    # lm-eval passes disable=False to its progress bars, so they are quieted where they print.
    bars = io.StringIO()
    if not verbose:
        lm_eval_logger.setLevel(logging.ERROR)
    try:
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stderr(sys.stderr if verbose else bars):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            yield
    except LiandanError:
        raise
    except BaseException:
        sys.stderr.write(bars.getvalue())  # what led up to an unexpected failure
        raise
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = (
            saved_flags
        )
        lm_eval_logger.setLevel(saved_level)
        random.setstate(saved_random)
        np.random.set_state(saved_numpy)


def _task_manager(tasks: list[str], include_path: str | os.PathLike | None):
    """lm-eval's index of task names. Indexing its ~15,000 built-in tasks takes half a minute,
    so a run that names only tasks in ``include_path`` indexes that folder alone, and the index
    with the built-in tasks is kept for the next run (a before/after comparison runs twice)."""
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return _index_with_builtins(None)
    folder = Path(include_path).resolve()
    if not folder.is_dir():
        raise LiandanError(f"lm-eval include path '{include_path}' is not a folder of task YAML files")
    local = TaskManager(include_path=str(folder), include_defaults=False)
    if all(name in local.all_tasks for name in tasks):
        return local
    return _index_with_builtins(str(folder))


@functools.lru_cache(maxsize=4)
def _index_with_builtins(folder: str | None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=folder)


def _load_tasks(manager, tasks: list[str]) -> dict[str, Any]:
    """Build each named task (its dataset is read here), one at a time so that an error names it."""
    merged: dict[str, dict] = {"tasks": {}, "groups": {}, "group_map": {}}
    for name in tasks:
        _known(manager, name)
        try:
            loaded = manager.load([_spec(manager, name)])
        except (ConnectionError, FileNotFoundError) as error:  # datasets raises either, offline
            raise LiandanError(
                f"lm-eval task '{name}' needs data that is not on this machine ({_first_line(error)}); the Hugging Face "
                f"Hub is off while liandan runs lm-eval: download a Hub dataset once into the datasets cache "
                f"(datasets.load_dataset), or point the task's dataset_kwargs.data_files at local files"
            ) from None
        except Exception as error:  # a task's YAML, template or data can fail in many ways: one line naming the task
            raise LiandanError(
                f"lm-eval task '{name}' could not be loaded: {type(error).__name__}: {_first_line(error)}"
            ) from None
        for key, found in merged.items():
            found.update(loaded[key])
    return merged


def _known(manager, name: str) -> None:
    if name not in manager.all_tasks:
        near = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
        hint = (
            f"did you mean {', '.join(near)}?"
            if near
            else "run `lm-eval ls tasks` for the built-in names, or pass the folder of your task's YAML as include_path"
        )
        raise LiandanError(f"unknown lm-eval task '{name}': {hint}")


def _spec(manager, name: str) -> str | dict[str, Any]:
    """The task's name, or for a YAML task its whole config with relative data_files paths made
    absolute against the YAML file's folder (lm-eval would read them from the current directory)."""
    from lm_eval.tasks._index import Kind  # private, but lm-eval is pinned to one release
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index[name]
    if entry.kind is not Kind.TASK or entry.yaml_path is None:
        return name
    config = load_yaml(entry.yaml_path, resolve_func=True)
    data_files = (config.get("dataset_kwargs") or {}).get("data_files")
    if data_files is None:
        return name
    folder = Path(entry.yaml_path).parent
    config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": _resolve_files(data_files, folder)}
    return config


def _resolve_files(files: Any, folder: Path) -> Any:
    if isinstance(files, dict):
        return {split: _resolve_files(value, folder) for split, value in files.items()}
    if isinstance(files, list):
        return [_resolve_files(value, folder) for value in files]
    if isinstance(files, str) and not Path(files).is_absolute() and (folder / files).exists():
        return str(folder / files)
    return files


def _task_result(name: str, task: Any, raw: dict[str, Any]) -> dict[str, Any]:
    """One task's metrics from lm-eval's results, with each mean-aggregated metric's per-item values."""
    from lm_eval.api.metrics import mean

    scores = raw["results"][name]
    samples = sorted(raw["samples"][name], key=lambda sample: sample["doc_id"])
    aggregations = task.aggregation()
    metrics: dict[str, dict[str, Any]] = {}
    doc_ids: list[int] = []
    for key, value in scores.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filter_name = key.split(",", 1)
        rows = [sample for sample in samples if sample["filter"] == filter_name]
        doc_ids = doc_ids or [sample["doc_id"] for sample in rows]
        stderr = scores.get(f"{metric}_stderr,{filter_name}")
        items = [float(sample[metric]) for sample in rows] if aggregations.get(metric) is mean else None
        metrics[metric if filter_name == "none" else key] = {
            "value": float(value),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "higher_is_better": raw["higher_is_better"][name].get(metric),
            "items": items,
        }
    return {"n": len(doc_ids), "doc_ids": doc_ids, "num_fewshot": raw["n-shot"].get(name, 0), "metrics": metrics}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
