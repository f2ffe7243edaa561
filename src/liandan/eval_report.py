"""Render the results of ``liandan eval`` (models before vs after fine-tuning) as one HTML page,
as Markdown, or as JSON.

    from liandan.eval_report import write_eval_report
    result = {"models": ["default", "runs/extract"],
              "metrics": [{"key": "task.schema", "label": "Task: schema-valid", "better": "higher",
                           "format": "percent", "values": {"default": 0.0, "runs/extract": 0.95}}]}
    write_eval_report(result, "eval.html")        # or eval.md, eval.json

Tool calls read from an output (``calls``) and the reference turn's (``reference_calls``) are
shown as ``get_weather({"city": "Oslo"})``.

The page needs nothing from the network (inline CSS, SVG plots from `liandan.plots`, no script),
so it can be attached to a CI run or opened years later. The first model is "before"; every other
column shows its delta against it, green or red by whether the metric is better higher or lower.
Model outputs are untrusted text: everything that comes from `result` is escaped.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from rich.console import Console
from rich.markup import escape as escape_markup
from rich.table import Table

from .errors import LiandanError
from .eval_values import calls_text, format_change, pass_rate_text, pass_rates, set_check_names, status_line
from .files import write_atomic
from .plots import DASH, bar_chart, finite_number, format_value, loss_chart, model_colours, model_label

# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
*{box-sizing:border-box}
body{margin:0;padding:1.5rem;background:#f6f8fa;color:#1f2328;
 font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Noto Sans CJK SC",sans-serif}
main{max-width:1200px;margin:0 auto}
h1{font-size:1.6rem;margin:0 0 .4rem} h2{font-size:1.15rem;margin:0}
.card{background:#fff;border:1px solid #d8dee4;border-radius:10px;padding:1rem 1.25rem;margin:1rem 0}
.card>h2{margin-bottom:.75rem}
.muted,.key,.dir{color:#656d76} .key,.dir{font-size:.8rem} .hint{font-size:.85rem;color:#656d76;margin:.6rem 0 0}
.notes{margin:.2rem 0 .6rem;padding-left:1.2rem;color:#424a53}
.legend{display:flex;flex-wrap:wrap;gap:.3rem 1.2rem;margin:.4rem 0}
.swatch{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.35em;vertical-align:-.05em}
.scroll{overflow-x:auto}
table{border-collapse:collapse}
th,td{padding:.45rem .7rem;border-bottom:1px solid #e5e7eb;text-align:left;vertical-align:top}
thead th{font-size:.85rem;background:#f6f8fa;border-bottom:1px solid #d8dee4}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.metrics td:first-child{min-width:14rem} table.metrics .num{min-width:9rem}
.delta{font-size:.85em;margin-left:.2em} .delta.better{color:#1a7f37;font-weight:600}
.delta.worse{color:#cf222e;font-weight:600} .delta.same,.delta.noise{color:#8c959f}
table.settings{display:block;font-size:.85rem;margin-top:.3rem}
table.settings tbody{display:grid;grid-template-columns:repeat(auto-fill,minmax(15rem,1fr));column-gap:1.5rem}
table.settings tr{display:flex;gap:.6rem;border-bottom:1px solid #eef1f4}
table.settings th,table.settings td{border:0;padding:.15rem 0;overflow-wrap:anywhere}
table.settings th{font-weight:600;color:#424a53}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,440px),1fr));gap:1.25rem}
figure{margin:0;min-width:0} figcaption{font-weight:600;font-size:.9rem;margin-bottom:.2rem}
svg.plot{display:block;max-width:100%;height:auto;font-family:inherit}
details>summary{cursor:pointer;list-style-position:outside;margin-left:1rem}
details>summary h2{display:inline}
details[open]>summary{margin-bottom:.75rem}
table.rates{margin-bottom:1rem;font-size:.9rem}
table.examples{width:100%;table-layout:fixed;min-width:calc(var(--cols) * 15rem)}
table.examples td{border-bottom:1px solid #d8dee4}
.text{white-space:pre-wrap;overflow-wrap:anywhere;margin:0;max-height:24rem;overflow:auto;
 font:13px/1.45 ui-monospace,"SFMono-Regular",Menlo,Consolas,"Noto Sans Mono CJK SC",monospace;
 background:#f6f8fa;border:1px solid #eaeef2;border-radius:6px;padding:.4rem .55rem}
.ref{background:#f0f6ff;border-color:#d4e4fa} .calls{background:#fff8c5;border-color:#eedc82;margin-top:.3rem}
.small{font-size:.78rem;color:#656d76;margin:.35rem 0 .15rem}
.status{font-size:.8rem;color:#1a7f37;margin-top:.3rem} .status.limit{color:#cf222e}
.badges{display:flex;flex-wrap:wrap;gap:.25rem;margin-top:.3rem}
.badge{font-size:.75rem;padding:.05rem .45rem;border-radius:999px;white-space:nowrap}
.badge.pass{background:#dafbe1;color:#116329} .badge.fail{background:#ffebe9;color:#a40e26}
.badge.na{background:#eaeef2;color:#57606a} .badge.total{font-weight:700}
.cat{font-size:.72rem;background:#eaeef2;border-radius:4px;padding:0 .35rem;margin-left:.3rem}
@media (max-width:640px){body{padding:.5rem}.card{padding:.75rem;border-radius:8px}h1{font-size:1.3rem}
 table.metrics td:first-child{min-width:8rem} table.metrics .num{min-width:0} table.metrics .delta{display:block}
 th,td{padding:.4rem .45rem} table.examples{min-width:calc(var(--cols) * 11rem)}}
"""


