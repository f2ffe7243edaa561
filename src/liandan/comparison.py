"""The same prompts through several models and modes, side by side: run them, show them in the
terminal, save them as HTML / Markdown / JSONL, or display them in a notebook.

    from liandan.comparison import compare, print_comparison, write_comparison
    result = compare(["default", "runs/my-sft"], ["Translate to English: 你好"],
                     modes=["chat", "raw"], config=SamplingConfig(max_new_tokens=64))
    print_comparison(result)                      # side-by-side table
    write_comparison(result, "cmp.html")          # format chosen by the extension
    result                                        # in Jupyter: the same page, inline

Files are written to a temporary name and renamed, so a failed write never leaves a half file.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import LiandanError
from .files import write_atomic
from .generation import MODES, Generation, SamplingConfig, as_prompts, generate
from .models import load_model, release_model
from .prompts import Prompt

FORMATS = (".html", ".md", ".jsonl")


@dataclass
class CompareResult:
    """Every output of a comparison, with the axes it was run over."""

    models: list[str]
    modes: list[str]
    prompts: list[Prompt]
    config: SamplingConfig
    generations: list[Generation] = field(default_factory=list)

    def cell(self, model: str, mode: str, prompt_index: int) -> list[Generation]:
        """The outputs (one per sample) of one model and mode for one prompt."""
        return [
            g for g in self.generations
            if g.model == model and g.mode == mode and g.prompt_index == prompt_index
        ]  # fmt: skip

    def _repr_html_(self) -> str:
        """Jupyter shows a comparison as the page `write_comparison` writes, inline."""
        return to_html(self)


def compare(
    models: Sequence[str],
    prompts: Sequence[Prompt | str],
    *,
    modes: Sequence[str] = ("chat",),
    system: str | None = None,
    config: SamplingConfig | None = None,
    load: Callable[[str], tuple[Any, Any]] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> CompareResult:
    """The same prompts through each model and mode.

    Models are loaded one at a time and released (accelerator cache included) before the next
    loads, so peak memory is that of the largest model, not of all of them.
    ``load(spec)`` defaults to `liandan.models.load_model`; ``progress(label, n)`` is told about
    each finished batch.
    """
    config = config or SamplingConfig()
    prompts = as_prompts(prompts)
    models = list(models) or ["default"]
    for mode in modes:
        if mode not in MODES:
            raise LiandanError(f"--mode {mode}: expected one of {', '.join(MODES)}")
    result = CompareResult(models=models, modes=list(modes), prompts=prompts, config=config)
    load = load or load_model
    for spec in models:
        model, tokenizer = load(spec)
        try:
            for mode in modes:
                step = (lambda n, label=f"{spec} · {mode}": progress(label, n)) if progress else None
                result.generations += generate(
                    model, tokenizer, prompts, mode=mode, system=system, config=config,
                    model_name=spec, on_batch=step,
                )  # fmt: skip
        finally:
            release_model(model)
            del model
    return result


def columns(result: CompareResult) -> list[tuple[str, str]]:
    """The (model, mode) pairs, in the order they were run: one column each."""
    return [(model, mode) for model in result.models for mode in result.modes]


def status_line(g: Generation) -> str:
    ending = "stopped" if g.stopped else "hit the length limit"
    tokens = "1 token" if g.new_tokens == 1 else f"{g.new_tokens} tokens"
    speed = "—" if g.tokens_per_second is None else f"{g.tokens_per_second:.1f}"
    return f"{tokens} · {ending} · {speed} tok/s"


# ---------------------------------------------------------------------------------------------
# Terminal


def print_comparison(result: CompareResult, console=None, max_chars: int = 600) -> None:
    """One table per prompt, a column per model and mode; long outputs are shortened."""
    console = console or Console()
    for index, prompt in enumerate(result.prompts):
        title = Text(f"Prompt {index + 1}: {shorten(prompt.display, 120)}", style="bold")
        table = Table(title=title, show_lines=True, expand=True)
        for model, mode in columns(result):
            table.add_column(Text(f"{model}\n[{mode}]"), overflow="fold", ratio=1)
        for sample in range(result.config.num_samples):
            cells = []
            for model, mode in columns(result):
                outputs = [g for g in result.cell(model, mode, index) if g.sample == sample]
                cells.append(_terminal_cell(outputs[0], max_chars) if outputs else Text("-"))
            table.add_row(*cells)
        console.print(table)
    stopped = sum(g.stopped for g in result.generations)
    console.print(f"{stopped} of {len(result.generations)} outputs stopped by themselves.")


def _terminal_cell(g: Generation, max_chars: int):
    cell = Text(shorten(g.text, max_chars) or "(empty)")
    cell.append("\n" + status_line(g), style="green" if g.stopped else "bold red")
    if g.note:
        cell.append("\n" + g.note, style="yellow")
    return cell


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------
# Files


def write_comparison(result: CompareResult, path: str | Path) -> Path:
    """Write ``.html``, ``.md`` or ``.jsonl`` (by extension) atomically."""
    path = Path(path)
    render = {".html": to_html, ".md": to_markdown, ".jsonl": to_jsonl}.get(path.suffix.lower())
    if render is None:
        raise LiandanError(f"--out {path}: expected a file ending in {', '.join(FORMATS)}")
    if not path.parent.exists():
        raise LiandanError(f"--out {path}: directory '{path.parent}' does not exist")
    write_atomic(path, render(result))
    return path


def to_jsonl(result: CompareResult) -> str:
    """One JSON object per output, with the prompt's source and display text."""
    lines = []
    for g in result.generations:
        prompt = result.prompts[g.prompt_index]
        record = {"prompt_source": prompt.source, "prompt_display": prompt.display, **g.to_dict()}
        lines.append(json.dumps(record, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def to_markdown(result: CompareResult) -> str:
    out = ["# liandan compare", "", _settings(result), ""]
    for index, prompt in enumerate(result.prompts):
        out += [f"## Prompt {index + 1}", "", _quote(prompt.display), ""]
        for model, mode in columns(result):
            for g in result.cell(model, mode, index):
                sample = f", sample {g.sample + 1}" if result.config.num_samples > 1 else ""
                out += [f"### {model} [{mode}{sample}]", "", f"*{status_line(g)}*", ""]
                out += ["```text", g.text.replace("```", "`\u200b``"), "```", ""]
                if g.note:
                    out += [f"> note: {g.note}", ""]
    return "\n".join(out)


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in text.splitlines() or [""])


def _settings(result: CompareResult) -> str:
    c = result.config
    decoding = "greedy" if c.is_greedy else f"temperature {c.temperature}, top-p {c.top_p}, top-k {c.top_k or 'off'}"
    return (
        f"Models: {', '.join(result.models)}. Modes: {', '.join(result.modes)}. "
        f"Decoding: {decoding}, repetition penalty {c.repetition_penalty}, "
        f"max {c.max_new_tokens} new tokens, seed {c.seed}, {c.num_samples} sample(s) per prompt."
    )


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5rem;color:#1d1d1f;background:#fafafa}
h1{font-size:1.4rem} .settings{color:#555;font-size:.9rem}
section{margin:1.5rem 0;padding:1rem;background:#fff;border:1px solid #ddd;border-radius:8px}
section>h2{font-size:1.1rem;margin:0 0 .6rem}
.prompt{white-space:pre-wrap;background:#f1f3f5;padding:.6rem;border-radius:6px;margin-bottom:.8rem}
.grid{display:grid;gap:.8rem;grid-template-columns:repeat(var(--cols),minmax(min(16rem,85vw),1fr));overflow-x:auto}
@media (max-width:600px){.grid{grid-template-columns:1fr}}
.col{display:flex;flex-direction:column} .col>.out:first-of-type{flex:1}
.col h3{font-size:.95rem;margin:.2rem 0 .4rem} .mode{color:#6a4c93;font-weight:normal}
.out em{color:#888} .stat{margin-bottom:.2rem}
.out{white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,Menlo,Consolas,monospace;
 font-size:.85rem;background:#fcfcfc;border:1px solid #e3e3e3;border-radius:6px;padding:.5rem;margin:.4rem 0}
.stat{font-size:.8rem} .stopped{color:#1a7f37} .limit{color:#c62828;font-weight:600}
.note{color:#9a6700;font-size:.8rem}
details summary{cursor:pointer;color:#555;font-size:.8rem}
"""


def to_html(result: CompareResult) -> str:
    """A self-contained page: per prompt, one column per (model, mode), side by side."""
    esc = html.escape
    cols = columns(result)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>liandan compare</title><style>{_CSS}</style></head><body>",
        "<h1>liandan compare</h1>",
        f"<p class='settings'>{esc(_settings(result))}</p>",
    ]
    for index, prompt in enumerate(result.prompts):
        parts.append(f"<section><h2>Prompt {index + 1}</h2><div class='prompt'>{esc(prompt.display)}</div>")
        parts.append(f"<div class='grid' style='--cols:{len(cols)}'>")
        for model, mode in cols:
            outputs = result.cell(model, mode, index)
            parts.append(f"<div class='col'><h3>{esc(model)} <span class='mode'>[{esc(mode)}]</span></h3>")
            for g in outputs:
                css = "stopped" if g.stopped else "limit"
                parts.append(f"<div class='out'>{esc(g.text) or '<em>(empty)</em>'}</div>")
                parts.append(f"<div class='stat {css}'>{esc(status_line(g))}</div>")
                if g.note:
                    parts.append(f"<div class='note'>{esc(g.note)}</div>")
            if outputs:
                parts.append(f"<details><summary>prompt as the model saw it</summary><div class='out'>{esc(outputs[0].prompt)}</div></details>")
            parts.append("</div>")
        parts.append("</div></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
