"""Evaluate models before vs after fine-tuning: task score, generation health, retention, drift.

    from liandan.evaluation import EvalConfig, evaluate
    result = evaluate(EvalConfig(models=["default", "runs/extract"],
                                 task="examples/extract/test.jsonl", schema="examples/extract/schema.json"))
    result["metrics"][0]   # {'key': 'task.score', 'values': {'default': 0.0, 'runs/extract': 0.93}, ...}

The first model is "before"; every other model is compared with it.

- **task**: held-out prompts with checks or reference answers, read and scored by `liandan.eval_sets`;
  a record that offers ``tools`` is rendered with them;
- **health**: the share of outputs that stop by themselves, their mean length, repetition;
- **retention**: a general probe set shipped with liandan (facts, arithmetic, reasoning,
  instruction following, translation), scored the same way: what fine-tuning made it forget;
- **drift**: the first model answers general prompts; each model's perplexity on those answers
  says how far it moved from the original on everything the task did not cover;
- **prompting first** (``few_shot``): the first model again with k training examples before each
  task prompt (`liandan.fewshot`), and every model's prompt tokens per request: what each costs.

The result is a plain dict (JSON-ready) that `liandan.eval_report` renders, and that Jupyter
shows as that report's page.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .data import read_texts
from .errors import LiandanError
from .eval_report import render_html
from .eval_sets import (
    EvalSet,
    answer_nll,
    health,
    mean_or_none,
    preference_accuracy,
    read_eval_set,
    read_set_spec,
    repetition,
    score_set,
    text_nll,
)
from .fewshot import few_shot_name, few_shot_turns, request_cost, with_shots
from .generation import SamplingConfig, generate
from .lm_eval_tasks import check_tasks, metric_rows, run_lm_eval
from .models import check_models, load_model, load_tokenizer, release_model
from .preference import read_pairs
from .prompts import read_general_prompts
from .tools import BUILTIN_TEMPLATES, CallFormat, call_format, tools_problem, with_tools_template
from .uncertainty import paired_bootstrap_mean, paired_bootstrap_ratio, paired_proportions


@dataclass
class EvalConfig:
    """What `evaluate` runs. Sets given as ``"none"`` are skipped."""

    models: list[str] = field(default_factory=lambda: ["default"])
    """Models to evaluate; the first is the baseline ("before")."""
    task: str | None = None
    """A task set: JSONL of prompts (or conversations ending with the reference answer) with checks."""
    schema: str | None = None
    """A JSON Schema every task answer must follow (adds the json and schema checks)."""
    checks: dict = field(default_factory=dict)
    """Checks added to every task record, e.g. {"regex": "^Arr"}."""
    probes: str = "default"
    """Retention probe set: "default" (shipped with liandan), a file, or "none"."""
    drift: str = "default"
    """General prompts for drift: "default", a file, or "none"."""
    pairs: str | None = None
    """Held-out preference pairs: how often the chosen reply gets the higher log-prob."""
    text: str | None = None
    """Held-out raw text (.txt or text records): perplexity."""
    system: str | None = None
    """A system prompt for the task set's chat rendering (probes and drift never get one)."""
    max_new_tokens: int = 160
    probe_max_new_tokens: int = 48
    drift_max_new_tokens: int = 96
    batch_size: int = 64
    device: str = "auto"
    dtype: str = "auto"
    lm_eval: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks run on every model in this process (the lmeval extra)."""
    lm_eval_limit: int | None = None
    """Score only the first N items of each lm-eval task (quick runs)."""
    lm_eval_include: str | None = None
    """A folder of local lm-eval task YAML files (with their data), for offline tasks."""
    few_shot: int = 0
    """Also evaluate the first model with this many training examples before each task prompt (see `liandan.fewshot`)."""
    few_shot_data: str | None = None
    """The training data the few-shot examples are drawn from (never an eval prompt)."""
    few_shot_system: str | None = None
    """The few-shot column's system prompt (default: ``system``)."""
    few_shot_seed: int = 0
    """The seed that draws the few-shot examples."""
    tools_template: str | None = None
    """For a task set with tools: "chatml" (liandan's ChatML tools template) or a .jinja file, given
    to every model whose own chat template renders no tools (a run trained with one keeps its own)."""

    def __post_init__(self) -> None:
        spec = self.tools_template
        if spec is not None and spec not in BUILTIN_TEMPLATES and not (spec.endswith(".jinja") and Path(spec).is_file()):
            raise LiandanError(f"--tools-template {spec!r}: expected {', '.join(BUILTIN_TEMPLATES)} or a .jinja file that exists")
        if self.few_shot < 0:
            raise LiandanError(f"--few-shot {self.few_shot}: expected a number of examples, 0 for none")
        if self.few_shot and not (self.few_shot_data and self.task):
            raise LiandanError("--few-shot needs --few-shot-data TRAIN.jsonl to draw examples from and a --task set to prompt")
        if not self.few_shot and (self.few_shot_data or self.few_shot_system):
            raise LiandanError("--few-shot-data and --few-shot-system do nothing without --few-shot K")


