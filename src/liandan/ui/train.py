"""The tabs that prepare and run training (`liandan.cli_train`, and ``liandan inspect-data``):

- Data: a training file as the trainer will see it (`liandan.data_inspection.inspect_data`). Every
  invalid record is listed as FILE:LINE, field and problem (the words ``liandan sft`` would stop
  with); the valid ones are encoded with the model's chat template, trained tokens highlighted
  and each trained stop token marked.
- Train: SFT, DPO, pretrain and GRPO forms generated from the config dataclasses
  (`liandan.ui.forms`), the recipe they stand for as YAML and as the equivalent ``liandan``
  command, and the training jobs: each a separate ``liandan`` process writing a normal run
  directory (`liandan.jobs`), shown with its progress, ETA, loss curve, last metrics, samples and
  log, stopped gracefully (a final checkpoint) and resumed from it.

The jobs live on the server, in the UI's state directory: a reload, a second tab or a restarted
``liandan ui`` finds them again, because the page only ever asks `Jobs` what there is.

    validation_rows(["examples/pirate.jsonl"], None)   # [] when every record is valid
    job_rows(jobs.list(), "en")                        # the table of jobs, newest first
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from ..chat import chat_stop_ids
from ..config import STAGES
from ..data import CONVERSATION_FORMATS, read_file
from ..data_inspection import DataInspection, inspect_data
from ..jobs import Job, cli_command
from ..models import check_models, load_tokenizer, resolve_model
from ..prompts import shipped_example
from .context import K, Labels, Texts, UIContext, error_text, in_background, model_choices, status_text, uploaded_or_typed
from .forms import FormField, build_config, form_fields, recipe_from_values, recipe_yaml
from .i18n import LANGUAGES, t
from .i18n_settings import setting_help, setting_label

FIELD = re.compile(r"^field '([^']*)': (.*)$", re.DOTALL)


def shipped_data_files() -> list[str]:
    """The conversation files shipped with liandan, offered in the picker."""
    return [str(shipped_example(name)) for name in ("pirate.jsonl", "extract/train.jsonl", "persona/train.jsonl")]


def validation_rows(paths: list[str], format: str | None) -> list[list[str]]:
    """[FILE:LINE, field, problem] for every invalid record of ``paths``, read as ``liandan sft``
    reads them (a problem with a whole file raises `LiandanError` instead)."""
    rows = []
    for path in paths:
        skipped: list[tuple[str, str]] = []
        read_file(path, format, "sft", True, skipped)
        for where, reason in skipped:
            match = FIELD.match(reason)
            rows.append([where, match.group(1), match.group(2)] if match else [where, "", reason])
    return rows


def marked_pieces(report: DataInspection, stop_texts: list[str], trained: str, stop: str) -> list[tuple[str, str | None]]:
    """The shown examples as (text, category) runs for a HighlightedText: trained text, each stop
    token inside it on its own, context without a category; a header line per example."""
    pieces: list[tuple[str, str | None]] = []
    split = re.compile("(" + "|".join(re.escape(s) for s in stop_texts) + ")") if stop_texts else None
    for example in report.shown:
        pieces.append((f"── {example.source} ──\n", None))
        for text, is_trained in example.pieces:
            if not is_trained:
                pieces.append((text, None))
                continue
            for part in split.split(text) if split else [text]:
                if part:
                    pieces.append((part, stop if part in stop_texts else trained))
        pieces.append(("\n\n", None))
    return pieces


def data_summary(report: DataInspection, lang: str) -> str:
    """`DataInspection.summary` in the page's language (the invalid records have their own table)."""
    s = report.stats
    return t(lang, "data.summary", records=report.records, format=report.format, tokens=s["tokens"], trained=s["trained_tokens"],
             truncated=s["truncated"], empty=len(s["no_trained_tokens"]))  # fmt: skip


