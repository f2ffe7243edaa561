"""The ``liandan`` command: parse arguments, call the library, print the result.

    liandan compare --model default --mode chat --mode raw --prompt "Why is the sky blue?"
    liandan generate --prompts examples/prompts.txt --temperature 0 --out out.jsonl

Bad input ends with one line on stderr and exit code 2, never a traceback. The commands live in
`liandan.cli_look`, `liandan.cli_train` and `liandan.cli_use`; importing them registers them on
the one Typer app (`liandan.cli_shared.app`), in the order ``liandan --help`` lists them.
"""

from __future__ import annotations

from . import cli_look, cli_train, cli_use  # noqa: F401  (registers the commands)
from .cli_shared import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
