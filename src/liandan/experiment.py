"""Repeat a training run over seeds and a small grid of settings; mean and spread per metric.

    from liandan.evaluation import EvalConfig
    from liandan.experiment import ExperimentConfig, run_experiment
    result = run_experiment(ExperimentConfig(stage="sft", overrides=["data=examples/pirate.jsonl", "max_steps=30"],
                                             seeds=[0, 1, 2], grid=["replay_ratio=0,0.5"], out="exp"),
                            EvalConfig(task="examples/persona/test.jsonl"))
    result["metrics"][0]["points"]["replay_ratio=0.5"]  # {'n': 3, 'mean': ..., 'sd': ..., 'min': ..., 'max': ...,
                                                        #  'values': [...], 'delta': {...}}

Every (grid point x seed) is its own run directory, ``OUT/POINT/seed-N`` (``OUT/default/seed-N``
without a grid), trained in this process one after another with ``--set seed=N`` and the point's
settings added to the recipe's. The base model is evaluated once ("before"); each run is evaluated
against it with `liandan.evaluation` and its figures kept in ``RUN/experiment-eval.json``, so a
run already trained and evaluated is reused when the experiment is run again (an interrupted one
continues, from its last checkpoint for a run cut short). Per grid point and metric: n, mean,
sample standard deviation, min and max, of the value and of its change against before.
``OUT/experiment.json`` holds every figure, ``OUT/experiment.html`` one chart per metric.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import statistics
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape as escape_markup
from rich.table import Table

from .checkpoints import INCOMPLETE, latest_checkpoint
from .config import STAGES, load_config, to_dict
from .errors import LiandanError
from .evaluation import EvalConfig, Evaluation
from .files import write_atomic
from .plots import format_value, seeds_chart, three_digits
from .train import train_dpo, train_grpo, train_pretrain, train_sft

TRAINERS = {"sft": train_sft, "dpo": train_dpo, "pretrain": train_pretrain, "grpo": train_grpo}
EVAL_FILE = "experiment-eval.json"
"""Written in each run directory once the run is evaluated: its figures, and the settings they
were measured with (a run is re-evaluated when those change)."""
NOT_IN_GRID = ("seed", "output_dir", "model")  # seeds are --seeds; each run's directory is the experiment's; one base model
TRAIN_METRICS = [("train.loss", "Training loss (last step)", "lower", "number"),
                 ("train.eval_loss", "Held-out loss (last evaluation)", "lower", "number")]  # fmt: skip


@dataclass
class ExperimentConfig:
    stage: str = "sft"
    """The training command each run is: sft, dpo or pretrain."""
    recipe: str | None = None
    """The stage's YAML recipe (as --config)."""
    values: dict = field(default_factory=dict)
    """Settings for every run given as the command's flags (model, data); None = not given."""
    overrides: list[str] = field(default_factory=list)
    """Settings for every run, key=value as --set (the command's flags come in this way too)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """One run per seed at each grid point."""
    grid: list[str] = field(default_factory=list)
    """key=value1,value2,...: each combination of the keys' values is a grid point."""
    out: str = "experiment"
    """Output directory: a directory per grid point with one run per seed, experiment.json and .html."""

    def __post_init__(self) -> None:
        if self.stage not in TRAINERS:
            raise LiandanError(f"experiment: unknown stage {self.stage!r}; expected one of {', '.join(TRAINERS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise LiandanError(f"--seeds: expected distinct seeds (got {self.seeds})")


@dataclass
class Run:
    point: str
    seed: int
    config: Any
    """The run's training config (the stage's XConfig)."""

    @property
    def dir(self) -> Path:
        return Path(self.config.output_dir)


def parse_seeds(text: str) -> list[int]:
    """``3`` means seeds 0, 1, 2; ``1,5,9`` means those seeds."""
    try:
        if "," not in text:
            return list(range(int(text)))
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise LiandanError(f"--seeds {text}: expected a count (3) or a list of seeds (1,5,9)") from None


def grid_keys(stage: str) -> list[str]:
    """The settings a grid may vary: the stage's own, nested ones dotted (lora.rank)."""
    keys = []
    for f in dataclasses.fields(STAGES[stage]):
        if f.name in NOT_IN_GRID:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(default)] if dataclasses.is_dataclass(default) else [f.name]
    return keys