def data_tab(ctx: UIContext, labels: Labels, lang: gr.Radio) -> None:
    with labels(gr.Tab, label=K("tab.data")):
        labels(gr.Markdown, value=K("data.intro"))
        with gr.Row():
            path = labels(gr.Dropdown, label=K("data.file"), info=K("data.file_info"), choices=shipped_data_files(),
                          value=None, allow_custom_value=True, scale=2)  # fmt: skip
            upload = labels(gr.File, label=K("data.upload"), file_types=[".jsonl", ".json", ".csv", ".parquet"], height=120)
        with gr.Row():
            model = labels(gr.Dropdown, label=K("common.model"), info=K("data.model_info"), choices=model_choices(ctx),
                           value=ctx.models[0], allow_custom_value=True)  # fmt: skip
            format = labels(gr.Dropdown, label=K("data.format"), choices=["auto", *CONVERSATION_FORMATS], value="auto")
            max_length = labels(gr.Number, label=K("data.max_length"), value=1024, precision=0, minimum=8)
            show = labels(gr.Number, label=K("data.show"), value=3, precision=0, minimum=0, maximum=50)
        run = labels(gr.Button, value=K("data.run"), variant="primary")
        status = gr.Markdown(elem_id="data-status")
        errors = labels(gr.Dataframe, label=K("data.errors"), headers=[t(labels.lang, k) for k in ("data.where", "data.field", "data.problem")],
                        visible=False, wrap=True, elem_id="data-errors")  # fmt: skip
        summary = gr.Markdown(elem_id="data-summary")
        encoded = labels(gr.HighlightedText, label=K("data.encoded"), combine_adjacent=False, show_legend=True, elem_id="data-encoded")
    model.focus(lambda: gr.update(choices=model_choices(ctx)), None, model)

    def run_inspection(lang_value, path_value, upload_value, model_value, format_value, max_length_value,
                       show_value) -> Iterator[tuple]:  # fmt: skip
        nothing = (gr.update(), gr.update(), gr.update())
        try:
            chosen = uploaded_or_typed(upload_value, path_value)
            if chosen is None:
                yield (t(lang_value, "data.no_file"), *nothing)
                return
            fmt = None if format_value in (None, "", "auto") else format_value
            check_models([model_value])
            rows = validation_rows([chosen], fmt)
            headers = [t(lang_value, k) for k in ("data.where", "data.field", "data.problem")]
            table = gr.update(value={"headers": headers, "data": rows}, visible=bool(rows))
            invalid = t(lang_value, "data.invalid", n=len(rows)) if rows else t(lang_value, "data.all_valid")

            def work(report):
                report(t(lang_value, "data.encoding"))
                inspection = inspect_data([chosen], model=model_value, format=fmt, max_length=int(max_length_value or 1024),
                                          show=int(show_value or 0), skip_invalid=True)  # fmt: skip
                tokenizer = load_tokenizer(resolve_model(model_value))
                stops = tokenizer.convert_ids_to_tokens(chat_stop_ids(tokenizer))
                return inspection, stops

            try:
                for kind, payload in in_background(None, work):
                    if kind == "progress":
                        yield status_text(lang_value, payload), table, gr.update(), gr.update()
                    else:
                        inspection, stops = payload
            except Exception as exc:  # e.g. no valid record at all: the table still says why
                yield error_text(lang_value, exc), table, invalid, gr.update(value=[])
                return
            trained, stop = t(lang_value, "data.trained"), t(lang_value, "data.stop")
            verdict = t(lang_value, "data.stops_kept") if inspection.stops_kept else t(lang_value, "data.stops_cut", n=inspection.stats["stop_cut_off"])
            text = f"{invalid}\n\n{data_summary(inspection, lang_value)}\n\n**{verdict}**"
            pieces = marked_pieces(inspection, stops, trained, stop)
            yield (t(lang_value, "data.done", name=Path(chosen).name), table, text,
                   gr.update(value=pieces, color_map={trained: "green", stop: "red"}))  # fmt: skip
        except Exception as exc:
            yield (error_text(lang_value, exc), *nothing)

    run.click(run_inspection, [lang, path, upload, model, format, max_length, show], [status, errors, summary, encoded])


GROUPS = ("first", "stage", "lora", "advanced")
CURVE_COLUMNS = ("step", "value", "curve")


