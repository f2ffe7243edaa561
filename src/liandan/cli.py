"""The ``liandan`` command: parse arguments, call the library, print the result.

    liandan compare --model default --mode chat --mode raw --prompt "Why is the sky blue?"
    liandan generate --prompts examples/prompts.txt --temperature 0 --out out.jsonl

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

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
CodeOpt = Annotated[bool, typer.Option("--allow-code", help="Allow 'predicate' checks: they run Python code the task file names.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write .html, .md or .jsonl (by extension).")]


@contextmanager
def user_errors():
    """Turn a `LiandanError` into one line on stderr and exit code 2."""
    try:
        yield
    except LiandanError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
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


@app.command()
def compare(
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Model: default, a directory, a .gguf file or a hub id (repeatable).")] = None,
    mode: Annotated[Optional[list[str]], typer.Option("--mode", help="chat (apply the chat template) or raw (plain continuation); repeatable.")] = None,
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    system: SystemOpt = None,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 0.95,
    top_k: TopKOpt = 0,
    repetition_penalty: RepOpt = 1.0,
    seed: SeedOpt = 0,
    num_samples: SamplesOpt = 1,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: RemoteOpt = False,
    allow_pickle: PickleOpt = False,
    out: OutOpt = None,
) -> None:
    """Run the same prompts through several models and modes, side by side."""
    with user_errors():
        from .comparison import compare as run_compare
        from .generation import SamplingConfig
        from .prompts import collect_prompts

        config = SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty, seed=seed,
            num_samples=num_samples, batch_size=batch_size,
        )  # fmt: skip
        collected = collect_prompts(prompt or [], prompts)
        models = model or ["default"]
        modes = mode or ["chat"]
        check_models(models)
        if out is not None:
            from .comparison import FORMATS

            if out.suffix.lower() not in FORMATS:  # fail before spending minutes generating
                raise LiandanError(f"--out {out}: expected a file ending in {', '.join(FORMATS)}")
        result = _run_with_progress(
            lambda load, progress: run_compare(
                models, collected, modes=modes, system=system, config=config, load=load, progress=progress
            ),
            total=len(models) * len(modes) * len(collected),
            device=device, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
        )  # fmt: skip
        from .comparison import print_comparison, write_comparison

        print_comparison(result, console)
        if out is not None:
            console.print(f"Wrote {write_comparison(result, out)}")


@app.command()
def generate(
    model: Annotated[str, typer.Option("--model", "-m", help="Model: default, a directory, a .gguf file or a hub id.")] = "default",
    mode: Annotated[str, typer.Option(help="chat (apply the chat template) or raw (plain continuation).")] = "chat",
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    system: SystemOpt = None,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 0.95,
    top_k: TopKOpt = 0,
    repetition_penalty: RepOpt = 1.0,
    seed: SeedOpt = 0,
    num_samples: SamplesOpt = 1,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: RemoteOpt = False,
    allow_pickle: PickleOpt = False,
    out: OutOpt = None,
) -> None:
    """Generate from one model; prints each output with its token count and whether it stopped."""
    compare(
        model=[model], mode=[mode], prompt=prompt, prompts=prompts, system=system,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, seed=seed, num_samples=num_samples,
        batch_size=batch_size, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle, out=out,
    )  # fmt: skip


@app.command()
def quickstart(
    model: Annotated[str, typer.Option("--model", "-m", help="Model to fine-tune.")] = "default",
    train: Annotated[Optional[str], typer.Option(help="Task training set [default: the shipped examples/extract/train.jsonl].")] = None,
    test: Annotated[Optional[str], typer.Option(help="Held-out task set [default: the shipped examples/extract/test.jsonl].")] = None,
    schema: Annotated[Optional[str], typer.Option(help="JSON Schema of the answers, or 'none' [default: the shipped examples/extract/schema.json].")] = None,
    out: Annotated[str, typer.Option("--out", "-o", help="Output directory.")] = "quickstart",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing quickstart output directory.")] = False,
    replay: Annotated[str, typer.Option(help="Against forgetting: self, a data file, or none.")] = "self",
    replay_ratio: Annotated[float, typer.Option("--replay-ratio", help="Replay examples per task example (at most 1).")] = 0.5,
    epochs: Annotated[float, typer.Option(help="Passes over the training set.")] = 1.0,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Further SFT settings: key=value.")] = None,
) -> None:
    """The main job: compare chat vs raw, evaluate, fine-tune with replay, evaluate again, report."""
    with user_errors():
        from .quickstart import QuickstartConfig
        from .quickstart import quickstart as run_quickstart

        quiet_libraries()
        task = {k: v for k, v in {"train": train, "test": test, "schema": schema}.items() if v is not None}  # else shipped
        config = QuickstartConfig(model=model, **task, out=out, overwrite=overwrite, replay=replay, replay_ratio=replay_ratio,
                                  epochs=epochs, lr=lr, sft_overrides=set_ or [])  # fmt: skip
        check_models([model])
        run_quickstart(config, console)


@app.command()
def bake(
    system: Annotated[str, typer.Option("--system", "-s", help="The system prompt to bake in: its text, or a .txt file.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model to bake it into.")] = "default",
    prompts: Annotated[str, typer.Option(help="Training prompts the teacher answers: default (shipped general prompts) or a file.")] = "default",
    task: Annotated[Optional[str], typer.Option("--task", "-t", help="Held-out prompts with checks, to measure adherence.")] = None,
    check: Annotated[Optional[list[str]], typer.Option("--check", help="Adherence check for every answer: KEY=VALUE (repeatable).")] = None,
    output_dir: Annotated[str, typer.Option("--output-dir", "-o", help="Run directory.")] = "runs/bake",
    tries: Annotated[int, typer.Option(help="Teacher answers drawn per prompt until one passes the checks.")] = 2,
    epochs: Annotated[float, typer.Option(help="Passes over the teacher's answers.")] = 3.0,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    probes: Annotated[str, typer.Option(help="Also measure retention: default, a file, or none.")] = "none",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Further SFT settings: key=value.")] = None,
    allow_code: CodeOpt = False,
) -> None:
    """Bake a system prompt into the weights: same behaviour without sending the prompt."""
    from .checks import allowing_code, parse_check_options

    with user_errors(), allowing_code(allow_code):
        from .bake import BakeConfig
        from .bake import bake as run_bake

        quiet_libraries()
        config = BakeConfig(model=model, system=system, prompts=prompts, task=task, checks=parse_check_options(check or []),
                            output_dir=output_dir, tries=tries, epochs=epochs, lr=lr, probes=probes, sft_overrides=set_ or [])  # fmt: skip
        check_models([model])
        run_bake(config, console)


@app.command("eval")
def eval_command(
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Model, run directory or merged directory (repeatable; the first is 'before').")] = None,
    task: Annotated[Optional[Path], typer.Option("--task", "-t", help="Task set (.jsonl): prompts with checks, or conversations ending in the reference answer.")] = None,
    schema: Annotated[Optional[Path], typer.Option(help="JSON Schema every task answer must follow.")] = None,
    check: Annotated[Optional[list[str]], typer.Option("--check", help="A check for every task record: KEY=VALUE, e.g. 'regex=^Arr' or json=true (repeatable).")] = None,
    probes: Annotated[str, typer.Option(help="Retention probes: default (shipped), a .jsonl file, or none.")] = "default",
    drift: Annotated[str, typer.Option(help="General prompts for drift: default, a .jsonl/.txt file, or none.")] = "default",
    pairs: Annotated[Optional[Path], typer.Option(help="Held-out preference pairs: preference accuracy.")] = None,
    text: Annotated[Optional[Path], typer.Option(help="Held-out raw text (.txt): perplexity.")] = None,
    system: SystemOpt = None,
    max_new_tokens: MaxNewOpt = 160,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    out: Annotated[Optional[list[Path]], typer.Option("--out", "-o", help="Write the results: .html, .md or .json (repeatable).")] = None,
    allow_code: CodeOpt = False,
) -> None:
    """Evaluate models before vs after fine-tuning: task score, stop rate, retention and drift."""
    from .checks import allowing_code, parse_check_options

    with user_errors(), allowing_code(allow_code):
        from .eval_report import print_metrics, write_eval_report
        from .evaluation import EvalConfig, Evaluation, evaluate

        config = EvalConfig(models=model or ["default"], task=str(task) if task else None, schema=str(schema) if schema else None,
                            checks=parse_check_options(check or []), probes=probes, drift=drift, system=system,
                            pairs=str(pairs) if pairs else None, text=str(text) if text else None,
                            max_new_tokens=max_new_tokens, batch_size=batch_size, device=device, dtype=dtype)  # fmt: skip
        for path in out or []:
            if path.suffix not in (".html", ".md", ".json"):
                raise LiandanError(f"--out {path}: expected a file ending in .html, .md or .json")
        evaluation = Evaluation(config)  # reads and checks every set before any model loads
        check_models(config.models)
        result = _run_with_progress(lambda load, progress: evaluate(config, progress=progress, load=load, evaluation=evaluation),
                                    evaluation.units(len(config.models)), device=device, dtype=dtype)  # fmt: skip
        print_metrics(result, console)
        for path in out or []:
            console.print(f"Wrote {write_eval_report(result, path)}")


@app.command()
def sft(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML recipe (see examples/).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Base model (default: the built-in one).")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", "-d", help="Training data file (repeatable).")] = None,
    output_dir: Annotated[Optional[str], typer.Option("--output-dir", "-o", help="Run directory.")] = None,
    full: Annotated[Optional[bool], typer.Option("--full/--lora", help="Full fine-tuning instead of LoRA.")] = None,
    replay: Annotated[Optional[str], typer.Option(help="Against forgetting: 'self' (the base model's own answers to general prompts) or a data file.")] = None,
    replay_ratio: Annotated[Optional[float], typer.Option("--replay-ratio", help="Replay examples per task example, at most 1 (default 0.5).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output-dir from its last checkpoint.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a setting: key=value (dotted for nested, e.g. lora.rank=8).")] = None,
) -> None:
    """Supervised fine-tuning: only the assistant's replies and their stop tokens are trained."""
    with user_errors():
        from .config import SFTConfig
        from .train import train_sft

        _train(SFTConfig, train_sft, config, set_, resume, model=model, data=data, output_dir=output_dir, full=full,
               replay=replay, replay_ratio=replay_ratio)  # fmt: skip