def parse_grid(stage: str, specs: list[str]) -> dict[str, list[str]]:
    """``["lr=1e-4,2e-4", "lora.rank=8,16"]`` -> {"lr": ["1e-4", "2e-4"], "lora.rank": ["8", "16"]}."""
    valid, grid = grid_keys(stage), {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key, values = key.strip(), [v.strip() for v in raw.split(",") if v.strip()]
        if not sep or not key or not values:
            raise LiandanError(f"--grid {spec!r}: expected key=value1,value2, for example --grid lr=1e-4,2e-4")
        if key not in valid:
            why = {"seed": " (give --seeds)", "output_dir": " (each run has its own, under --out)",
                   "model": " (an experiment compares settings on one base model)"}.get(key, "")  # fmt: skip
            raise LiandanError(f"--grid {key}: not a setting {stage} can vary{why}; valid keys: {', '.join(valid)}")
        if key in grid:
            raise LiandanError(f"--grid {key} is given twice; list all its values once: --grid {key}=a,b")
        grid[key] = values
    return grid


def plan_runs(config: ExperimentConfig) -> list[Run]:
    """Every (grid point x seed), its training config built as the stage's command builds it: the
    recipe, then --set, then the point's settings and ``seed=N`` (so a bad value fails here,
    before any training)."""
    grid, out = parse_grid(config.stage, config.grid), Path(config.out)
    for item in config.overrides:
        if item.partition("=")[0].strip() in ("output_dir", "seed"):
            raise LiandanError(f"--set {item}: an experiment sets it for each run (give --out and --seeds)")
    runs = []
    for combo in itertools.product(*grid.values()):
        settings = [f"{k}={v}" for k, v in zip(grid, combo)]
        point = ",".join(settings) or "default"
        for seed in config.seeds:
            train_config = load_config(STAGES[config.stage], config.recipe, [*config.overrides, *settings, f"seed={seed}"],
                                       **config.values)
            train_config.output_dir = str(out / point.replace("/", "_") / f"seed-{seed}")
            runs.append(Run(point, seed, train_config))
    return runs


def run_experiment(config: ExperimentConfig, eval_config: EvalConfig | None = None, console: Any = None) -> dict:
    """Train and evaluate every run not already done, then aggregate; see the module docstring."""
    console = console or Console()
    runs = plan_runs(config)
    base = runs[0].config.model
    evaluation = None
    if eval_config is not None:
        eval_config = dataclasses.replace(eval_config, models=[base])
        evaluation = Evaluation(eval_config)  # reads and checks every set before any training
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    before = Baseline(evaluation, base, out, console)
    per_run = []
    for i, run in enumerate(runs, 1):
        label = f"run {i}/{len(runs)}: {run.point}, seed {run.seed} ({run.dir})"
        try:
            trained = train_once(run, config.stage, label, console)
            values = {**train_figures(run.dir), **(before.evaluate(run, label) if evaluation else {})}
        except Exception as exc:  # one line naming the run, whatever failed inside it
            raise LiandanError(f"run '{run.dir}' failed: {exc if isinstance(exc, LiandanError) else repr(exc)}") from exc
        per_run.append({"point": run.point, "seed": run.seed, "dir": str(run.dir), "trained_now": trained, "values": values})
    result = aggregate(config, base, before.values, before.metrics, per_run)
    write_atomic(out / "experiment.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    write_atomic(out / "experiment.html", render_html(result))
    return result


def train_once(run: Run, stage: str, label: str, console: Any) -> bool:
    """Train the run unless its directory already holds it finished (with these settings);
    continue one cut short from its last checkpoint. Returns whether it trained."""
    saved = run.dir / "config.yaml"
    if saved.is_file():
        there, here = yaml.safe_load(saved.read_text(encoding="utf-8")), yaml.safe_load(yaml.safe_dump(to_dict(run.config)))
        changed = sorted(k for k in set(there) | set(here) if there.get(k) != here.get(k))
        if changed:
            k = changed[0]
            raise LiandanError(f"'{run.dir}' holds a run with other settings ({k}: {there.get(k)!r} there, {here.get(k)!r} "
                               "now); remove it or choose another --out")  # fmt: skip
        if not (run.dir / INCOMPLETE).is_file():
            console.print(f"{label}: already trained, reused", highlight=False)
            return False
    resume = run.dir.is_dir() and latest_checkpoint(run.dir, quiet=True) is not None
    if run.dir.is_dir() and not resume and (run.dir / INCOMPLETE).is_file():
        shutil.rmtree(run.dir)  # this experiment's own run that stopped before its first checkpoint: nothing to keep
    console.rule(f"{label}: {'continuing' if resume else 'training'}")
    TRAINERS[stage](run.config, resume=resume)
    (run.dir / EVAL_FILE).unlink(missing_ok=True)
    return True


def train_figures(run_dir: Path) -> dict[str, float]:
    """The last training loss and held-out loss the run logged (metrics.jsonl)."""
    figures = {}
    path = run_dir / "metrics.jsonl"
    for record in map(json.loads, path.read_text().splitlines() if path.is_file() else []):
        for key, name in (("loss", "train.loss"), ("eval_loss", "train.eval_loss")):
            if isinstance(record.get(key), (int, float)):
                figures[name] = record[key]
    return figures


class Baseline:
    """The before model, evaluated at most once and only when a run needs it: it is the yardstick
    of the runs evaluated after it (its drift answers, the probes it passed)."""

    def __init__(self, evaluation: Evaluation | None, base: str, out: Path, console: Any):
        self.evaluation, self.base, self.console = evaluation, base, console
        self.path = out / "before.json"
        self.settings = json.loads(json.dumps(dataclasses.asdict(evaluation.config))) if evaluation else None
        cached = json.loads(self.path.read_text()) if self.path.is_file() else {}
        fresh = evaluation is not None and cached.get("settings") == self.settings
        self.values: dict = cached["values"] if fresh else {}
        self.metrics: list = cached["metrics"] if fresh else []
        self.done = False  # evaluated in this process

    def evaluate(self, run: Run, label: str) -> dict:
        path = run.dir / EVAL_FILE
        cached = json.loads(path.read_text()) if path.is_file() else {}
        if cached.get("settings") == self.settings and self.metrics:
            return cached["values"]
        if not self.done:
            self.console.rule(f"evaluating the base model {self.base} (before)")
            self.evaluation.run(self.base, name="before")
            self.done = True
        self.console.rule(f"{label}: evaluating")
        self.evaluation.run(str(run.dir), name=str(run.dir))
        result = self.evaluation.result()
        self.metrics = [{k: m[k] for k in ("key", "label", "better", "format")} for m in result["metrics"]]
        self.values = {m["key"]: m["values"].get("before") for m in result["metrics"]}
        write_atomic(self.path, json.dumps({"settings": self.settings, "values": self.values, "metrics": self.metrics}, indent=2) + "\n")
        values = {m["key"]: m["values"].get(str(run.dir)) for m in result["metrics"]}
        write_atomic(path, json.dumps({"settings": self.settings, "values": values}, indent=2) + "\n")
        return values


def summarise(values: list[float]) -> dict:
    """n, mean, sample standard deviation (n - 1 in the denominator; none for a single run), min, max."""
    if not values:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    sd = statistics.stdev(values) if len(values) > 1 else None
    return {"n": len(values), "mean": statistics.fmean(values), "sd": sd, "min": min(values), "max": max(values)}


def aggregate(config: ExperimentConfig, base: str, before: dict, eval_metrics: list, per_run: list[dict]) -> dict:
    points = list(dict.fromkeys(r["point"] for r in per_run))
    described = [{"key": k, "label": label, "better": b, "format": f} for k, label, b, f in TRAIN_METRICS] + eval_metrics
    metrics = []
    for metric in described:
        key, rows = metric["key"], {}
        for point in points:
            found = [(r["seed"], r["values"][key]) for r in per_run if r["point"] == point and isinstance(r["values"].get(key), (int, float))]
            values = [v for _, v in found]
            rows[point] = {**summarise(values), "seeds": [s for s, _ in found], "values": values}
            if isinstance(before.get(key), (int, float)):
                rows[point]["delta"] = summarise([v - before[key] for v in values])
        if any(row["n"] for row in rows.values()):
            metrics.append({**metric, "before": before.get(key), "points": rows})
    return {
        "title": f"liandan experiment: {config.stage} on {base}, {len(config.seeds)} seeds x {len(points)} grid points",
        "stage": config.stage, "recipe": config.recipe, "overrides": config.overrides, "base_model": base,
        "seeds": config.seeds, "grid": parse_grid(config.stage, config.grid), "points": points,
        "runs": per_run, "metrics": metrics,
    }  # fmt: skip


def format_stats(stats: dict, fmt: str | None, signed: bool = False) -> str:
    """mean ± sd (n); percentages in percent (the sd in points)."""
    if not stats or not stats["n"]:
        return "—"
    scale, unit = (100, "%") if fmt == "percent" else (1, "")
    mean = f"{stats['mean'] * scale:+.1f}{unit}" if signed and fmt == "percent" else format_value(stats["mean"], fmt)
    if signed and fmt != "percent":
        mean = ("+" if stats["mean"] >= 0 else "") + three_digits(stats["mean"])
    sd = "" if stats["sd"] is None else f" ± {stats['sd'] * scale:.1f}" if fmt == "percent" else f" ± {three_digits(stats['sd'])}"
    return f"{mean}{sd} ({stats['n']})"


def print_experiment(result: dict, console: Any = None) -> None:
    """Metric x grid point: mean ± sd (n), and the change against before under it."""
    console = console or Console()
    table = Table(title=result["title"], title_justify="left")
    table.add_column("metric")
    table.add_column("before", justify="right")
    for point in result["points"]:
        table.add_column(escape_markup(point), justify="right")
    for metric in result["metrics"]:
        cells = []
        for point in result["points"]:
            row = metric["points"][point]
            cell = format_stats(row, metric["format"])
            if "delta" in row and row["delta"]["n"]:
                cell += f"\n[dim]change {format_stats(row['delta'], metric['format'], signed=True)}[/]"
            cells.append(cell)
        table.add_row(escape_markup(metric["label"]), format_value(metric["before"], metric["format"]), *cells)
    table.caption = ("mean ± standard deviation over the seeds (runs); percentages and their spread in points. "
                     "A difference between grid points smaller than their spread is not an effect.")  # fmt: skip
    table.caption_justify = "left"
    console.print(table)


PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>
body{{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#111827;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #e5e7eb;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}.change{{color:#6b7280;font-size:12px}}section{{margin:1.5em 0}}
</style></head><body><h1>{title}</h1><p>{intro}</p>{table}{charts}</body></html>
"""


def render_html(result: dict) -> str:
    """One self-contained page: the mean ± sd table and one chart per metric (no script, nothing fetched)."""
    points = result["points"]
    head = "<tr><th>metric</th><th>before</th>" + "".join(f"<th>{escape(p)}</th>" for p in points) + "</tr>"
    rows, charts = [], []
    for metric in result["metrics"]:
        fmt, cells = metric["format"], []
        for point in points:
            row = metric["points"][point]
            change = f'<br><span class="change">change {escape(format_stats(row["delta"], fmt, signed=True))}</span>' if row.get("delta", {}).get("n") else ""
            cells.append(f"<td>{escape(format_stats(row, fmt))}{change}</td>")
        rows.append(f"<tr><td>{escape(metric['label'])}</td><td>{escape(format_value(metric['before'], fmt))}</td>{''.join(cells)}</tr>")
        svg = seeds_chart(metric["label"], {p: metric["points"][p]["values"] for p in points}, fmt, metric["before"])
        charts.append(f'<section class="metric" data-key="{escape(metric["key"])}"><h3>{escape(metric["label"])}</h3>{svg}</section>')
    intro = (f"{len(result['runs'])} runs: {len(points)} grid points x seeds {', '.join(map(str, result['seeds']))}; base model "
             f"{escape(result['base_model'])}. Each cell: mean ± standard deviation over the seeds (n runs). A difference between "
             "grid points smaller than their spread is not an effect.")  # fmt: skip
    table = f"<table>{head}{''.join(rows)}</table>"
    return PAGE.format(title=escape(result["title"]), intro=intro, table=table, charts="".join(charts))
