"""What every tab of `liandan ui` shares: the server's state (the training jobs, the models on
offer, one lock for the work that loads a model), translated components, and long work run on a
thread so that the page keeps answering while it runs.

    ctx = UIContext(jobs=Jobs(state_dir), state_dir=state_dir, models=["default"])
    labels = Labels("zh")
    button = labels(gr.Button, value=K("look.run"), variant="primary")   # "运行对比"; labels.updates("en") -> "Compare"
    for kind, payload in in_background(ctx, lambda report: compare(..., progress=report)):
        ...   # ("progress", "default · chat 3/6") while it runs, then ("done", result)
"""

from __future__ import annotations

import html
import queue
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from ..errors import LiandanError
from ..jobs import Jobs
from .i18n import t


@dataclass
class UIContext:
    """The server's side of the page: it outlives any page, so a reload or a second tab sees the same."""

    jobs: Jobs
    state_dir: Path
    """Where the jobs and the UI's own files live (saved reports, uploads)."""
    models: list[str] = field(default_factory=lambda: ["default"])
    """Offered in every model picker (from --model); the first is selected at the start."""
    runs_root: Path = Path("runs")
    """Run directories found under it are offered as models too."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Held by the work that loads a model (compare, evaluate, export, merge): one at a time, so
    memory holds one such model besides the chat's."""


def model_choices(ctx: UIContext) -> list[str]:
    """Every model a picker offers: --model's, default, finished runs of the jobs, and run
    directories under ``runs/``; typing any other path works too."""
    choices = [*ctx.models, "default"]
    choices += [str(job.run_dir) for job in ctx.jobs.list() if job.status == "finished"]  # a stopped run is not a model yet
    if ctx.runs_root.is_dir():
        choices += sorted(str(p.parent) for p in ctx.runs_root.glob("*/config.yaml"))
    return list(dict.fromkeys(choices))


class Labels:
    """Every translated property of every component, so that one switch of language updates
    them all. ``labels(gr.Textbox, label=K("look.prompts"), info=K("look.prompts_info"), lines=4)``
    makes the component with the strings of the starting language and remembers the keys; a
    property given as `Texts` (a setting's label and help) is switched the same way."""

    TRANSLATED = ("label", "info", "value", "placeholder", "x_title", "y_title")

    def __init__(self, lang: str):
        self.lang = lang
        self.entries: list[tuple[Any, dict[str, Key | Texts]]] = []

    def __call__(self, factory: Callable[..., Any], **kwargs: Any) -> Any:
        keys = {name: kwargs.pop(name) for name in self.TRANSLATED if isinstance(kwargs.get(name), (Key, Texts))}
        component = factory(**kwargs, **{name: key.text(self.lang) for name, key in keys.items()})
        self.entries.append((component, keys))
        return component

    def updates(self, lang: str) -> list:
        return [gr.update(**{name: key.text(lang) for name, key in keys.items()}) for _, keys in self.entries]

    @property
    def components(self) -> list:
        return [component for component, _ in self.entries]


class Key(str):
    """An i18n key given to `Labels` (``K("look.run")``), as against a literal value."""

    def text(self, lang: str) -> str:
        return t(lang, self)


K = Key


@dataclass
class Texts:
    """A text given in every language at once, for what `liandan.ui.i18n` does not hold: a
    setting's label and help (`liandan.ui.i18n_settings`)."""

    by_lang: dict[str, str]

    def text(self, lang: str) -> str:
        return self.by_lang.get(lang, self.by_lang["en"])


def in_background(ctx: UIContext | None, work: Callable[[Callable[[str], None]], Any]) -> Iterator[tuple[str, Any]]:
    """Run ``work(report)`` on a thread (holding ``ctx.lock`` unless ctx is None) and yield
    ``("progress", text)`` for each ``report(text)``, then ``("done", result)``; an exception in
    the work is raised here. A generator handler that loops over this keeps the page answering
    and shows the progress as it comes."""
    messages: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            if ctx is not None:
                if not ctx.lock.acquire(blocking=False):
                    messages.put("waiting")
                    ctx.lock.acquire()
                try:
                    outcome["result"] = work(messages.put)
                finally:
                    ctx.lock.release()
            else:
                outcome["result"] = work(messages.put)
        except BaseException as exc:  # handed to the page's thread
            outcome["error"] = exc
        finally:
            messages.put(None)

    threading.Thread(target=run, daemon=True).start()
    while (message := messages.get()) is not None:
        yield "progress", message
    if "error" in outcome:
        raise outcome["error"]
    yield "done", outcome["result"]


def counter(report: Callable[[str], None], total: int) -> Callable[[str, int], None]:
    """A ``progress(label, n)`` callback, as the library's compare and evaluate take, that
    reports ``label: done/total``."""
    done = [0]

    def progress(label: str, n: int) -> None:
        done[0] += n
        report(f"{label}: {done[0]}/{total}")

    return progress


def error_text(lang: str, exc: BaseException) -> str:
    """A failure as the page shows it: a `LiandanError` as its one line (the CLI's words); any
    other error as its type and message, its traceback printed where `liandan ui` runs."""
    if isinstance(exc, LiandanError):
        return f"**{t(lang, 'common.error')}** {html.escape(str(exc))}"
    traceback.print_exception(exc)
    return f"**{t(lang, 'common.error')}** {type(exc).__name__}: {html.escape(str(exc))}"


def status_text(lang: str, message: str) -> str:
    """A progress message from `in_background` as the status line shows it."""
    if message == "waiting":
        return t(lang, "common.waiting")
    return f"{t(lang, 'common.working')} {html.escape(message)}"


def framed(page: str, height: int = 640) -> str:
    """A whole HTML page (a liandan report) inside the app, its styles kept to itself."""
    return (f'<iframe class="liandan-report" srcdoc="{html.escape(page, quote=True)}" sandbox="allow-same-origin" '
            f'style="width:100%;height:{height}px;border:1px solid #ddd;border-radius:8px;background:#fff"></iframe>')  # fmt: skip


def uploaded_or_typed(upload: Any, typed: str | None) -> str | None:
    """The path of an uploaded file, else the one typed in (stripped), else None."""
    if upload:
        return str(upload)
    return typed.strip() if typed and typed.strip() else None