# ---------------------------------------------------------------------------------------------
# The evaluation


Progress = Callable[[str, int], None]


def evaluate(config: EvalConfig, *, progress: Progress | None = None, load=None, evaluation: Evaluation | None = None) -> EvalResult:
    """Run every set through every model (one model in memory at a time); see the module doc.
    ``evaluation`` is an `Evaluation` of ``config`` already made (its sets read and checked)."""
    evaluation = evaluation or Evaluation(config)
    evaluation.check_tools(config.models)
    for n, spec in enumerate(config.models):
        evaluation.run(spec, progress=progress, load=load)
        if n == 0 and evaluation.shots:  # the prompt-only baseline, beside the model it prompts
            evaluation.run(spec, name=few_shot_name(spec, config.few_shot), system=config.few_shot_system, shots=evaluation.shots,
                           progress=progress, load=load)  # fmt: skip
    return evaluation.result()


class Evaluation:
    """The same sets through models one at a time: the first model run is the baseline, whose
    own answers to the drift prompts are what every model's drift is measured on.

        evaluation = Evaluation(config)
        evaluation.run("default")          # before
        ...                                # fine-tune
        evaluation.run("runs/extract")     # after
        result = evaluation.result()
    """

    def __init__(self, config: EvalConfig):
        self.config = config
        self.task = read_eval_set(config.task, name="task", extra_checks=config.checks, schema=config.schema) if config.task else None
        self.probes = read_set_spec(config.probes, name="probes")
        self.drift_prompts = read_general_prompts(config.drift)
        self.shots = few_shot_turns(config.few_shot_data, config.few_shot, seed=config.few_shot_seed,
                                    exclude=[i.prompt for i in self.task.items]) if config.few_shot else None  # fmt: skip

        self.pairs = read_pairs(config.pairs) if config.pairs else None
        self.texts = read_texts([config.text]) if config.text else None
        if config.lm_eval:
            check_tasks(config.lm_eval, config.lm_eval_include)
        if not (self.task or self.probes or self.drift_prompts or self.pairs or self.texts or config.lm_eval):
            raise LiandanError("nothing to evaluate: give --task FILE, or keep the probe or drift sets")
        if config.tools_template and (self.task is None or self.task.tool_item is None):
            raise LiandanError(f"--tools-template {config.tools_template}: changes nothing here, as no task record offers tools "
                               "or calls; give a --task set with 'tools'")  # fmt: skip
        self.notes: list[str] = []  # what was changed for a model (a tools template given to it)
        self.lm_eval: dict[str, dict] = {}  # per model: its lm-eval results, items included
        self.per_model: dict[str, dict] = {}
        self.items: dict[str, dict] = {}  # per model: per-item drift, preference and text figures, for intervals
        self.outputs: dict[str, dict[str, list]] = {"task": {}, "probes": {}}
        self.drift_answers: list[str] | None = None
        self.specs: dict[str, str] = {}
        self.prompted: list[str] = []  # the names of few-shot runs

    def run(self, spec: str, *, name: str | None = None, system: str | None = None, shots: list[dict] | None = None,
            progress: Progress | None = None, load=None) -> dict:  # fmt: skip
        """Evaluate one model; ``name`` labels it in the result (default: ``spec``); ``system``
        overrides the config's system prompt for the task set, ``shots`` (`liandan.fewshot`) come
        before each task prompt. Returns its scores."""
        load = load or (lambda s: load_model(s, device=self.config.device, dtype=self.config.dtype))
        step = progress or (lambda label, n: None)
        name = name or spec
        self.specs[name] = spec
        if shots:
            self.prompted.append(name)
        model, tokenizer = load(spec)
        try:
            calls, note = self._prepare_tools(tokenizer, name)
            if note and f"{name}: {note}" not in self.notes:
                self.notes.append(f"{name}: {note}")
            system = self.config.system if system is None else system
            self.per_model[name] = self._score(model, tokenizer, name, system, step, shots, calls)
        finally:
            release_model(model)
            del model
        return self.per_model[name]

    def check_tools(self, specs: list[str]) -> None:
        """Before any model loads: every model in ``specs`` renders the task set's tools (given
        ``tools_template`` when its own template cannot) and its calls can be read back. Reads
        their tokenizers only."""
        if self.task is None or self.task.tool_item is None:
            return
        for spec, source in zip(specs, check_models(specs), strict=True):
            self._prepare_tools(load_tokenizer(source), spec)

    def _prepare_tools(self, tokenizer: Any, name: str) -> tuple[CallFormat | None, str | None]:
        """For a task set with tools: give ``tokenizer`` the tools template when its own renders
        none, and find how its template writes calls. Returns (that call format, a note of what
        changed); (None, None) for a set without tools."""
        item = self.task.tool_item if self.task is not None else None
        if item is None:
            return None, None
        try:
            note = with_tools_template(tokenizer, self.config.tools_template, where="--tools-template")
        except LiandanError as exc:
            raise LiandanError(f"model '{name}': {exc}") from None
        problem = tools_problem(tokenizer)
        if problem:
            raise LiandanError(f"{item.prompt.source}: this record uses tools, but model '{name}' cannot render them: {problem}; "
                               "pass --tools-template chatml (liandan's ChatML tools template, for ChatML models such as the "
                               "default) or a .jinja template that renders tools")  # fmt: skip
        try:
            return call_format(tokenizer), note
        except LiandanError as exc:
            raise LiandanError(f"model '{name}': {exc}") from None

    def _score(self, model, tokenizer, name: str, system: str | None, step, shots: list[dict] | None = None,
               calls: CallFormat | None = None) -> dict:  # fmt: skip
        config, scores, gens, items = self.config, {}, [], {}
        # A prompt does not change the weights: a few-shot run reuses the first run's probes, drift
        # and the rest, and is scored on the task set only.
        plain = next(iter(self.per_model), None) if shots else None
        for eval_set, limit, sys_prompt in ((self.task, config.max_new_tokens, system),
                                            (None if plain else self.probes, config.probe_max_new_tokens, None)):  # fmt: skip
            if eval_set is None:
                continue
            prompts = [i.prompt for i in eval_set.items]
            if eval_set is self.task:
                prompts = with_shots(prompts, shots or [])
                scores["cost"], items["cost"] = request_cost(tokenizer, prompts, sys_prompt)
            sampling = SamplingConfig(max_new_tokens=limit, batch_size=config.batch_size)
            generated = generate(model, tokenizer, prompts, system=sys_prompt, config=sampling,
                                 model_name=name, on_batch=lambda n, s=eval_set.name: step(f"{name} · {s}", n))  # fmt: skip
            set_calls = calls if eval_set is self.task else None
            self.outputs[eval_set.name][name], scores[eval_set.name] = score_set(eval_set, generated, set_calls)
            gens += generated
        if plain:
            return self._reuse(plain, name, scores, items, gens)
        scores["health"] = health(gens) if gens else {}
        if self.drift_prompts:
            if self.drift_answers is None:  # the baseline's own answers are the yardstick
                sampling = SamplingConfig(max_new_tokens=config.drift_max_new_tokens, batch_size=config.batch_size)
                self.drift_answers = [g.text for g in generate(model, tokenizer, self.drift_prompts, config=sampling, model_name=name,
                                                               on_batch=lambda n: step(f"{name} · drift answers", n))]  # fmt: skip
            nll, *drift = answer_nll(model, tokenizer, self.drift_prompts, self.drift_answers, per_item=True)
            step(f"{name} · drift", len(self.drift_prompts))
            scores["drift"] = {"nll": nll, "perplexity": math.exp(nll)}
            items["drift"] = {"nll_sums": drift[0], "tokens": drift[1]}
        if self.pairs:
            scores["prefs"] = preference_accuracy(model, tokenizer, self.pairs)
            items["prefs"] = scores["prefs"].pop("items")
            step(f"{name} · preference pairs", len(self.pairs))
        if self.texts:
            nll, *text = text_nll(model, tokenizer, self.texts, per_item=True)
            scores["text"] = {"nll": nll, "perplexity": math.exp(nll)}
            items["text"] = {"nll_sums": text[0], "tokens": text[1]}
            step(f"{name} · held-out text", 1)
        if config.lm_eval:
            found = run_lm_eval(model, tokenizer, config.lm_eval, limit=config.lm_eval_limit, include_path=config.lm_eval_include,
                                batch_size=min(config.batch_size, 16))  # fmt: skip
            self.lm_eval[name] = found
            scores["lm_eval"] = {f"{task}:{metric}": m["value"] for task, r in found.items() for metric, m in r["metrics"].items()}
            step(f"{name} · lm-eval", 1)
        self.items[name] = items
        return scores

    def _reuse(self, plain: str, name: str, scores: dict, items: dict, gens: list) -> dict:
        """``name``'s scores: its own on the task set, ``plain``'s (the same weights) on the rest."""
        if self.probes is not None:
            self.outputs["probes"][name] = self.outputs["probes"][plain]
            gens += [SimpleNamespace(**o) for o in self.outputs["probes"][plain]]
        scores.update({k: dict(v) for k, v in self.per_model[plain].items() if k not in scores and k != "health"})
        scores["health"] = health(gens) if gens else {}
        self.items[name] = {**self.items[plain], **items}
        if plain in self.lm_eval:
            self.lm_eval[name] = self.lm_eval[plain]
        return scores

    def units(self, models: int = 1, prompted: int = 0) -> int:
        """How many prompts ``models`` more runs and ``prompted`` more few-shot runs (task set only)
        report through ``progress`` (for a progress bar)."""
        per_model = sum(len(s.items) for s in (self.task, self.probes) if s is not None)
        per_model += len(self.drift_prompts or []) + len(self.pairs or []) + bool(self.texts) + bool(self.config.lm_eval)
        baseline_answers = len(self.drift_prompts or []) if self.drift_answers is None and models else 0
        return models * per_model + prompted * len(self.task.items if self.task else []) + baseline_answers

    def result(self) -> EvalResult:
        result = build_result(self.config, self.per_model, self.outputs, self.task, self.probes, self.specs, self.items)
        for m in self.prompted:  # the first model's weights: its loss curve is already there
            result["labels"][m] = "prompt only"
            result["curves"].pop(m, None)
        if self.notes:
            result["notes"] = list(self.notes)
        if self.lm_eval:
            result["metrics"] += metric_rows(self.lm_eval, result["models"])
            result["settings"].update(lm_eval=self.config.lm_eval, lm_eval_limit=self.config.lm_eval_limit)
        return result


