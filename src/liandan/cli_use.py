"""The commands that use a model or prepare for training: chat, serve, export, examples, inspect-data, ui."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli_shared import (
    DeviceOpt,
    DtypeOpt,
    MaxNewOpt,
    PickleOpt,
    RemoteOpt,
    RepOpt,
    SeedOpt,
    SystemOpt,
    TempOpt,
    TopKOpt,
    TopPOpt,
    app,
    check_models,
    console,
    quiet_libraries,
    user_errors,
)


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="Model: default, a model, merged or run directory, a .gguf file or a hub id.")] = "default",
    system: SystemOpt = None,
    max_new_tokens: MaxNewOpt = 512,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 0.95,
    top_k: TopKOpt = 0,
    repetition_penalty: RepOpt = 1.0,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: RemoteOpt = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """Chat with a model in the terminal, replies streamed (/help inside for /reset, /system, /save)."""
    with user_errors():
        from .generation import SamplingConfig
        from .terminal_chat import run_chat

        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  top_k=top_k, repetition_penalty=repetition_penalty, seed=seed)  # fmt: skip
        check_models([model])
        quiet_libraries()
        run_chat(model, sampling=sampling, system=system, dtype=dtype, device=device,
                 trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)  # fmt: skip


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="Model: default, a model, merged or run directory, a .gguf file or a hub id.")] = "default",
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 opens it to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="LIANDAN_API_KEY", help="Require this Bearer key on every path (or set LIANDAN_API_KEY).")] = None,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="Name clients use (default: the directory's name).")] = None,
    max_prompt_tokens: Annotated[Optional[int], typer.Option("--max-prompt-tokens", help="Refuse longer prompts (400).")] = None,
    limit: Annotated[Optional[list[str]], typer.Option("--limit", metavar="KEY=VALUE", help="Set a server limit (repeatable). Defaults: max_n=8, max_tokens=4096, max_prompts=16, max_stops=4, max_stop_chars=256, max_body_bytes=2097152, max_queued=64, retry_after_s=2, max_connections=4 x max_queued, keep_alive_s=5, max_header_bytes=16384, header_timeout_s=10, max_logprobs=20.")] = None,
    allow_host: Annotated[Optional[list[str]], typer.Option("--allow-host", metavar="NAME", help="Also answer to this Host name (repeatable; '*': any). Always: localhost, 127.0.0.1, ::1, --host.")] = None,
    allow_origin: Annotated[Optional[list[str]], typer.Option("--allow-origin", metavar="URL", help="Accept browser requests from this web origin, e.g. http://localhost:3000 (repeatable).")] = None,
    docs: Annotated[bool, typer.Option("--docs", help="Serve /docs and /openapi.json (behind --api-key when set).")] = False,
    tools_template: Annotated[Optional[str], typer.Option("--tools-template", help="For a model whose chat template renders no tools: chatml (liandan's ChatML tools template) or a .jinja file. A run trained with tools_template has it already.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Serve a model behind an OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions)."""
    with user_errors():
        from . import serve as serving
        from .openai_api import parse_limits

        quiet_libraries()
        serving.serve(model, host=host, port=port, api_key=api_key, dtype=dtype, device=device, model_name=model_name, docs=docs,
                      max_prompt_tokens=max_prompt_tokens, limits=parse_limits(limit), extra_hosts=allow_host, origins=allow_origin,
                      tools_template=tools_template)  # fmt: skip


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="Model: default, a model, merged or run directory (merged on the way).")],
    out: Annotated[Path, typer.Argument(help="The .gguf file to write (an Ollama OUT.Modelfile is written beside it).")],
    format: Annotated[str, typer.Option("--format", help="Export format: gguf (llama.cpp, Ollama).")] = "gguf",
    quant: Annotated[str, typer.Option("--quant", help="f16 or q8_0.")] = "f16",
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT and its Modelfile.")] = False,
) -> None:
    """Export to GGUF (Llama, Qwen2/3, Qwen3-MoE, Mistral, Gemma 2/3, Phi-3) with its tokenizer and
    chat template, verified on probe prompts in llama.cpp (when installed) and transformers."""
    with user_errors():
        from .export import export as export_model

        check_models([model])
        quiet_libraries()
        result = export_model(model, out, format=format, quant=quant, force=force)
        for line in result.summary():
            console.print(line, highlight=False)


@app.command()
def examples(
    out: Annotated[Path, typer.Argument(help="A new or empty directory to copy them into.")] = Path("examples"),
) -> None:
    """Copy the examples shipped with liandan (data, recipes, task sets) into ./examples, so the
    README's commands (liandan sft --config examples/sft-pirate.yaml, ...) run here as written."""
    with user_errors():
        from .prompts import copy_examples

        console.print(f"Copied {copy_examples(out)} files to {out}/ (see {out}/README.md)")


@app.command("inspect-data")
def inspect_data(
    data: Annotated[list[str], typer.Option("--data", "-d", help="Training data file (repeatable).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model whose tokenizer and chat template to use.")] = "default",
    format: Annotated[Optional[str], typer.Option(help="Force a data format.")] = None,
    max_length: Annotated[int, typer.Option("--max-length", help="Truncate examples to this many tokens.")] = 1024,
    show: Annotated[int, typer.Option(help="Examples to show with trained tokens highlighted.")] = 3,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="Drop invalid records instead of stopping.")] = False,
    tools_template: Annotated[Optional[str], typer.Option("--tools-template", help="For tool-calling data on a model whose template renders no tools: chatml or a .jinja file (as SFT's tools_template).")] = None,
) -> None:
    """Check data before spending compute: encoded examples with the trained tokens highlighted."""
    with user_errors():
        from rich.text import Text

        from .data_inspection import inspect_data as run_inspection

        quiet_libraries()
        check_models([model])
        report = run_inspection(data, model=model, format=format, max_length=max_length, show=show, skip_invalid=skip_invalid,
                                tools_template=tools_template)  # fmt: skip
        for example in report.shown:
            text = Text(f"── {example.source} ──\n", style="bold")
            for piece, trained in example.pieces:
                text.append(piece, style="black on green" if trained else "dim")
            console.print(text)
        console.print(report.summary(), highlight=False)
        console.print(report.verdict(), style="green" if report.stops_kept else "bold red")


@app.command()
def ui(
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="A model every picker offers (repeatable; the first is selected; default: default).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 opens it to the network (anyone who reaches it can train and read files here).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7860,
    share: Annotated[bool, typer.Option("--share", help="Also ask Gradio for a public gradio.live link (off unless asked).")] = False,
    state_dir: Annotated[Optional[Path], typer.Option("--state-dir", help="Where the UI keeps its training jobs and reports (default: $LIANDAN_HOME/ui).")] = None,
    lang: Annotated[str, typer.Option(help="The language the page opens in: en or zh (switchable in the page).")] = "en",
) -> None:
    """The whole life cycle in the browser: look, inspect data, train with live curves, evaluate,
    chat, export; English and 简体中文 (needs the ui extra: pip install 'liandan\\[ui]')."""
    with user_errors():
        from .errors import LiandanError
        from .ui import require_gradio
        from .ui.i18n import LANGUAGES

        if lang not in LANGUAGES:
            raise LiandanError(f"--lang {lang}: expected one of {', '.join(LANGUAGES)}")
        require_gradio()
        if model:
            check_models(model)
        from .ui.app import launch

        quiet_libraries()
        launch(models=model, host=host, port=port, share=share, state_dir=state_dir, lang=lang)