def _swatch(colour: str) -> str:
    return f'<span class="swatch" style="background:{colour}"></span>'


def _model_head(result: dict, model: str, colours: dict[str, str], cls: str = "") -> str:
    label = model_label(result, model)
    key = f'<br><span class="key">{escape(model)}</span>' if label != model else ""
    return f"<th{cls}>{_swatch(colours[model])}{escape(label)}{key}</th>"


def _setting_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _header(result: dict, colours: dict[str, str]) -> str:
    parts = [f"<h1>{escape(result.get('title') or 'liandan eval')}</h1>"]
    if result.get("notes"):
        parts.append('<ul class="notes">' + "".join(f"<li>{escape(str(n))}</li>" for n in result["notes"]) + "</ul>")
    if result.get("models"):
        chips = [f"<span>{_swatch(colours[m])}{escape(model_label(result, m))} <span class='key'>{escape(m)}</span></span>"
                 for m in result["models"]]  # fmt: skip
        parts.append('<div class="legend">' + "".join(chips) + "</div>")
    if result.get("settings"):
        rows = [f"<tr><th>{escape(str(k))}</th><td>{escape(_setting_text(v))}</td></tr>"
                for k, v in result["settings"].items()]  # fmt: skip
        parts.append('<table class="settings"><tbody>' + "".join(rows) + "</tbody></table>")
    return '<header class="card">' + "".join(parts) + "</header>"


def _metric_row(metric: dict, models: list[str]) -> str:
    values, fmt, better = metric.get("values") or {}, metric.get("format"), metric.get("better")
    key = escape(str(metric.get("key") or ""))
    direction = {"higher": "↑ higher is better", "lower": "↓ lower is better"}.get(better, "")
    hint = " · ".join(h for h in (direction, key) if h)
    name = escape(str(metric.get("label") or metric.get("key") or "?"))
    cells = [f"<td>{name}<br><span class='dir'>{hint}</span></td>"]
    for i, model in enumerate(models):
        text = escape(format_value(values.get(model), fmt))
        delta = format_change(metric, model, models) if i else None
        if delta:
            text += f' <span class="delta {delta[1]}">({escape(delta[0])})</span>'
        cells.append(f'<td class="num">{text}</td>')
    return "<tr>" + "".join(cells) + "</tr>"


def _metrics_section(result: dict, colours: dict[str, str]) -> str:
    models = list(result.get("models") or [])
    if not result.get("metrics"):
        return ""
    head = "<th>Metric</th>" + "".join(_model_head(result, m, colours, ' class="num"') for m in models)
    rows = "".join(_metric_row(metric, models) for metric in result["metrics"])
    hint = ""
    if len(models) > 1:
        hint = (f'<p class="hint">Changes in brackets are against {escape(model_label(result, models[0]))}; '
                "for percentages they are in percentage points.")  # fmt: skip
        if any(metric.get("intervals") for metric in result["metrics"]):
            hint += (" [low, high] is the change's 95% interval over the same items; <i>noise</i> (grey) marks a change "
                     "the data cannot tell from chance (the interval includes no change). Whiskers on the bars span "
                     f"{escape(model_label(result, models[0]))}'s value plus that interval.")  # fmt: skip
        hint += "</p>"
    return (f'<section class="card"><h2>Metrics</h2><div class="scroll"><table class="metrics"><thead><tr>{head}'
            f"</tr></thead><tbody>{rows}</tbody></table></div>{hint}</section>")  # fmt: skip