def field_widget(stage: str, field: FormField, ctx: UIContext, labels: Labels) -> Any:
    """The widget of one setting: its name as the label (in Chinese with a short gloss after it),
    its docstring as the help text (in Chinese its translation, `liandan.ui.i18n_settings`)."""
    label = Texts({lang: setting_label(lang, stage, field.name) for lang in LANGUAGES})
    info = Texts({lang: setting_help(lang, stage, field.name, field.help) for lang in LANGUAGES})
    common = {"label": label, "info": info, "value": field.widget_default, "elem_id": f"{stage}-{field.name.replace('.', '-')}"}
    if field.name == "model":  # the model the page was opened with, not the config's default
        return labels(gr.Dropdown, choices=model_choices(ctx), allow_custom_value=True, **common | {"value": ctx.models[0]})
    if field.choices:
        choices = ([("—", "")] if field.optional else []) + list(field.choices)
        return labels(gr.Dropdown, choices=choices, **common | {"value": common["value"] or ("" if field.optional else None)})
    if field.kind == "bool":
        return labels(gr.Checkbox, **common)
    if field.kind in ("int", "float"):
        return labels(gr.Number, precision=0 if field.kind == "int" else None, **common)
    lines = 2 if field.kind == "list[str]" else 1
    return labels(gr.Textbox, lines=lines, max_lines=8, **common)


def stage_form(stage: str, ctx: UIContext, labels: Labels) -> tuple[list[FormField], list[Any]]:
    """The form of one stage, its settings grouped as `forms.form_fields` orders them."""
    fields = form_fields(stage)
    widgets = []
    for group in GROUPS:
        members = [f for f in fields if f.group == group]
        if not members:
            continue
        with labels(gr.Accordion, label=K(f"train.group_{group}"), open=group in ("first", "stage")):
            for start in range(0, len(members), 2):
                with gr.Row():
                    widgets += [field_widget(stage, f, ctx, labels) for f in members[start : start + 2]]
    return [f for group in GROUPS for f in fields if f.group == group], widgets


def recipe_of(stage: str, fields: list[FormField], values: Iterable[Any]) -> dict:
    """The recipe of a filled-in form, checked by building the stage's config."""
    recipe = recipe_from_values(stage, {f.name: v for f, v in zip(fields, values)})
    build_config(stage, recipe)
    return recipe


def train_tab(ctx: UIContext, labels: Labels, lang: gr.Radio) -> dict:
    """The tab; returns the jobs panel (its refresh runs on every page load too)."""
    forms: dict[str, tuple[list[FormField], list[Any]]] = {}
    with labels(gr.Tab, label=K("tab.train")):
        labels(gr.Markdown, value=K("train.intro"))
        stage = labels(gr.Radio, label=K("train.stage"), info=K("train.stage_info"), choices=list(STAGES), value="sft")
        columns = {}
        for name in STAGES:
            with gr.Column(visible=name == "sft") as column:
                forms[name] = stage_form(name, ctx, labels)
            columns[name] = column
        fields = forms["sft"][0]
        first = recipe_of("sft", fields, [ctx.models[0] if f.name == "model" else f.widget_default for f in fields])
        with gr.Row():
            recipe_box = labels(gr.Code, label=K("train.recipe"), language="yaml", lines=8, interactive=False,
                                value=recipe_yaml(first), elem_id="train-recipe")  # fmt: skip
            command_box = labels(gr.Code, label=K("train.command"), language="shell", lines=8, interactive=False,
                                 value=cli_command("sft", first, first["output_dir"]), elem_id="train-command")  # fmt: skip
        start = labels(gr.Button, value=K("train.start"), variant="primary")
        message = gr.Markdown(elem_id="train-message")
        jobs_panel = job_panel(ctx, labels, lang)
    all_widgets = [w for name in STAGES for w in forms[name][1]]

    def values_by_stage(stage_value: str, raw: list) -> list:
        offset = 0
        for name in STAGES:
            count = len(forms[name][1])
            if name == stage_value:
                return raw[offset : offset + count]
            offset += count
        raise KeyError(stage_value)

    def preview(lang_value: str, stage_value: str, *raw):
        try:
            fields, _ = forms[stage_value]
            recipe = recipe_of(stage_value, fields, values_by_stage(stage_value, list(raw)))
            return recipe_yaml(recipe), cli_command(stage_value, recipe, recipe["output_dir"]), ""
        except Exception as exc:
            return gr.update(), gr.update(), error_text(lang_value, exc)

    def start_job(lang_value: str, stage_value: str, *raw):
        try:
            fields, _ = forms[stage_value]
            recipe = recipe_of(stage_value, fields, values_by_stage(stage_value, list(raw)))
            job = ctx.jobs.start(stage_value, recipe, recipe["output_dir"])
            return t(lang_value, "train.started", id=job.id, run_dir=job.run_dir), gr.update(value=job.id, choices=job_choices(ctx.jobs.list(), lang_value))
        except Exception as exc:
            return error_text(lang_value, exc), gr.update()

    stage.change(lambda s: [gr.update(visible=s == n) for n in STAGES], stage, list(columns.values()))
    gr.on([stage.change, *[w.input for w in all_widgets]], preview, [lang, stage, *all_widgets], [recipe_box, command_box, message])
    start.click(start_job, [lang, stage, *all_widgets], [message, jobs_panel["pick"]])
    return jobs_panel


