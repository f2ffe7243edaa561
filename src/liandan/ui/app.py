"""The page of `liandan ui`: one tab per step of the life cycle, grouped in modules as the CLI
groups its commands (`liandan.ui.look`: Look, Evaluate; `liandan.ui.train`: Data, Train;
`liandan.ui.use`: Chat, Export), and a language switch that relabels every component at once
(`liandan.ui.i18n`).

    from liandan.ui.app import build_app, launch
    demo = build_app(UIContext(jobs=Jobs(state_dir), state_dir=state_dir), lang="zh")   # a gr.Blocks
    launch(models=["default"], state_dir=state_dir, port=7860)                          # serve it

Long work (loading, generating, evaluating, exporting) runs on a thread behind Gradio's queue, so
the page keeps answering; the training jobs are separate processes (`liandan.jobs`).
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import gradio as gr

from ..files import liandan_home
from ..jobs import Jobs
from .context import K, Labels, UIContext
from .i18n import LANGUAGES, t
from .look import eval_tab, look_tab
from .train import data_tab, train_tab
from .use import chat_tab, export_tab

CSS = """
#liandan-header {align-items: center}
#liandan-header h1 {margin: 0}
#train-progress progress {accent-color: #2e7d32}
"""


def build_app(ctx: UIContext, lang: str = "en") -> gr.Blocks:
    """The whole page; ``lang`` is the language it opens in."""
    labels = Labels(lang)
    with gr.Blocks(title="liandan 炼丹", analytics_enabled=False) as demo:
        with gr.Row(elem_id="liandan-header"):
            labels(gr.Markdown, value=K("app.title"), scale=4)
            language = labels(gr.Radio, label=K("app.language"), choices=[(name, code) for code, name in LANGUAGES.items()],
                              value=lang, scale=1, elem_id="language")  # fmt: skip
        look_tab(ctx, labels, language)
        data_tab(ctx, labels, language)
        jobs = train_tab(ctx, labels, language)
        eval_tab(ctx, labels, language)
        chat_tab(ctx, labels, language)
        export_tab(ctx, labels, language)
        language.change(labels.updates, language, labels.components, show_progress="hidden")
        refresh, inputs, outputs = jobs["refresh"]
        demo.load(refresh, inputs, outputs)  # the jobs as the server knows them, at once on every (re)load
    demo.liandan_labels = labels  # for the tests: every translated component and its keys
    return demo


def launch(*, models: list[str] | None = None, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           state_dir: Path | None = None, lang: str = "en") -> None:  # fmt: skip
    """Serve the page until Ctrl-C. Only this machine can reach it unless ``host`` opens it to
    the network or ``share`` asks Gradio for a public link; it runs training and reads files on
    this machine for whoever can open it."""
    state_dir = Path(state_dir) if state_dir else liandan_home() / "ui"
    state_dir.mkdir(parents=True, exist_ok=True)
    ctx = UIContext(jobs=Jobs(state_dir), state_dir=state_dir, models=list(models or ["default"]))
    if share or not is_loopback(host):
        print(t(lang, "app.exposed", host=host) + (" " + t(lang, "app.shared") if share else ""), file=sys.stderr)
    demo = build_app(ctx, lang)
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name=host, server_port=port, share=share, inbrowser=False, show_error=True, quiet=True,
                allowed_paths=[str(state_dir)], css=CSS, footer_links=[], prevent_thread_lock=True)  # fmt: skip
    print(t(lang, "app.listening", url=demo.share_url or demo.local_url, state_dir=state_dir), flush=True)
    demo.block_thread()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
