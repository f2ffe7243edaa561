"""The main job: look, measure, fine-tune with replay, measure again, on one example task.

    from liandan.quickstart import QuickstartConfig, quickstart
    summary = quickstart(QuickstartConfig())          # the default model on examples/extract
    summary["metrics"]["task.schema"]                 # {'before': 0.0, 'after': 0.97, 'delta': 0.97, 'interval':
                                                      #  {'low': 0.87, 'high': 0.99, 'significant': True, ...}}

Steps, each with its own progress bar:
1. the model's chat vs raw answers to a few task prompts, side by side (``compare.html``);
2. evaluation before training: the task set, generation health, retention probes, drift; and the
   prompt-only baseline: the same model with ``few_shot`` training examples before each task prompt;
3. LoRA fine-tuning on the task's training set, with replay of the model's own answers;
4. the same evaluation of the tuned model;
5. ``report.html`` (before vs after, outputs side by side, loss curve, plots), ``results.json``
   and ``summary.json`` (every figure, machine-readable) in the output directory.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .comparison import compare, print_comparison, write_comparison
from .config import SFTConfig, load_config
from .errors import LiandanError
from .eval_report import print_metrics, write_eval_report
from .evaluation import EvalConfig, Evaluation, compare_models
from .fewshot import few_shot_name
from .files import write_atomic
from .generation import SamplingConfig
from .prompts import shipped_example
from .train import train_sft

MARKER = ".liandan-quickstart"
"""The file quickstart writes in the output directory it creates; ``--overwrite`` replaces only a
directory that holds it."""

EXAMPLE = "extract"
"""The shipped example task: notes to JSON that follows a schema (`examples/extract`)."""


@dataclass
class QuickstartConfig:
    model: str = "default"
    """The model to fine-tune."""
    train: str = str(shipped_example(f"{EXAMPLE}/train.jsonl"))
    """Task training set (conversations)."""
    test: str = str(shipped_example(f"{EXAMPLE}/test.jsonl"))
    """Held-out task set: conversations ending in the reference answer, or prompts with checks."""
    schema: str | None = str(shipped_example(f"{EXAMPLE}/schema.json"))
    """JSON Schema the task's answers must follow (none for a task that is not JSON)."""
    out: str = "quickstart"
    """Output directory: compare.html, report.html, results.json, summary.json and run/."""
    overwrite: bool = False
    """Replace an existing output directory."""
    replay: str = "self"
    """Replay against forgetting: self, a data file, or none."""
    replay_ratio: float = 0.5
    """Replay examples per task example."""
    epochs: float = 1.0
    lr: float = 1e-3
    sft_overrides: list[str] = field(default_factory=list)
    """Further SFT settings as key=value (see `liandan sft --help`)."""
    compare_prompts: int = 3
    """Task prompts shown chat vs raw in step 1."""
    few_shot: int = 4
    """Training examples before each task prompt in the prompt-only baseline; 0 leaves it out."""
    few_shot_system: str | None = None
    """The prompt-only baseline's system prompt."""

    def __post_init__(self) -> None:
        if self.schema == "none":  # as --schema none says it on the command line
            self.schema = None


def check_inputs(config: QuickstartConfig) -> Path:
    """Every input is checked before the first model loads; returns the output directory."""
    for label, path in (("--train", config.train), ("--test", config.test), ("--schema", config.schema)):
        if path and not Path(path).is_file():
            raise LiandanError(f"{label} '{path}' does not exist")
    out = Path(config.out)
    if out.exists() and any(out.iterdir()):
        if not config.overwrite:
            raise LiandanError(f"output directory '{out}' is not empty; pass --overwrite to replace it, or choose --out")
        if not (out / MARKER).is_file():
            raise LiandanError(
                f"--overwrite: '{out}' does not look like a quickstart directory (quickstart did not create it: it has "
                f"no {MARKER} file); refusing to delete it: remove it yourself or choose --out"
            )
    return out


@contextmanager
def fresh_output(out: Path) -> Iterator[Path]:
    """``out`` as a new, empty directory marked as quickstart's. An existing one (checked by
    `check_inputs`) is moved aside and deleted only once the new result is complete; if the run
    fails it is put back, and the failed output is kept next to it as ``.NAME.failed``."""
    old = out.with_name(f".{out.name}.previous") if out.exists() else None
    if old is not None:
        if old.exists():
            if not (old / MARKER).is_file():
                raise LiandanError(f"'{old}' is in the way of --overwrite and quickstart did not create it; remove it")
            shutil.rmtree(old)  # an earlier replacement's leftover: quickstart's own, already superseded
        out.rename(old)
    out.mkdir(parents=True)
    (out / MARKER).write_text("Created by liandan quickstart; quickstart --overwrite may replace this directory.\n")
    try:
        yield out
    except BaseException:
        if old is not None:
            failed = out.with_name(f".{out.name}.failed")
            if failed.exists() and (failed / MARKER).is_file():
                shutil.rmtree(failed)
            out.rename(failed)
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old)


def quickstart(config: QuickstartConfig, console: Any = None) -> dict:
    console = console or Console()
    out = check_inputs(config)
    sft_config = load_config(SFTConfig, None, config.sft_overrides, model=config.model, data=[config.train],
                             output_dir=str(out / "run"), epochs=config.epochs, lr=config.lr,
                             replay=None if config.replay == "none" else config.replay, replay_ratio=config.replay_ratio)  # fmt: skip
    eval_config = EvalConfig(models=[config.model, str(out / "run")], task=config.test, schema=config.schema, few_shot=config.few_shot,
                             few_shot_data=config.train if config.few_shot else None, few_shot_system=config.few_shot_system)  # fmt: skip
    evaluation = Evaluation(eval_config)  # reads and checks every set now, before any work
    with fresh_output(out):
        summary = _run(config, sft_config, evaluation, out, console)
    console.print(f"Report: {out / 'report.html'} · summary: {out / 'summary.json'} · run: {out / 'run'} "
                  f"· total {summary['seconds']['total']:.0f} s", highlight=False)  # fmt: skip
    return summary


