"""The commands that look at models and measure them: compare, generate, quickstart, bake, eval."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli_shared import (
    BatchOpt,
    CodeOpt,
    DeviceOpt,
    DriftOpt,
    DtypeOpt,
    MaxNewOpt,
    OutOpt,
    PairsOpt,
    PickleOpt,
    ProbesOpt,
    PromptOpt,
    PromptsOpt,
    RemoteOpt,
    RepOpt,
    SamplesOpt,
    SchemaOpt,
    SeedOpt,
    SystemOpt,
    TempOpt,
    TextOpt,
    TopKOpt,
    TopPOpt,
    app,
    check_models,
    console,
    quiet_libraries,
    run_with_progress,
    user_errors,
)
from .errors import LiandanError


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
        result = run_with_progress(
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
    few_shot: Annotated[int, typer.Option("--few-shot", help="Prompt-only baseline: the model with K training examples before each task prompt; 0 for none.")] = 4,
    few_shot_system: Annotated[Optional[str], typer.Option("--few-shot-system", help="The prompt-only baseline's system prompt.")] = None,
) -> None:
    """The main job: compare chat vs raw, evaluate, fine-tune with replay, evaluate again, report."""
    with user_errors():
        from .quickstart import QuickstartConfig
        from .quickstart import quickstart as run_quickstart

        quiet_libraries()
        task = {k: v for k, v in {"train": train, "test": test, "schema": schema}.items() if v is not None}  # else shipped
        config = QuickstartConfig(model=model, **task, out=out, overwrite=overwrite, replay=replay, replay_ratio=replay_ratio,
                                  epochs=epochs, lr=lr, sft_overrides=set_ or [], few_shot=few_shot, few_shot_system=few_shot_system)  # fmt: skip
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
    schema: SchemaOpt = None,
    check: Annotated[Optional[list[str]], typer.Option("--check", help="A check for every task record: KEY=VALUE, e.g. 'regex=^Arr' or json=true (repeatable).")] = None,
    probes: ProbesOpt = "default",
    drift: DriftOpt = "default",
    pairs: PairsOpt = None,
    text: TextOpt = None,
    system: SystemOpt = None,
    max_new_tokens: MaxNewOpt = 160,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    out: Annotated[Optional[list[Path]], typer.Option("--out", "-o", help="Write the results: .html, .md or .json (repeatable).")] = None,
    allow_code: CodeOpt = False,
    lm_eval: Annotated[Optional[list[str]], typer.Option("--lm-eval", help="lm-evaluation-harness task(s) on every model, e.g. arc_easy or a local task (repeatable or comma-separated; pip install 'liandan[lmeval]').")] = None,
    lm_eval_limit: Annotated[Optional[int], typer.Option("--lm-eval-limit", help="Score only the first N items of each lm-eval task.")] = None,
    lm_eval_include: Annotated[Optional[Path], typer.Option("--lm-eval-include", help="A folder of local lm-eval task YAML files.")] = None,
    few_shot: Annotated[int, typer.Option("--few-shot", help="Add a prompt-only baseline: the first model with K training examples before each task prompt.")] = 0,
    few_shot_data: Annotated[Optional[Path], typer.Option("--few-shot-data", help="Training data the --few-shot examples are drawn from (as sft reads it).")] = None,
    few_shot_system: Annotated[Optional[str], typer.Option("--few-shot-system", help="The few-shot column's system prompt [default: --system].")] = None,
    few_shot_seed: Annotated[int, typer.Option("--few-shot-seed", help="Seed that draws the --few-shot examples.")] = 0,
    tools_template: Annotated[Optional[str], typer.Option("--tools-template", help="For a task set with tools: chatml (liandan's ChatML tools template) or a .jinja file, for every model whose own template renders no tools.")] = None,
) -> None:
    """Evaluate models before vs after fine-tuning: task score, stop rate, retention, drift, and lm-eval tasks."""
    from .checks import allowing_code, parse_check_options

    with user_errors(), allowing_code(allow_code):
        from .eval_report import print_metrics, write_eval_report
        from .evaluation import EvalConfig, Evaluation, evaluate

        config = EvalConfig(models=model or ["default"], task=str(task) if task else None, schema=str(schema) if schema else None,
                            checks=parse_check_options(check or []), probes=probes, drift=drift, system=system,
                            pairs=str(pairs) if pairs else None, text=str(text) if text else None,
                            max_new_tokens=max_new_tokens, batch_size=batch_size, device=device, dtype=dtype,
                            lm_eval=[t.strip() for v in lm_eval or [] for t in v.split(",") if t.strip()], lm_eval_limit=lm_eval_limit,
                            lm_eval_include=str(lm_eval_include) if lm_eval_include else None, few_shot=few_shot,
                            few_shot_data=str(few_shot_data) if few_shot_data else None, few_shot_system=few_shot_system,
                            few_shot_seed=few_shot_seed, tools_template=tools_template)  # fmt: skip
        for path in out or []:
            if path.suffix not in (".html", ".md", ".json"):
                raise LiandanError(f"--out {path}: expected a file ending in .html, .md or .json")
        evaluation = Evaluation(config)  # reads and checks every set before any model loads
        check_models(config.models)
        result = run_with_progress(lambda load, progress: evaluate(config, progress=progress, load=load, evaluation=evaluation),
                                    evaluation.units(len(config.models), prompted=int(bool(few_shot))), device=device, dtype=dtype)  # fmt: skip
        print_metrics(result, console)
        for path in out or []:
            console.print(f"Wrote {write_eval_report(result, path)}")