def _plots_section(result: dict, colours: dict[str, str]) -> str:
    charts = []  # (caption, svg)
    percent = [m for m in result.get("metrics") or [] if m.get("format") == "percent"]
    headline = {str(m.get("label") or m.get("key")): m.get("values") or {} for m in percent}
    whiskers = {str(m.get("label") or m.get("key")): _whiskers(m, result.get("models") or []) for m in percent}
    charts.append(("Metrics (percent)", bar_chart("Metrics (percent)", headline, "percent", result, colours, whiskers)))
    for chart in result.get("bars") or []:
        title = str(chart.get("title") or "")
        charts.append((title, bar_chart(title, chart.get("groups") or {}, chart.get("format"), result, colours)))
    for run, points in (result.get("curves") or {}).items():
        caption = f"Training loss: {model_label(result, run)}"
        charts.append((caption, loss_chart(run, points or [], result, colours[run])))
    figures = "".join(f"<figure><figcaption>{escape(c)}</figcaption>{svg}</figure>" for c, svg in charts if svg)
    return f'<section class="card"><h2>Plots</h2><div class="plots">{figures}</div></section>' if figures else ""


def _whiskers(metric: dict, models: list[str]) -> dict[str, tuple[float, float]]:
    """Per model after the first: where its value could lie given the first's value and the
    difference's interval, (before + low, before + high). The whisker clears the first model's
    bar when the interval excludes 0."""
    before = finite_number((metric.get("values") or {}).get(models[0])) if models else None
    out = {}
    for model, interval in (metric.get("intervals") or {}).items():
        low, high = (finite_number((interval or {}).get(k)) for k in ("low", "high"))
        if before is not None and low is not None and high is not None:
            out[model] = (before + low, before + high)
    return out


def _badges(output: dict, check_names: list[str]) -> str:
    badges = []
    if isinstance(output.get("passed"), bool):
        ok = output["passed"]
        badges.append(f'<span class="badge total {"pass" if ok else "fail"}">{"passed" if ok else "failed"}</span>')
    checks = output.get("checks") or {}
    for name in (n for n in check_names if n in checks):
        kind, mark = {True: ("pass", "✓"), False: ("fail", "✗")}.get(checks[name], ("na", "n/a"))
        badges.append(f'<span class="badge {kind}">{mark} {escape(str(name))}</span>')
    return '<div class="badges">' + "".join(badges) + "</div>" if badges else ""


def _output_cell(output: dict | None, check_names: list[str]) -> str:
    if not output:
        return f'<td class="muted">{DASH}</td>'
    cell = f'<td><div class="text">{escape(str(output.get("text") or ""))}</div>'
    if "calls" in output:  # read back in the model's call format: what it called, or why it could not be read
        problem = f"\nunreadable call: {output['call_problem']}" if output.get("call_problem") else ""
        cell += f'<div class="small">calls</div><div class="text calls">{escape(calls_text(output["calls"]) + problem)}</div>'
    if status := status_line(output):
        limit = " limit" if output.get("stopped") is False else ""
        cell += f'<div class="status{limit}">{escape(status)}</div>'
    return cell + _badges(output, check_names) + "</td>"


def _example_row(example: dict, models: list[str], check_names: list[str]) -> str:
    category = f'<span class="cat">{escape(str(example["category"]))}</span>' if example.get("category") else ""
    first = (f'<div class="small">{escape(str(example.get("id") or ""))}{category}</div>'
             f'<div class="text">{escape(str(example.get("prompt") or ""))}</div>')  # fmt: skip
    reference = _reference_text(example)
    if reference is not None:
        first += f'<div class="small">reference</div><div class="text ref">{escape(reference)}</div>'
    outputs = example.get("outputs") or {}
    return f"<tr><td>{first}</td>" + "".join(_output_cell(outputs.get(m), check_names) for m in models) + "</tr>"


