"""The one exception type liandan raises for bad input.

A `LiandanError` carries a message written for the person at the terminal: it names the file,
line or record and field where there is one, and says what was expected. The CLI prints it on one
line and exits with code 2; library callers can catch it.

    raise LiandanError("prompts.jsonl:3: field 'prompt': expected a string, got a list")

What is worth saying but does not stop the work (what the data holds, a setting not applied, a
checkpoint skipped) goes to standard error through `say`, so that standard output stays the
command's result.
"""

from rich.console import Console


class LiandanError(Exception):
    """Bad input or an unusable environment, described in one line for the user."""


def say(message: str) -> None:
    """One line on standard error, printed as written (no Rich highlighting of numbers or paths):
    a note or a warning for the person at the terminal."""
    Console(stderr=True).print(message, highlight=False)