METRICS = [  # key, label, better, format
    ("task.score", "Task: all checks pass", "higher", "percent"),
    ("health.stop_rate", "Stops by itself", "higher", "percent"),
    ("health.mean_tokens", "Mean output tokens", "neutral", "number"),
    ("health.repetition", "Repeated 4-grams", "lower", "percent"),
    ("cost.prompt_tokens", "Prompt tokens per request", "lower", "number"),
    ("probes.score", "Probes passed", "higher", "percent"),
    ("probes.kept", "Retention: probes still passed, of those passed before", "higher", "percent"),
    ("drift.perplexity", "Drift: perplexity of the original's answers", "lower", "number"),
    ("prefs.accuracy", "Preference accuracy: chosen more likely than rejected", "higher", "percent"),
    ("prefs.accuracy_per_token", "Preference accuracy, per-token log-probs", "higher", "percent"),
    ("prefs.margin", "Preference margin: log p(chosen) - log p(rejected)", "higher", "number"),
    ("text.perplexity", "Held-out text perplexity", "lower", "number"),
]
CALL_METRICS = [  # the tool_call check split by what the reference turn does (see `score_set`)
    ("task.call", "Task: the right call, where one is needed", "higher", "percent"),
    ("task.no_call", "Task: no call, where none is needed", "higher", "percent"),
]