def _run(config: QuickstartConfig, sft_config: SFTConfig, evaluation: Evaluation, out: Path, console: Any) -> dict:
    timings: dict[str, float] = {}

    stages = 5 if evaluation.shots else 4
    done = []

    def stage(name: str, title: str):
        done.append(name)
        console.rule(f"[bold]{len(done)}/{stages} {title}")
        return _Timer(timings, name)

    with stage("compare", "Look: chat template vs raw continuation"):
        compare_task(config, evaluation, out, console)
    with stage("eval_before", "Evaluate before fine-tuning"):
        _run_eval(evaluation, config.model, "before")
    if evaluation.shots:
        with stage("eval_few_shot", f"Evaluate the prompt-only baseline: {config.few_shot} examples before each task prompt"):
            _run_eval(evaluation, config.model, "prompt only", few_shot_name(config.model, config.few_shot), config.few_shot_system)
    with stage("train", "Fine-tune (LoRA" + (f", replay {config.replay} x{config.replay_ratio})" if config.replay != "none" else ")")):
        trained = train_sft(sft_config)
    with stage("eval_after", "Evaluate after fine-tuning"):
        _run_eval(evaluation, str(out / "run"), "after")
    result = evaluation.result()
    result["title"] = f"liandan quickstart: {config.model} on {config.test}"
    result["notes"] = [f"{m}: {label}" for m, label in result["labels"].items()]
    few = result["models"][1] if evaluation.shots else None  # did fine-tuning beat prompting? paired, item by item
    versus = {m["key"]: compare_models(m["key"], few, result["models"][-1], evaluation.outputs, evaluation.items)
              for m in result["metrics"]} if few else {}  # fmt: skip
    summary = build_summary(config, result, trained, timings, out, versus)
    result["notes"].append("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    write_eval_report(result, out / "results.json")
    write_eval_report(result, out / "report.html")
    write_atomic(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print_metrics(result, console)
    return summary


def compare_task(config: QuickstartConfig, evaluation, out: Path, console) -> None:
    prompts = [item.prompt for item in evaluation.task.items[: config.compare_prompts]]
    result = compare([config.model], prompts, modes=["chat", "raw"], config=SamplingConfig(max_new_tokens=80, batch_size=8))
    print_comparison(result, console, max_chars=300)
    write_comparison(result, out / "compare.html")


def _run_eval(evaluation, spec: str, label: str, name: str | None = None, system: str | None = None) -> None:
    """One evaluation run with a progress bar; with ``name``, the few-shot run of ``spec``."""
    total = evaluation.units(0, prompted=1) if name else evaluation.units()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(label, total=total)
        evaluation.run(spec, name=name, system=system, shots=evaluation.shots if name else None,
                       progress=lambda what, n: bar.update(task, advance=n, description=f"{label}: {what}"))  # fmt: skip


def build_summary(config: QuickstartConfig, result: dict, trained, timings: dict, out: Path, versus: dict | None = None) -> dict:
    """Every figure; with a prompt-only baseline, each metric's ``few_shot``: its value, its change
    against before, and ``after_vs_few_shot`` (``versus``): after's paired change against it."""
    before, after = result["models"][0], result["models"][-1]
    prompted = [m for m in result["models"][1:-1] if result["labels"].get(m) == "prompt only"]
    metrics = {}
    for metric in result["metrics"]:
        b, a = metric["values"].get(before), metric["values"].get(after)
        # interval: the change's 95% interval over the same items and whether it is more than noise
        metrics[metric["key"]] = {"label": metric["label"], "before": b, "after": a, "better": metric["better"],
                                  "delta": None if a is None or b is None else a - b,
                                  "interval": (metric.get("intervals") or {}).get(after)}  # fmt: skip
        for model in prompted:  # the prompt-only baseline, against before like after is
            f = metric["values"].get(model)
            metrics[metric["key"]]["few_shot"] = {"value": f, "delta": None if f is None or b is None else f - b,
                                                  "interval": (metric.get("intervals") or {}).get(model),
                                                  "after_vs_few_shot": (versus or {}).get(metric["key"])}  # fmt: skip
    manifest = json.loads((out / "run" / "manifest.json").read_text())
    return {
        "model": config.model, "train": config.train, "test": config.test, "schema": config.schema,
        "few_shot": {"name": prompted[0], "examples": config.few_shot, "system": config.few_shot_system} if prompted else None,
        "metrics": metrics,
        "retention_by_category": {c: {"before": v.get(before), "after": v.get(after)}
                                  for bars in result["bars"] for c, v in bars["groups"].items()},  # fmt: skip
        "training": {"steps": trained.steps, "first_loss": trained.losses[0], "last_loss": trained.losses[-1],
                     "examples": manifest["data"]["train_examples"], "replay": manifest.get("replay")},  # fmt: skip
        "seconds": {**{k: round(v, 1) for k, v in timings.items()}, "total": round(sum(timings.values()), 1)},
        "files": {"report": str(out / "report.html"), "results": str(out / "results.json"),
                  "compare": str(out / "compare.html"), "run": str(out / "run")},  # fmt: skip
    }


class _Timer:
    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = time.perf_counter() - self.start