# ---------------------------------------------------------------------------------------------
# The jobs


def job_choices(jobs: list[Job], lang: str) -> list[tuple[str, str]]:
    return [(f"{job.id} · {job.stage} · {t(lang, f'status.{job.status}')}", job.id) for job in sorted(jobs, key=lambda j: -j.started)]


def job_rows(jobs: list[Job], lang: str) -> dict:
    headers = [t(lang, k) for k in ("jobs.id", "jobs.stage", "jobs.status", "jobs.run_dir", "jobs.started")]
    rows = [[job.id, job.stage, t(lang, f"status.{job.status}"), str(job.run_dir), time.strftime("%Y-%m-%d %H:%M", time.localtime(job.started))]
            for job in sorted(jobs, key=lambda j: -j.started)]  # fmt: skip
    return {"headers": headers, "data": rows}


def duration(seconds: float | None, lang: str) -> str:
    if seconds is None:
        return "—"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return t(lang, "time.hours", hours=hours, minutes=minutes)
    return t(lang, "time.minutes", minutes=minutes, seconds=seconds) if minutes else t(lang, "time.seconds", seconds=seconds)


def progress_html(progress: dict, lang: str) -> str:
    step, steps = progress.get("step") or 0, progress.get("steps") or 0
    status = progress.get("status") or ""
    bar = f'<progress value="{step}" max="{max(steps, 1)}" style="width:100%;height:1.2rem"></progress>'
    key = "jobs.progress" if status in ("running", "stopping", "") else "jobs.progress_done"  # no time left once it ended
    line = t(lang, key, step=step, steps=steps or "?", elapsed=duration(progress.get("seconds"), lang),
             eta=duration(progress.get("eta_seconds"), lang), status=t(lang, f"status.{status}") if status else "—")  # fmt: skip
    return f'<div id="train-progress">{bar}<div>{line}</div></div>'


def curve_frame(progress: dict) -> pd.DataFrame | None:
    """The training loss and, where the run evaluates, the held-out loss, as one long table;
    None before the first point: Gradio's plot, once given an empty table, never draws the line
    of the points that come later (its axes only)."""
    points = [(int(step), float(value), name) for name in ("loss", "eval_loss") for step, value in progress.get(name) or []]
    if not points:
        return None
    frame = pd.DataFrame(points, columns=list(CURVE_COLUMNS))
    return frame.astype({"step": "int64", "value": "float64", "curve": "str"})  # the axes take their kind from the dtypes