class EvalResult(dict):
    """The result of `evaluate`: a plain JSON-ready dict (``models``, ``metrics``, ``scores``,
    ``sets``, ...) that Jupyter shows as the page ``liandan eval --out eval.html`` writes."""

    def _repr_html_(self) -> str:
        return render_html(self)


def build_result(config: EvalConfig, per_model: dict, outputs: dict, task: EvalSet | None, probes: EvalSet | None,
                 specs: dict[str, str], items: dict | None = None) -> EvalResult:  # fmt: skip
    """The result dict. Each metric carries, per model after the first, ``intervals[model]``: its
    paired difference from the first model with a 95% interval (`compare_models`), computed from
    the per-item ``outputs`` of the task and probe sets and ``items`` (`Evaluation.items`)."""
    models = list(per_model)
    if probes is not None and models:
        add_kept(per_model, outputs["probes"], models[0])
    split = {key.split(".")[1] for key, *_ in CALL_METRICS}
    check_names = sorted({k for s in per_model.values() for k in s.get("task", {}) if k not in ("score", "by_category", *split)})
    task_rows = [(f"task.{c}", f"Task: {c}", "higher", "percent") for c in check_names] + CALL_METRICS
    metrics = []
    for key, label, better, fmt in METRICS[:1] + task_rows + METRICS[1:]:
        group, name = key.split(".")
        values = {m: per_model[m].get(group, {}).get(name) for m in models}
        if any(v is not None for v in values.values()):
            metrics.append({"key": key, "label": label, "better": better, "format": fmt, "values": values})
            intervals = {m: c for m in models[1:] if (c := compare_models(key, models[0], m, outputs, items or {}))}
            if intervals:
                metrics[-1]["intervals"] = intervals
    sets = [set_section(s, outputs[s.name], models, title) for s, title in
            ((task, f"Task set: {config.task}"), (probes, "Retention probes")) if s is not None]  # fmt: skip
    bars = []
    if task is not None and any("by_category" in per_model[m].get("task", {}) for m in models):
        groups = {c: {m: per_model[m].get("task", {}).get("by_category", {}).get(c) for m in models}
                  for c in sorted({i.category for i in task.items if i.category})}  # fmt: skip
        bars.append({"title": "Task by category: all checks pass", "format": "percent", "groups": groups})
    if probes is not None and any("by_category" in per_model[m].get("probes", {}) for m in models):
        groups = {c: {m: per_model[m]["probes"]["by_category"].get(c) for m in models}
                  for c in per_model[models[0]]["probes"].get("by_category", {})}  # fmt: skip
        bars.append({"title": "Retention by probe category", "format": "percent", "groups": groups})
    return EvalResult({
        "title": "liandan eval",
        "models": models,
        "labels": {m: ("before" if i == 0 else "after") for i, m in enumerate(models)} if len(models) > 1 else {},
        "metrics": metrics,
        "scores": per_model,
        "sets": sets,
        "bars": bars,
        "curves": {m: c for m in models if (c := read_curve(specs[m]))},
        "settings": {"max_new_tokens": config.max_new_tokens, "probe_max_new_tokens": config.probe_max_new_tokens,
                     "drift_max_new_tokens": config.drift_max_new_tokens, "decoding": "greedy",
                     "probes": config.probes, "drift": config.drift,
                     **({"tools_template": config.tools_template} if config.tools_template else {})},  # fmt: skip
    })


