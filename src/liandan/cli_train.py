"""The training commands: sft, dpo, pretrain, grpo (one explicit loop, `liandan.train`), experiment (any of
them over seeds and a grid of settings, `liandan.experiment`), and merge."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli_shared import (
    BatchOpt,
    CodeOpt,
    DriftOpt,
    MaxNewOpt,
    PairsOpt,
    ProbesOpt,
    SchemaOpt,
    TextOpt,
    app,
    check_models,
    console,
    quiet_libraries,
    user_errors,
)


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
    """Preference alignment: DPO (or --set loss=ipo|orpo|simpo|kto) makes the chosen reply more likely than the rejected one."""
    with user_errors():
        from .config import DPOConfig
        from .train import train_dpo

        result = _train(DPOConfig, train_dpo, config, set_, resume, model=model, data=data, eval_data=eval_data,
                        output_dir=output_dir, full=full, beta=beta)  # fmt: skip
        if result.eval_losses:
            console.print(f"held-out loss {result.eval_losses[-1]:.4f} (the run's preference loss on --eval-data)")


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


@app.command()
def grpo(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML recipe.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model to train: default, any model, or an SFT run directory.")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", "-d", help="Prompts (.jsonl: prompt or messages, with checks, reference or any fields; repeatable).")] = None,
    reward: Annotated[Optional[list[str]], typer.Option("--reward", "-r", help="A reward (repeatable): checks, KEY=VALUE (a check), schema=FILE, stop, max_tokens=N, python=module:function.")] = None,
    output_dir: Annotated[Optional[str], typer.Option("--output-dir", "-o", help="Run directory.")] = None,
    full: Annotated[Optional[bool], typer.Option("--full/--lora", help="Full fine-tuning instead of LoRA.")] = None,
    num_generations: Annotated[Optional[int], typer.Option("--num-generations", "-g", help="Completions sampled per prompt (default 4).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output-dir from its last checkpoint.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a setting: key=value (e.g. reward_weights=[1,0.2], beta=0.04, loss_type=grpo).")] = None,
    allow_code: CodeOpt = False,
) -> None:
    """Reinforcement learning from verifiable rewards (GRPO): sample, score, push toward the better answers."""
    from .checks import allowing_code

    with user_errors(), allowing_code(allow_code):
        from .config import GRPOConfig
        from .train import train_grpo

        _train(GRPOConfig, train_grpo, config, set_, resume, model=model, data=data, rewards=reward, output_dir=output_dir,
               full=full, num_generations=num_generations)  # fmt: skip


STOPPED_EXIT = 3
"""Exit status of a run stopped by SIGTERM or Ctrl-C: not a failure (its checkpoint resumes it),
not a finished model either, so `liandan sft ... && liandan eval ...` does not go on."""


def _train(cls, train_fn, config: Optional[Path], set_, resume: bool, **values):
    """Shared by the training commands: the config from YAML, flags and --set; then the loop."""
    from .config import load_config, resume_config
    from .train import TrainingStopped

    output_dir = values.get("output_dir")
    if resume and config is None:  # resume with the settings the run started with
        config = resume_config(output_dir, set_)
    quiet_libraries()
    cfg = load_config(cls, config, set_, **values)
    check_models([cfg.model])
    try:
        result = train_fn(cfg, resume=resume)
    except TrainingStopped as stopped:
        console.print(f"Run {stopped}", highlight=False, soft_wrap=True)
        raise typer.Exit(STOPPED_EXIT) from None
    last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    console.print(f"Finished {result.steps} steps (last loss {last}); run directory: {result.output_dir}")
    return result


@app.command()
def experiment(
    stage: Annotated[str, typer.Argument(help="The training command each run is: sft, dpo, pretrain or grpo.")],
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="The stage's YAML recipe.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Base model (default: the recipe's, or the built-in one).")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", "-d", help="Training data file (repeatable).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="A setting for every run: key=value, as the stage's --set.")] = None,
    seeds: Annotated[str, typer.Option(help="Runs per grid point: a count (3 = seeds 0, 1, 2) or a list of seeds (1,5,9).")] = "3",
    grid: Annotated[Optional[list[str]], typer.Option("--grid", help="A setting to vary: key=value1,value2 (repeatable: every combination is a grid point).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory: POINT/seed-N runs, experiment.json and experiment.html.")] = Path("experiment"),
    task: Annotated[Optional[Path], typer.Option("--task", "-t", help="Task set to evaluate every run on (as liandan eval --task).")] = None,
    schema: SchemaOpt = None,
    check: Annotated[Optional[list[str]], typer.Option("--check", help="A check for every task record: KEY=VALUE (repeatable).")] = None,
    probes: ProbesOpt = "default",
    drift: DriftOpt = "default",
    pairs: PairsOpt = None,
    text: TextOpt = None,
    max_new_tokens: MaxNewOpt = 160,
    batch_size: BatchOpt = 64,
    tools_template: Annotated[Optional[str], typer.Option("--tools-template", help="For a task set with tools: chatml or a .jinja file, for every model whose own template renders no tools (the base; runs keep the template they trained with).")] = None,
    allow_code: CodeOpt = False,
) -> None:
    """Repeat a training run over seeds and a grid of settings; evaluate each run; mean ± sd per metric."""
    from .checks import allowing_code, parse_check_options

    with user_errors(), allowing_code(allow_code):
        from .evaluation import EvalConfig
        from .experiment import ExperimentConfig, parse_seeds, plan_runs, print_experiment, run_experiment

        exp = ExperimentConfig(stage=stage, recipe=str(config) if config else None, values={"model": model, "data": data},
                               overrides=set_ or [], seeds=parse_seeds(seeds), grid=grid or [], out=str(out))  # fmt: skip
        evaluated = task or pairs or text or probes != "none" or drift != "none"
        eval_config = EvalConfig(task=str(task) if task else None, schema=str(schema) if schema else None,
                                 checks=parse_check_options(check or []), probes=probes, drift=drift,
                                 pairs=str(pairs) if pairs else None, text=str(text) if text else None,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 tools_template=tools_template) if evaluated else None  # fmt: skip
        quiet_libraries()
        check_models([plan_runs(exp)[0].config.model])
        result = run_experiment(exp, eval_config, console)
        print_experiment(result, console)
        console.print(f"Wrote {out / 'experiment.json'} and {out / 'experiment.html'}")


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