@app.command()
def dpo(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML recipe.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model to align: default, any model, or an SFT run directory.")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", "-d", help="Preference pairs: prompt, chosen, rejected (repeatable).")] = None,
    eval_data: Annotated[Optional[list[str]], typer.Option("--eval-data", help="Held-out pairs: preference accuracy during training.")] = None,
    output_dir: Annotated[Optional[str], typer.Option("--output-dir", "-o", help="Run directory.")] = None,
    full: Annotated[Optional[bool], typer.Option("--full/--lora", help="Full fine-tuning instead of LoRA.")] = None,
    beta: Annotated[Optional[float], typer.Option(help="How far the model may move from the reference (default 0.1).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output-dir from its last checkpoint.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a setting: key=value.")] = None,
) -> None:
    """Preference alignment (DPO): make the chosen reply more likely than the rejected one."""
    with user_errors():
        from .config import DPOConfig
        from .train import train_dpo

        result = _train(DPOConfig, train_dpo, config, set_, resume, model=model, data=data, eval_data=eval_data,
                        output_dir=output_dir, full=full, beta=beta)  # fmt: skip
        if result.eval_losses:
            console.print(f"held-out DPO loss {result.eval_losses[-1]:.4f}")


@app.command()
def pretrain(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML recipe.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model to continue pre-training.")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", "-d", help="Raw text: .txt files, or files of text records (repeatable).")] = None,
    eval_data: Annotated[Optional[list[str]], typer.Option("--eval-data", help="Held-out text: perplexity during training.")] = None,
    output_dir: Annotated[Optional[str], typer.Option("--output-dir", "-o", help="Run directory.")] = None,
    full: Annotated[Optional[bool], typer.Option("--full/--lora", help="Full fine-tuning instead of LoRA.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output-dir from its last checkpoint.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a setting: key=value (max_length is the block size).")] = None,
) -> None:
    """Continued pre-training: next-token prediction on your own raw text."""
    with user_errors():
        import math

        from .config import PretrainConfig
        from .train import train_pretrain

        result = _train(PretrainConfig, train_pretrain, config, set_, resume, model=model, data=data, eval_data=eval_data,
                        output_dir=output_dir, full=full)  # fmt: skip
        if result.eval_losses:
            console.print(f"held-out perplexity {math.exp(result.eval_losses[0]):.2f} at the first evaluation, "
                          f"{math.exp(result.eval_losses[-1]):.2f} at the end "
                          "(before training: liandan eval --model BASE --model RUN --text FILE)")  # fmt: skip


