"""liandan (炼丹): look at, fine-tune, measure and serve small language models.

    import liandan
    model, tokenizer = liandan.load_model("default")
    result = liandan.compare(["default"], ["What is 2+2?"], modes=["chat", "raw"])

The heavy imports (torch, transformers) happen on first use, so `liandan --help` is quick.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Public API: name -> module that defines it. Resolved lazily (PEP 562).
_EXPORTS = {
    "load_model": "liandan.models",
    "release_model": "liandan.models",
    "generate": "liandan.generate",
    "compare": "liandan.generate",
    "SamplingConfig": "liandan.generate",
    "Prompt": "liandan.prompts",
    "read_prompts": "liandan.prompts",
    "LiandanError": "liandan.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'liandan' has no attribute {name!r}")