def _reference_text(example: dict) -> str | None:
    """The reference answer, with the reference turn's calls (or "no call") for a record with tools."""
    parts = [str(example["reference"])] if example.get("reference") is not None else []
    if "reference_calls" in example:
        parts.append(calls_text(example["reference_calls"]))
    return "\n".join(parts) if parts else None


def _set_section(set_: dict, index: int, result: dict, colours: dict[str, str]) -> str:
    """A set in a <details> (only the first open, so long sets stay out of the way): pass rates, then examples."""
    models, examples = list(result.get("models") or []), set_.get("examples") or []
    rates = [(name, row) for name, row in pass_rates(set_, models) if any(row[m][1] for m in models)]
    summary = f"{len(examples)} example{'s' * (len(examples) != 1)}"
    passed = dict(rates).get("passed", {})
    summary += "".join(f" · {escape(model_label(result, m))}: {p}/{n} passed" for m, (p, n) in passed.items() if n)
    rate_table = ""
    if rates:
        head = "<th>pass rate</th>" + "".join(_model_head(result, m, colours, ' class="num"') for m in models)
        rows = "".join(f"<tr><td>{escape(name)}</td>" + "".join(f'<td class="num">{pass_rate_text(*row[m])}</td>' for m in models)
                       + "</tr>" for name, row in rates)  # fmt: skip
        rate_table = (f'<div class="scroll"><table class="rates"><thead><tr>{head}</tr></thead>'
                      f"<tbody>{rows}</tbody></table></div>")  # fmt: skip
    check_names = set_check_names(set_)
    head = "<th>Prompt</th>" + "".join(_model_head(result, m, colours) for m in models)
    rows = "".join(_example_row(example, models, check_names) for example in examples)
    title = escape(str(set_.get("title") or set_.get("name") or f"Set {index + 1}"))
    return (f'<section class="card set"><details{" open" * (index == 0)}><summary><h2>{title}</h2> '
            f'<span class="muted">{summary}</span></summary>{rate_table}<div class="scroll">'
            f'<table class="examples" style="--cols:{len(models) + 1}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{rows}</tbody></table></div></details></section>")  # fmt: skip


def render_html(result: dict) -> str:
    """One self-contained page: header, metrics table, SVG plots, then every example per set."""
    colours = model_colours(result)
    body = [_header(result, colours), _metrics_section(result, colours), _plots_section(result, colours)]
    body += [_set_section(s, i, result, colours) for i, s in enumerate(result.get("sets") or [])]
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{escape(result.get('title') or 'liandan eval')}</title><style>{_CSS}</style></head>"
            f'<body><main>{"".join(body)}</main></body></html>\n')  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Markdown

MD_EXAMPLES = 10  # per set; the HTML and JSON reports hold them all
MD_CHARS = 160  # per prompt or output cell


def _md(text, limit: int = 0) -> str:
    """One table cell: HTML-escaped (outputs are untrusted), pipes escaped, newlines as <br>."""
    text = str(text)
    if limit and len(text) > limit:
        text = text[: limit - 1] + "…"
    return escape(text, quote=False).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _md_table(head: list[str], rows: list[list[str]], numbers: bool = True) -> list[str]:
    rule = ["---"] + ["---:" if numbers else "---"] * (len(head) - 1)
    return ["| " + " | ".join(row) + " |" for row in [head, rule, *rows]] + [""]


def _md_model(result: dict, model: str) -> str:
    label = model_label(result, model)
    return _md(label if label == model else f"{label} ({model})")


def _md_metric(metric: dict, models: list[str]) -> list[str]:
    values, fmt, better = metric.get("values") or {}, metric.get("format"), metric.get("better")
    cells = [_md(metric.get("label") or metric.get("key") or "?") + {"higher": " ↑", "lower": " ↓"}.get(better, "")]
    for i, model in enumerate(models):
        delta = format_change(metric, model, models) if i else None
        cells.append(format_value(values.get(model), fmt) + (f" ({_md(delta[0])})" if delta else ""))
    return cells


def _md_output(output: dict | None) -> str:
    if not output:
        return DASH
    mark = {True: "✓ ", False: "✗ "}.get(output.get("passed"), "")
    if output.get("call_problem"):
        return mark + _md(f"unreadable call: {output['call_problem']}", MD_CHARS)
    if output.get("calls"):  # the call read back says more than its raw text with the template's tags
        return mark + _md(calls_text(output["calls"]), MD_CHARS)
    return mark + _md(output.get("text") or "", MD_CHARS)


