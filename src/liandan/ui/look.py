"""The tabs that look at models and measure them, as ``liandan compare`` and ``liandan eval`` do
(`liandan.cli_look`):

- Look: the same prompts through several models, chat vs raw, side by side
  (`liandan.comparison.compare`), shown as the page ``compare --out cmp.html`` writes, with each
  output's token count and whether it stopped by itself or hit the length limit.
- Evaluate: before vs after on a task set, the retention probes and drift
  (`liandan.evaluation.evaluate`), shown as the report ``liandan eval --out report.html`` writes
  (`liandan.eval_report.render_html`), and saved as that file too. The first model is "before";
  every other one is shown with its change against it.

    look_tab(ctx, labels, lang); eval_tab(ctx, labels, lang)    # inside a gr.Blocks
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import gradio as gr

from ..checks import parse_check_options
from ..comparison import compare, write_comparison
from ..comparison import to_html as comparison_html
from ..eval_report import render_html, write_eval_report
from ..evaluation import EvalConfig, Evaluation, evaluate
from ..generation import MODES, SamplingConfig
from ..models import check_models
from ..prompts import collect_prompts, shipped_example
from .context import (
    K,
    Labels,
    UIContext,
    counter,
    error_text,
    framed,
    in_background,
    model_choices,
    status_text,
    uploaded_or_typed,
)
from .i18n import t


def look_tab(ctx: UIContext, labels: Labels, lang: gr.Radio) -> None:
    with labels(gr.Tab, label=K("tab.look")):
        labels(gr.Markdown, value=K("look.intro"))
        with gr.Row():
            models = labels(gr.Dropdown, label=K("common.models"), info=K("look.models_info"), choices=model_choices(ctx),
                            value=[ctx.models[0]], multiselect=True, allow_custom_value=True, scale=2)  # fmt: skip
            modes = labels(gr.CheckboxGroup, label=K("look.modes"), info=K("look.modes_info"), choices=list(MODES), value=list(MODES))
        prompts = labels(gr.Textbox, label=K("look.prompts"), info=K("look.prompts_info"), lines=3,
                         value="What is the capital of France?\nWrite a haiku about the sea.")  # fmt: skip
        with gr.Row():
            prompts_file = labels(gr.File, label=K("look.prompts_file"), file_types=[".txt", ".jsonl"], height=120)
            system = labels(gr.Textbox, label=K("common.system"), info=K("common.system_info"), lines=2)
        with gr.Row():
            max_new = labels(gr.Number, label=K("common.max_new_tokens"), value=128, precision=0, minimum=1)
            temperature = labels(gr.Number, label=K("common.temperature"), info=K("common.temperature_info"), value=0.0, minimum=0)
            samples = labels(gr.Number, label=K("look.samples"), value=1, precision=0, minimum=1)
            seed = labels(gr.Number, label=K("common.seed"), value=0, precision=0)
        run = labels(gr.Button, value=K("look.run"), variant="primary")
        status = gr.Markdown(elem_id="look-status")
        page = gr.HTML(elem_id="look-result")
        saved = labels(gr.File, label=K("look.download"), visible=False)
    models.focus(lambda: gr.update(choices=model_choices(ctx)), None, models)

    def run_compare(lang_value, models_value, modes_value, prompts_value, file_value, system_value, max_new_value,
                    temperature_value, samples_value, seed_value) -> Iterator[tuple]:  # fmt: skip
        try:
            config = SamplingConfig(max_new_tokens=int(max_new_value or 1), temperature=float(temperature_value or 0),
                                    num_samples=int(samples_value or 1), seed=int(seed_value or 0))  # fmt: skip
            texts = [line for line in (prompts_value or "").splitlines() if line.strip()]
            collected = collect_prompts(texts, uploaded_or_typed(file_value, None))
            chosen = list(models_value or []) or [ctx.models[0]]
            check_models(chosen)
            total = len(chosen) * len(modes_value or []) * len(collected)

            def work(report):
                return compare(chosen, collected, modes=modes_value or ["chat"], system=system_value or None, config=config,
                               progress=counter(report, total))  # fmt: skip

            for kind, payload in in_background(ctx, work):
                if kind == "progress":
                    yield status_text(lang_value, payload), gr.update(), gr.update()
                else:
                    path = write_comparison(payload, ctx.state_dir / "compare.html")
                    stopped = sum(g.stopped for g in payload.generations)
                    done = t(lang_value, "look.done", stopped=stopped, total=len(payload.generations))
                    yield done, framed(comparison_html(payload)), gr.update(value=str(path), visible=True)
        except Exception as exc:
            yield error_text(lang_value, exc), gr.update(), gr.update()

    run.click(run_compare, [lang, models, modes, prompts, prompts_file, system, max_new, temperature, samples, seed],
              [status, page, saved])  # fmt: skip


def eval_tab(ctx: UIContext, labels: Labels, lang: gr.Radio) -> None:
    with labels(gr.Tab, label=K("tab.eval")):
        labels(gr.Markdown, value=K("eval.intro"))
        models = labels(gr.Dropdown, label=K("common.models"), info=K("eval.models_info"), choices=model_choices(ctx),
                        value=[ctx.models[0]], multiselect=True, allow_custom_value=True)  # fmt: skip
        with gr.Row():
            task = labels(gr.Dropdown, label=K("eval.task"), info=K("eval.task_info"), allow_custom_value=True,
                          choices=[str(shipped_example(f"{name}/test.jsonl")) for name in ("extract", "persona", "tools")], value=None)  # fmt: skip
            task_upload = labels(gr.File, label=K("eval.task_upload"), file_types=[".jsonl"], height=120)
        with gr.Row():
            schema = labels(gr.Textbox, label=K("eval.schema"), info=K("eval.schema_info"))
            checks = labels(gr.Textbox, label=K("eval.checks"), info=K("eval.checks_info"), lines=2)
            tools_template = labels(gr.Dropdown, label=K("eval.tools_template"), info=K("eval.tools_template_info"), choices=["", "chatml"],
                                    value="", allow_custom_value=True)  # fmt: skip
        with gr.Row():
            probes = labels(gr.Dropdown, label=K("eval.probes"), info=K("eval.probes_info"), choices=["default", "none"], value="default",
                            allow_custom_value=True)  # fmt: skip
            drift = labels(gr.Dropdown, label=K("eval.drift"), info=K("eval.drift_info"), choices=["default", "none"], value="default",
                           allow_custom_value=True)  # fmt: skip
            max_new = labels(gr.Number, label=K("common.max_new_tokens"), value=160, precision=0, minimum=1)
            system = labels(gr.Textbox, label=K("common.system"), info=K("common.system_info"))
        run = labels(gr.Button, value=K("eval.run"), variant="primary")
        status = gr.Markdown(elem_id="eval-status")
        report = gr.HTML(elem_id="eval-report")
        saved = labels(gr.File, label=K("eval.download"), visible=False)
    models.focus(lambda: gr.update(choices=model_choices(ctx)), None, models)

    def run_eval(lang_value, models_value, task_value, upload_value, schema_value, checks_value, tools_value, probes_value,
                 drift_value, max_new_value, system_value) -> Iterator[tuple]:  # fmt: skip
        try:
            chosen = list(models_value or []) or [ctx.models[0]]
            config = EvalConfig(models=chosen, task=uploaded_or_typed(upload_value, task_value), schema=(schema_value or "").strip() or None,
                                checks=parse_check_options([c for c in (checks_value or "").splitlines() if c.strip()]),
                                probes=probes_value or "none", drift=drift_value or "none", system=system_value or None,
                                max_new_tokens=int(max_new_value or 160), tools_template=(tools_value or "").strip() or None)  # fmt: skip
            evaluation = Evaluation(config)  # reads and checks every set before any model loads
            check_models(chosen)
            total = evaluation.units(len(chosen))

            def work(report):
                return evaluate(config, progress=counter(report, total), evaluation=evaluation)

            for kind, payload in in_background(ctx, work):
                if kind == "progress":
                    yield status_text(lang_value, payload), gr.update(), gr.update()
                else:
                    path = write_eval_report(payload, ctx.state_dir / "reports" / f"eval-{time.strftime('%Y%m%d-%H%M%S')}.html")
                    yield t(lang_value, "eval.done", path=path), framed(render_html(payload), 900), gr.update(value=str(path), visible=True)
        except Exception as exc:
            yield error_text(lang_value, exc), gr.update(), gr.update()

    run.click(run_eval, [lang, models, task, task_upload, schema, checks, tools_template, probes, drift, max_new, system], [status, report, saved])