def samples_rows(run_dir: Path, progress: dict) -> list[list]:
    """What the run generated, as table rows: samples.jsonl (written at the end of a run with
    sample_prompts), else GRPO's latest round of completions with their rewards."""
    path = Path(run_dir) / "samples.jsonl"
    if path.is_file():
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [[str(r.get("prompt", "")), str(r.get("text", "")), r.get("stopped"), None] for r in records]
    return [[str(c.get("prompt", "")), str(c.get("completion", "")), c.get("stopped"), c.get("reward")]
            for c in progress.get("completions") or []]  # fmt: skip


def job_panel(ctx: UIContext, labels: Labels, lang: gr.Radio) -> dict:
    """The jobs: a table, the chosen job's progress, curve, metrics, samples and log, stop and resume."""
    labels(gr.Markdown, value=K("jobs.title"))
    table = labels(gr.Dataframe, label=K("jobs.table"), interactive=False, wrap=True, elem_id="jobs-table", max_height=260)
    with gr.Row():
        pick = labels(gr.Dropdown, label=K("jobs.pick"), choices=[], value=None, scale=3, elem_id="job-pick")
        stop = labels(gr.Button, value=K("jobs.stop"), variant="stop", scale=1)
        resume = labels(gr.Button, value=K("jobs.resume"), scale=1)
    action = gr.Markdown(elem_id="jobs-action")
    progress = gr.HTML(elem_id="job-progress")
    with gr.Row():
        curve = labels(gr.LinePlot, label=K("jobs.loss"), x="step", y="value", color="curve", height=280, scale=2, x_title=K("jobs.step"), y_title=K("jobs.loss_axis"), color_title=" ",
                       elem_id="loss-plot", value=None)  # fmt: skip
        metrics = labels(gr.JSON, label=K("jobs.metrics"), scale=1)
    samples = labels(gr.Dataframe, label=K("jobs.samples"), interactive=False, wrap=True, visible=False)
    log = labels(gr.Textbox, label=K("jobs.log"), lines=8, max_lines=8, interactive=False, autoscroll=True, elem_id="job-log")
    timer = gr.Timer(2.0)

    def refresh(lang_value: str, chosen: str | None):
        jobs = ctx.jobs.list([ctx.runs_root] if ctx.runs_root.is_dir() else [])
        ids = [job.id for job in jobs]
        if chosen not in ids:
            chosen = max(jobs, key=lambda j: j.started).id if jobs else None
        table_value = job_rows(jobs, lang_value)
        pick_update = gr.update(choices=job_choices(jobs, lang_value), value=chosen)
        if chosen is None:
            return table_value, pick_update, "", gr.update(), None, gr.update(visible=False), ""
        job = ctx.jobs.get(chosen)
        state = ctx.jobs.progress(chosen)
        rows = samples_rows(job.run_dir, state)
        headers = [t(lang_value, k) for k in ("jobs.prompt", "jobs.text", "jobs.stopped", "jobs.reward")]
        return (table_value, pick_update, progress_html(state, lang_value), curve_frame(state), state.get("last"),
                gr.update(value={"headers": headers, "data": rows}, visible=bool(rows)), state.get("log") or "")

    def act(what: str):
        def run(lang_value: str, chosen: str | None):
            if not chosen:
                return t(lang_value, "jobs.none_chosen")
            try:
                job = getattr(ctx.jobs, what)(chosen)
                return t(lang_value, f"jobs.{what}_done", id=job.id, status=t(lang_value, f"status.{job.status}"))
            except Exception as exc:
                return error_text(lang_value, exc)

        return run

    def select_row(evt: gr.SelectData, lang_value: str):
        row = evt.row_value if evt.row_value else None
        return gr.update(value=row[0]) if row else gr.update()

    outputs = [table, pick, progress, curve, metrics, samples, log]
    timer.tick(refresh, [lang, pick], outputs, show_progress="hidden")
    pick.change(refresh, [lang, pick], outputs, show_progress="hidden")
    table.select(select_row, [lang], pick)
    stop.click(act("stop"), [lang, pick], action)
    resume.click(act("resume"), [lang, pick], action)
    return {"pick": pick, "refresh": (refresh, [lang, pick], outputs)}