def _md_set(set_: dict, models: list[str], result: dict) -> list[str]:
    out = [f"## {_md(set_.get('title') or set_.get('name') or 'Set')}", ""]
    names = [_md_model(result, m) for m in models]
    rates = [[_md(name), *(pass_rate_text(*row[m]) for m in models)]
             for name, row in pass_rates(set_, models) if any(row[m][1] for m in models)]  # fmt: skip
    if rates:
        out += _md_table(["pass rate", *names], rates)
    examples = set_.get("examples") or []
    if len(examples) > MD_EXAMPLES:
        out += [f"The first {MD_EXAMPLES} of {len(examples)} examples (the HTML and JSON reports have them all):", ""]
    rows = [[_md(ex.get("id") or ""), _md(ex.get("prompt") or "", MD_CHARS),
             *(_md_output((ex.get("outputs") or {}).get(m)) for m in models)]
            for ex in examples[:MD_EXAMPLES]]  # fmt: skip
    if rows:
        out += _md_table(["id", "prompt", *names], rows, numbers=False)
    return out


def render_markdown(result: dict) -> str:
    """The metrics table with deltas, and per set its pass rates and its first few examples."""
    models = list(result.get("models") or [])
    out = [f"# {_md(result.get('title') or 'liandan eval')}", ""]
    if result.get("notes"):
        out += [f"- {_md(n)}" for n in result["notes"]] + [""]
    if result.get("settings"):
        out += _md_table(["setting", "value"], [[_md(k), _md(_setting_text(v))] for k, v in result["settings"].items()],
                         numbers=False)  # fmt: skip
    if result.get("metrics"):
        out += ["## Metrics", ""]
        if len(models) > 1:
            out += [f"Changes in brackets are against {_md_model(result, models[0])}, for percentages in "
                    "percentage points. ↑ higher is better, ↓ lower is better. Outputs: ✓ passed, ✗ failed."
                    + (" [low, high] is the change's 95% interval over the same items; *noise* marks a change the "
                       "data cannot tell from chance (the interval includes no change)."
                       if any(metric.get("intervals") for metric in result["metrics"]) else ""),
                    ""]  # fmt: skip
        head = ["metric", *(_md_model(result, m) for m in models)]
        out += _md_table(head, [_md_metric(metric, models) for metric in result["metrics"]])
    for set_ in result.get("sets") or []:
        out += _md_set(set_, models, result)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Files


def _render_json(result: dict) -> str:
    return json.dumps(result, indent=2, ensure_ascii=False)


def write_eval_report(result: dict, path: str | Path) -> Path:
    """Write ``.html``, ``.md`` or ``.json`` (by suffix) atomically, creating parent directories."""
    path = Path(path)
    render = {".html": render_html, ".md": render_markdown, ".json": _render_json}.get(path.suffix.lower())
    if render is None:
        raise LiandanError(f"--out {path}: expected a file ending in .html, .md or .json")
    text = render(result)  # before touching the disk: a rendering bug leaves nothing behind
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LiandanError(f"--out {path}: cannot create directory '{path.parent}': {exc.strerror}") from exc
    write_atomic(path, text)
    return path


def print_metrics(result: dict, console=None) -> None:
    """The headline table in the terminal: each metric, each model, the change against the first."""
    console = console or Console()
    models = result["models"]
    table = Table(title=result.get("title"), title_justify="left")
    table.add_column("metric")
    for model in models:
        table.add_column(model_label(result, model) + ("" if model_label(result, model) == model else f"\n{model}"), justify="right")
    styles = {"better": "green", "worse": "red", "same": "dim", "noise": "dim"}
    for metric in result["metrics"]:
        values = metric["values"]
        cells = [format_value(values.get(models[0]), metric.get("format"))]
        for model in models[1:]:
            cell = format_value(values.get(model), metric.get("format"))
            delta = format_change(metric, model, models)
            if delta:
                cell += f" [{styles[delta[1]]}]({escape_markup(delta[0])})[/]"
            cells.append(cell)
        table.add_row(metric["label"], *cells)
    if len(models) > 1 and any(metric.get("intervals") for metric in result["metrics"]):
        table.caption = escape_markup("(change against the first model, in points for percentages [its 95% interval]); "
                                      "noise: the interval includes no change, so the data cannot tell it from chance")  # fmt: skip
        table.caption_justify = "left"
    console.print(table)
