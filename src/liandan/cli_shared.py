"""What every ``liandan`` command shares: the Typer app, the options several commands take, and
turning a `LiandanError` into one line and exit code 2. The commands themselves are in
`liandan.cli_look` (compare, generate, quickstart, bake, eval), `liandan.cli_train` (sft, dpo,
pretrain, merge) and `liandan.cli_use` (chat, serve, export, examples, inspect-data, ui); they import
the library inside each command, so that ``liandan --help`` stays quick."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .errors import LiandanError

app = typer.Typer(
    help="liandan (炼丹): look at, fine-tune, measure and serve small language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

# Options shared by the commands that generate.
PromptOpt = Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A prompt (repeatable).")]
PromptsOpt = Annotated[Optional[Path], typer.Option("--prompts", help="Prompts file: .txt (one per line) or .jsonl (prompt or messages).")]
SystemOpt = Annotated[Optional[str], typer.Option(help="System prompt for chat mode.")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", help="Most tokens to generate per output.")]
TempOpt = Annotated[float, typer.Option(help="0 = greedy (deterministic); above 0 samples, e.g. 0.7.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold (1 = off).")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens (0 = off).")]
RepOpt = Annotated[float, typer.Option("--repetition-penalty", help="Penalty for repeated tokens (1 = off).")]
SeedOpt = Annotated[int, typer.Option(help="Random seed (reset for every model).")]
SamplesOpt = Annotated[int, typer.Option("--num-samples", "-n", help="Outputs per prompt (needs sampling).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Prompts generated together.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]
RemoteOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the model's repository to run.")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow pickled (.bin) weights, which can run code when loaded.")]
CodeOpt = Annotated[bool, typer.Option("--allow-code", help="Allow Python code named by data or settings: 'predicate' checks, python= rewards.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write .html, .md or .jsonl (by extension).")]
# Options of the commands that evaluate (eval, experiment).
SchemaOpt = Annotated[Optional[Path], typer.Option(help="JSON Schema every task answer must follow.")]
ProbesOpt = Annotated[str, typer.Option(help="Retention probes: default (shipped), a .jsonl file, or none.")]
DriftOpt = Annotated[str, typer.Option(help="General prompts for drift: default, a .jsonl/.txt file, or none.")]
PairsOpt = Annotated[Optional[Path], typer.Option(help="Held-out preference pairs: preference accuracy.")]
TextOpt = Annotated[Optional[Path], typer.Option(help="Held-out raw text (.txt): perplexity.")]


@contextmanager
def user_errors():
    """Turn a `LiandanError` into one line on stderr and exit code 2."""
    try:
        yield
    except LiandanError as exc:
        # escaped: a message naming 'liandan[ui]' or a list ['a', 'b'] is text, not Rich markup
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def check_models(specs: list[str]) -> None:
    from .models import check_models as check

    check(specs)


def quiet_libraries() -> None:
    """transformers' own progress bars and advice would drown the table."""
    import warnings

    import transformers

    # Raised inside PEFT/transformers on every training run; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run_with_progress(job, total: int, **load_options):
    """Run ``job(load, progress)`` under a Rich progress bar that counts finished prompts."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .models import load_model, resolve_model

    quiet_libraries()
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task("starting", total=total)

        def load(spec: str):
            bar.update(task, description=f"loading {resolve_model(spec).name}")
            return load_model(spec, **load_options)

        def progress(label: str, n: int) -> None:
            bar.update(task, advance=n, description=label)

        return job(load, progress)
