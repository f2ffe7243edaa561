"""`liandan ui`: the whole life cycle in the browser — look at models, inspect data, train with
live curves, evaluate, chat, export — in English and Chinese. Every screen is a view of what a
``liandan`` command does, calling the same library function.

    pip install -e ".[ui]"      # gradio, pinned to GRADIO
    liandan ui                  # http://127.0.0.1:7860

From Python: ``liandan.ui.app.launch(models=["default"], state_dir=Path("ui-state"))``.

Nothing in this module imports gradio, so ``import liandan`` and ``liandan --help`` never need it;
`require_gradio` turns a missing or mismatched gradio into one line naming the command that
installs the right one, instead of a traceback from inside the web framework.
"""

from __future__ import annotations

import importlib.metadata
import os

from ..errors import LiandanError

GRADIO = "gradio>=6.0,<7"
"""The gradio the UI is written for (the ``ui`` extra in pyproject.toml says the same)."""
GRADIO_MAJOR = 6
INSTALL = "pip install 'liandan[ui]'  (in a checkout: pip install -e '.[ui]')"


def require_gradio() -> None:
    """Raise `LiandanError` unless a gradio of the supported major version imports cleanly."""
    try:
        version = importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:
        raise LiandanError(f"liandan ui needs gradio, which is not installed; install it with: {INSTALL}") from None
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) != GRADIO_MAJOR:
        raise LiandanError(f"liandan ui needs {GRADIO}, but gradio {version} is installed; install the right one with: {INSTALL}")
    # Gradio would report usage to its makers at every start: not from a tool that runs offline.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except Exception as exc:  # a dependency of gradio that does not fit: name it, not its traceback
        raise LiandanError(f"gradio {version} is installed but does not import ({type(exc).__name__}: {exc}); "
                           f"reinstall it with its dependencies: {INSTALL}") from None  # fmt: skip
