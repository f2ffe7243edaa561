"""liandan (炼丹): look at, fine-tune, measure and serve small language models.

    import liandan
    model, tokenizer = liandan.load_model("default")
    outputs = liandan.generate(model, tokenizer, ["What is 2+2?"])
    result = liandan.compare(["default"], ["What is 2+2?"], modes=["chat", "raw"])   # shows itself in Jupyter

The heavy imports (torch, transformers) happen on first use, so `liandan --help` is quick. No
public name is also the name of a submodule: importing ``liandan.generation`` never replaces
``liandan.generate``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public API: name -> module that defines it. Resolved lazily (PEP 562) and then kept.
_EXPORTS = {
    "load_model": "liandan.models",
    "release_model": "liandan.models",
    "generate": "liandan.generation",
    "SamplingConfig": "liandan.generation",
    "compare": "liandan.comparison",
    "evaluate": "liandan.evaluation",
    "EvalConfig": "liandan.evaluation",
    "Prompt": "liandan.prompts",
    "read_prompts": "liandan.prompts",
    "LiandanError": "liandan.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'liandan' has no attribute {name!r}")
