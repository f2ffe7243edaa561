"""The one exception type liandan raises for bad input.

A `LiandanError` carries a message written for the person at the terminal: it names the file,
line or record and field where there is one, and says what was expected. The CLI prints it on one
line and exits with code 2; library callers can catch it.

    raise LiandanError("prompts.jsonl:3: field 'prompt': expected a string, got a list")

What is worth saying but does not stop the work (a setting not applied, a checkpoint skipped) goes
to standard error through `warn`, so that standard output stays the command's result.
"""

from rich.console import Console


class LiandanError(Exception):
    """Bad input or an unusable environment, described in one line for the user."""


def warn(message: str) -> None:
    """One line on standard error, printed as written (no Rich highlighting of numbers or paths)."""
    Console(stderr=True).print(message, highlight=False)