def _train(cls, train_fn, config: Optional[Path], set_, resume: bool, **values):
    """Shared by the training commands: the config from YAML, flags and --set; then the loop."""
    from .config import load_config, resume_config

    output_dir = values.get("output_dir")
    if resume and config is None:  # resume with the settings the run started with
        config = resume_config(output_dir, set_)
    quiet_libraries()
    cfg = load_config(cls, config, set_, **values)
    check_models([cfg.model])
    result = train_fn(cfg, resume=resume)
    last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    console.print(f"Finished {result.steps} steps (last loss {last}); run directory: {result.output_dir}")
    return result


@app.command("merge")
def merge_command(
    run_dir: Annotated[Path, typer.Argument(help="A LoRA run directory.")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the merged model.")],
) -> None:
    """Merge a LoRA run into its base model: a standalone model plain transformers loads."""
    with user_errors():
        from .merge import merge

        quiet_libraries()
        console.print(f"Merged model written to {merge(run_dir, out_dir)}")


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
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Serve a model behind an OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions)."""
    with user_errors():
        from . import serve as serving

        quiet_libraries()
        serving.serve(model, host=host, port=port, api_key=api_key, dtype=dtype, device=device, model_name=model_name, docs=docs,
                      max_prompt_tokens=max_prompt_tokens, limits=serving.parse_limits(limit), extra_hosts=allow_host, origins=allow_origin)  # fmt: skip


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
) -> None:
    """Check data before spending compute: encoded examples with the trained tokens highlighted."""
    with user_errors():
        from rich.text import Text

        from .data_inspection import inspect_data as run_inspection

        quiet_libraries()
        check_models([model])
        report = run_inspection(data, model=model, format=format, max_length=max_length, show=show, skip_invalid=skip_invalid)
        for example in report.shown:
            text = Text(f"── {example.source} ──\n", style="bold")
            for piece, trained in example.pieces:
                text.append(piece, style="black on green" if trained else "dim")
            console.print(text)
        console.print(report.summary(), highlight=False)
        console.print(report.verdict(), style="green" if report.stops_kept else "bold red")


def _run_with_progress(job, total: int, **load_options):
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


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