def add_kept(per_model: dict, probe_outputs: dict, baseline: str) -> None:
    """Forgetting, measured directly: of the probes the baseline passed, the share each model
    still passes. Gains on probes the baseline failed do not hide losses, as they do in the
    plain pass rate."""
    known = [i for i, o in enumerate(probe_outputs[baseline]) if o["passed"]]
    for model, outs in probe_outputs.items():
        per_model[model]["probes"]["kept"] = mean_or_none(outs[i]["passed"] for i in known)


def compare_models(key: str, before: str, after: str, outputs: dict, items: dict) -> dict | None:
    """Metric ``key`` of model ``after`` against ``before``, paired item by item (see
    `liandan.uncertainty`): pass/fail metrics by McNemar's exact test and Newcombe's interval,
    means and perplexities by a paired bootstrap. None when the per-item results are missing."""
    group, name = key.split(".")
    if group in ("task", "probes", "health"):
        sets = ("task", "probes") if group == "health" else (group,)  # health pools every generation
        b = [o for s in sets for o in outputs.get(s, {}).get(before) or []]
        a = [o for s in sets for o in outputs.get(s, {}).get(after) or []]
        if not b or len(a) != len(b):
            return None
        if key == "probes.kept":  # defined over the probes the baseline passed
            a = [y for x, y in zip(b, a) if x["passed"]]
            return paired_proportions([True] * len(a), [y["passed"] for y in a])
        if key == "health.mean_tokens":
            return paired_bootstrap_mean([x["new_tokens"] for x in b], [y["new_tokens"] for y in a])
        if key == "health.repetition":
            return paired_bootstrap_mean([repetition(x["text"]) for x in b], [repetition(y["text"]) for y in a])
        if group == "task" and name in ("call", "no_call"):  # the tool_call check over the items it is split by
            pairs = [(x["checks"]["tool_call"], y["checks"]["tool_call"]) for x, y in zip(b, a)
                     if x.get("expects_call") is (name == "call") and "tool_call" in y["checks"]]  # fmt: skip
            return paired_proportions([x for x, _ in pairs], [y for _, y in pairs]) if pairs else None
        flag = "stopped" if key == "health.stop_rate" else "passed" if name == "score" else None
        pairs = [(x[flag], y[flag]) if flag else (x["checks"].get(name), y["checks"].get(name)) for x, y in zip(b, a)]
        pairs = [(x, y) for x, y in pairs if isinstance(x, bool) and isinstance(y, bool)]  # a check may not apply
        return paired_proportions([x for x, _ in pairs], [y for _, y in pairs])
    b, a = items.get(before, {}).get(group), items.get(after, {}).get(group)
    if not b or not a:
        return None
    if group in ("drift", "text") and name == "perplexity":
        return paired_bootstrap_ratio((b["nll_sums"], b["tokens"]), (a["nll_sums"], a["tokens"]))
    if key in ("prefs.margin", "cost.prompt_tokens"):
        column = "margins" if group == "prefs" else name
        return paired_bootstrap_mean(b[column], a[column])
    if key in ("prefs.accuracy", "prefs.accuracy_per_token"):
        column = "margins" if key == "prefs.accuracy" else "per_token_margins"
        return paired_proportions([m > 0 for m in b[column]], [m > 0 for m in a[column]])
    return None


def set_section(eval_set: EvalSet, outputs: dict, models: list[str], title: str) -> dict:
    names = sorted({n for outs in outputs.values() for o in outs for n in o["checks"]})
    return {
        "name": eval_set.name, "title": title, "metric_names": names,
        "examples": [
            {"id": item.id, "prompt": item.prompt.display, "reference": item.reference, "category": item.category,
             **({"reference_calls": item.reference_calls} if item.uses_tools else {}),
             "outputs": {m: outputs[m][i] for m in models if m in outputs}}
            for i, item in enumerate(eval_set.items)
        ],
    }  # fmt: skip


def read_curve(spec: str) -> list[dict]:
    """The loss curve of a run directory (metrics.jsonl), or [] for anything else."""
    path = Path(spec) / "metrics.jsonl"
    if not path.is_file():
        return []
    keep = ("step", "loss", "eval_loss")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, path.read_text().splitlines()) if "step" in r]


def metric_value(result: dict, key: str, model: str) -> float | None:
    for metric in result["metrics"]:
        if metric["key"] == key:
            return metric["values"].get(model)
    return None
