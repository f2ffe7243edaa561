"""The training loop: one explicit loop on accelerate, read top to bottom.

    from liandan.config import SFTConfig
    from liandan.train import train_sft
    result = train_sft(SFTConfig(model="default", data=["examples/persona.jsonl"], max_steps=30))

What a step does:
1. take the next ``grad_accum`` micro-batches of this process (packed rows by default);
2. count the trained tokens N of the whole step, summed over processes;
3. for each micro-batch: loss = (sum of token losses) / N * processes, backward
   (gradients are synchronised only on the last micro-batch);
4. clip, optimizer step, scheduler step; log; maybe evaluate and checkpoint.

Dividing by the step's token count (not averaging micro-batch means) makes accumulation and
multi-process runs give the same gradient as one big batch.

A step whose loss or gradient norm is not finite changes no weight (it is counted in the metrics
as ``skipped_steps``); ``max_bad_steps`` of them in a row stop the run with an error, and no
checkpoint or final model is ever written with a non-finite weight. Under fp16, a step whose
gradients overflowed the loss scale is skipped by accelerate's scaler while it calibrates: that is
counted as ``scaler_skipped``, not as divergence (`optimizer_step`).

Checkpoints (every ``save_every`` steps, the newest ``save_total_limit`` kept; `liandan.checkpoints`)
unpickle nothing on resume, survive a crash at any moment, and refuse changed data or settings
unless ``resume_changed`` is set. The run directory holds an ``INCOMPLETE`` marker until the
final model is in place, so a run that died while saving is never mistaken for a model.

SIGTERM or Ctrl-C stops a run gracefully (`liandan.run_control`): the step in progress finishes,
a checkpoint is written and `TrainingStopped` says how to resume. ``progress.json`` in the run
directory tells a watcher (`liandan.jobs`) the step, the ETA and how the run ended.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, is_tensorboard_available, is_wandb_available, set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .batching import plan_batches
from .checkpoints import (
    INCOMPLETE,
    checkpoints_supported,
    final_weights,
    fingerprint,
    fsync,
    latest_checkpoint,
    load_checkpoint,
    refuse_non_finite,
    save_checkpoint,
    trained_weights,
    truncate_metrics,
)
from .config import DPOConfig, GRPOConfig, PretrainConfig, SFTConfig, TrainConfig, save_config
from .engines import optimizer_step, resolve_precision, warn_engine_not_applied, warn_precision_overruled, zero3
from .errors import LiandanError, say
from .generation import SamplingConfig, generate
from .prepare import PreparedRun, prepare_dpo, prepare_grpo, prepare_pretrain, prepare_sft
from .run_control import ProgressFile, StopRequest, TrainingStopped
from .training_setup import speed_up_training


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    """Wall time of the steps run here (the loop only: no loading, encoding or saving)."""
    tokens: int = 0
    """Tokens through the model in those steps, over all processes (padding excluded)."""


class StepStream:
    """The global sequence of micro-batches over epochs, each epoch shuffled with its own seed.

    Step s of a run uses global micro-batches [s * per_step, (s + 1) * per_step), where
    per_step = grad_accum * processes; process r takes every processes-th of them. So one process
    with accumulation 2 sees exactly the batches two processes with accumulation 1 see together.
    """

    def __init__(self, lengths: list[int], config: TrainConfig, processes: int, rank: int, packing: bool):
        self.lengths, self.config = lengths, config
        self.processes, self.rank = processes, rank
        self.packing = packing
        self.per_epoch = len(plan_batches(lengths, config.batch_tokens, self.packing, config.seed, config.batch_size))
        self._plans: dict[int, list[list[int]]] = {}

    def plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            self._plans = {epoch: plan_batches(self.lengths, self.config.batch_tokens, self.packing, self.config.seed + epoch, self.config.batch_size)}
        return self._plans[epoch]

    def step(self, step: int) -> list[list[int]]:
        per_step = self.config.grad_accum * self.processes
        mine = []
        for g in range(step * per_step, (step + 1) * per_step):
            if g % self.processes == self.rank:
                mine.append(self.plan(g // self.per_epoch)[g % self.per_epoch])
        return mine


def total_steps(config: TrainConfig, per_epoch: int, processes: int, iterations: int = 1) -> int:
    """Optimizer steps of the run; an online objective takes ``iterations`` steps per batch of data."""
    if config.max_steps > 0:
        return config.max_steps
    return max(1, math.ceil(config.epochs * per_epoch / (config.grad_accum * processes))) * iterations


def lr_lambda(total: int, warmup_ratio: float):
    warmup = int(total * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train_sft(config: SFTConfig, *, resume: bool = False, stop_after: int | None = None) -> TrainResult:
    """Supervised fine-tuning of ``config.model`` on ``config.data``; see the module docstring.

    ``stop_after`` ends the run after that many steps as if it were interrupted (used to test
    resume); the learning-rate schedule still follows the full run.
    """
    return train(config, prepare_sft, resume=resume, stop_after=stop_after)


def train_dpo(config: DPOConfig, *, resume: bool = False, stop_after: int | None = None) -> TrainResult:
    """Preference alignment (DPO) of ``config.model`` on the pairs in ``config.data``."""
    return train(config, prepare_dpo, resume=resume, stop_after=stop_after)


def train_pretrain(config: PretrainConfig, *, resume: bool = False, stop_after: int | None = None) -> TrainResult:
    """Continued pre-training of ``config.model`` on the raw text in ``config.data``."""
    return train(config, prepare_pretrain, resume=resume, stop_after=stop_after)


def train_grpo(config: GRPOConfig, *, resume: bool = False, stop_after: int | None = None) -> TrainResult:
    """Reinforcement learning from verifiable rewards (GRPO) of ``config.model`` on the prompts in
    ``config.data`` (`liandan.grpo`)."""
    return train(config, prepare_grpo, resume=resume, stop_after=stop_after)


def train(config: TrainConfig, prepare, *, resume: bool = False, stop_after: int | None = None) -> TrainResult:
    """The loop, for any stage: ``prepare(config, out_dir, ...)`` returns a `PreparedRun` whose
    objective turns micro-batches into a loss (SFT, DPO, pre-training). Raises `TrainingStopped`
    when SIGTERM or SIGINT stopped the run (with a checkpoint to resume from)."""
    stop, progress_file = StopRequest(), ProgressFile(config)
    try:
        return _loop(config, prepare, resume, stop_after, stop, progress_file)
    except TrainingStopped:
        raise
    except BaseException:
        progress_file.write(status="failed")
        raise
    finally:
        stop.restore()
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # accelerate keeps its settings in a process-wide singleton; forget them, so a later
            # run in the same Python process (quickstart, bake, a notebook) may use other ones.
            AcceleratorState._reset_state(reset_partial_state=True)


def _loop(config: TrainConfig, prepare, resume: bool, stop_after: int | None, stop: StopRequest,
          progress_file: ProgressFile) -> TrainResult:  # fmt: skip
    out_dir = Path(config.output_dir)
    check_trackers(config.report_to)
    # Several processes without CUDA (accelerate launch on CPUs): accelerate only sets up gloo
    # when told the run is on CPU.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=multi_cpu,
        mixed_precision=resolve_precision(config.mixed_precision),
        log_with=config.report_to or None,
        project_dir=str(out_dir),
    )
    warn_engine_not_applied(accelerator)
    warn_precision_overruled(config.mixed_precision, accelerator)
    set_seed(config.seed)
    # Under ZeRO-3 transformers builds the model sharded (deepspeed.zero.Init), which every process
    # must do together: the main process cannot load it first while the others wait.
    with nullcontext() if zero3(accelerator) else accelerator.main_process_first():
        run = prepare(config, out_dir, main_process=accelerator.is_main_process, resume=resume, device=accelerator.device)
    model, tokenizer, objective = run.model, run.tokenizer, run.objective
    restore_model = speed_up_training(model, config, accelerator, objective.packing)
    stream = StepStream([item_length(e) for e in run.train], config, accelerator.num_processes, accelerator.process_index,
                        packing=objective.packing)  # fmt: skip
    steps = total_steps(config, stream.per_epoch, accelerator.num_processes, objective.iterations)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, config.warmup_ratio))
    # The scheduler stays outside prepare(): accelerate would step it once per process, but our
    # steps already count every process's batches. It is saved in checkpoints all the same.
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed wants a micro-batch size; liandan hands accelerate no DataLoader to read it from
        # (its micro-batches are token budgets). It only feeds DeepSpeed's own sample counting.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds_config["train_micro_batch_size_per_gpu"] = 1
    model, optimizer = accelerator.prepare(model, optimizer)
    if config.report_to:
        accelerator.init_trackers("liandan", config={"lr": config.lr, "steps": steps})
    saving = bool(config.save_every or config.save_every_minutes)
    if saving and not checkpoints_supported(accelerator):
        say("checkpoints are not written under DeepSpeed (its engine saves its optimizer only as pickles, which "
            "liandan never loads): save_every ignored, a crash loses the run")  # fmt: skip
        saving = False
    last_save = time.monotonic()

    state = {"step": 0, "skipped_steps": 0, "fingerprint": fingerprint(config, run.manifest, run.train)}
    metrics_path = out_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        (out_dir / INCOMPLETE).write_text("training has not finished: this directory is not a model yet\n")
    if resume:
        state = load_checkpoint(accelerator, out_dir, model, optimizer, scheduler, state["fingerprint"], config.resume_changed)
        if accelerator.is_main_process:
            truncate_metrics(metrics_path, state["step"])
    start, bad_in_a_row = state["step"], 0
    result = TrainResult(output_dir=out_dir, steps=steps)
    last = min(steps, stop_after) if stop_after else steps
    progress_file.start(start, steps, state.get("seconds", 0.0), accelerator.is_main_process)
    if checkpoints_supported(accelerator):  # a stop must leave a checkpoint to resume from
        stop.install()
    stopped = False
    progress = make_progress(accelerator.is_main_process)
    with progress:
        task = progress.add_task(objective.name, total=steps, completed=start, loss=float("nan"), tps=0.0)
        model.train()
        for step in range(start, last):
            started = time.perf_counter()
            # The step's items per micro-batch; an online objective (GRPO) samples its batches from them.
            picked = [[run.train[i] for i in idx] for idx in stream.step(step // objective.iterations)]
            if objective.rollout:
                batches, rolled = objective.rollout(model, picked, step, accelerator)
            else:
                batches, rolled = [objective.collate(items) for items in picked], {}
            # The step's normaliser N (trained tokens, or pairs) over all its micro-batches and processes.
            local = sum(objective.count(b) for b in batches)
            window = max(int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum")), 1)
            step_loss = torch.zeros((), device=accelerator.device)
            sums: dict[str, torch.Tensor] = {}
            for i, batch in enumerate(batches):
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                sync = i == len(batches) - 1
                # DeepSpeed steps its optimizer inside backward unless told more micro-batches follow
                accelerator.sync_gradients = sync
                with nullcontext() if sync else accelerator.no_sync(model):
                    with accelerator.autocast():
                        loss_sum, stats = objective.loss(model, batch)
                        loss = loss_sum / window * accelerator.num_processes
                    accelerator.backward(loss)  # inside no_sync: FSDP2 decides in backward whether to reduce
                step_loss += loss_sum.detach()
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0) + value.detach()
            mean_loss = float(accelerator.reduce(step_loss, "sum")) / window
            # Clipping at infinity only measures the norm. A diverged step (NaN/inf loss or norm)
            # changes no weight; the schedule still moves on, so step s keeps step s's rate.
            norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm or math.inf)
            norm = float(norm) if norm is not None else 0.0  # DeepSpeed clips inside its own step
            diverged, overflowed = optimizer_step(optimizer, accelerator.scaler, mean_loss, norm)
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()" after a skip
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bad_in_a_row = bad_in_a_row + 1 if diverged else 0
            state["skipped_steps"] += diverged
            if accelerator.scaler is not None:
                state["scaler_skipped"] = state.get("scaler_skipped", 0) + overflowed

            result.losses.append(mean_loss)
            seconds = time.perf_counter() - started
            tokens = int(accelerator.reduce(torch.tensor(sum(real_tokens(b) for b in batches), device=accelerator.device), "sum"))
            result.seconds += seconds
            result.tokens += tokens
            totals = {k: float(accelerator.reduce(v, "sum")) for k, v in sums.items()}
            record = {"step": step + 1, "loss": mean_loss, "lr": scheduler.get_last_lr()[0], run.unit: window,
                      **step_means(totals, window, objective.averaged_over),
                      **{k: float(accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean")) for k, v in rolled.items()},
                      "grad_norm": norm, "skipped_steps": state["skipped_steps"], "tokens_per_second": tokens / seconds}  # fmt: skip
            if accelerator.scaler is not None:  # fp16: the steps the loss scaler skipped so far, and its scale now
                record.update(scaler_skipped=state["scaler_skipped"], loss_scale=accelerator.scaler.get_scale())
            if run.eval and (config.eval_every and (step + 1) % config.eval_every == 0 or step + 1 == steps):
                record.update(evaluate(model, run.eval, objective, config, accelerator))
                result.eval_losses.append(record["eval_loss"])
            if accelerator.is_main_process and ((step + 1) % config.log_every == 0 or "eval_loss" in record):
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
                progress_file.write(step + 1)
            if config.report_to:
                accelerator.log(record, step=step + 1)
            progress.update(task, advance=1, loss=mean_loss, tps=record["tokens_per_second"])
            if bad_in_a_row >= config.max_bad_steps:
                accelerator.end_training()
                kept = latest_checkpoint(out_dir, quiet=True)
                raise LiandanError(
                    f"training diverged: {bad_in_a_row} steps in a row (up to step {step + 1}) had a non-finite loss or "
                    "gradient norm, and were skipped. "
                    + (f"The last good checkpoint is '{kept}'. " if kept else "")
                    + "Try a lower lr, or max_grad_norm above 0 (max_bad_steps sets how many are tolerated)."
                )
            # A checkpoint falls between rollouts, so a resumed run samples its next round afresh.
            between = (step + 1) % objective.iterations == 0
            if saving and step + 1 < steps and between and checkpoint_due(config, step + 1, last_save, accelerator):
                state["step"], state["seconds"] = step + 1, progress_file.seconds()
                save_checkpoint(accelerator, out_dir, model, optimizer, scheduler, state, config.save_total_limit)
                last_save = time.monotonic()
            if between and step + 1 < steps and stop.agreed(accelerator):
                last, stopped = step + 1, True
                break
    if last < steps:  # interrupted on purpose: leave a resumable checkpoint and nothing final
        if state["step"] != last:  # not saved just now by save_every
            state["step"], state["seconds"] = last, progress_file.seconds()
            progress_file.write(last, "stopping")
            save_checkpoint(accelerator, out_dir, model, optimizer, scheduler, state, config.save_total_limit)
        accelerator.end_training()
        progress_file.write(last, "stopped")
        if stopped:
            raise TrainingStopped(progress_file.stage, out_dir, last, steps)
        return result
    save_final(accelerator, model, tokenizer, config, out_dir, run, restore_model)
    accelerator.end_training()
    progress_file.write(steps, "finished")
    return result


def checkpoint_due(config: TrainConfig, done: int, last_save: float, accelerator) -> bool:
    """Whether to checkpoint after ``done`` steps: every ``save_every`` steps, or once
    ``save_every_minutes`` have passed since the last one (the main process's clock decides, so
    every process saves at the same step)."""
    if config.save_every and done % config.save_every == 0:
        return True
    if not config.save_every_minutes:
        return False
    late = time.monotonic() - last_save >= config.save_every_minutes * 60
    if accelerator.num_processes > 1:
        flag = torch.tensor(float(late and accelerator.is_main_process), device=accelerator.device)
        late = float(accelerator.reduce(flag, "sum")) > 0
    return late


def check_trackers(names: list[str]) -> None:
    """Fail before any work if a requested tracker is not installed (accelerate would only warn)."""
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    for name in names:
        if name not in available:
            raise LiandanError(f"report_to: unknown tracker {name!r}; expected {' or '.join(available)}")
        if not available[name]():
            package = "tensorboard" if name == "tensorboard" else "wandb"
            raise LiandanError(f"report_to: {name} is not installed; pip install {package}")


@torch.no_grad()
def evaluate(model, examples: list[dict], objective, config: TrainConfig, accelerator) -> dict[str, float]:
    """The objective's loss and statistics on the held-out split: ``eval_loss``, ``eval_<stat>``."""
    model.eval()
    total, units, sums = 0.0, 0, {}
    for idx in plan_batches([item_length(e) for e in examples], config.batch_tokens, objective.packing, 0, config.batch_size):
        batch = {k: v.to(accelerator.device) for k, v in objective.collate([examples[i] for i in idx]).items()}
        with accelerator.autocast():
            loss_sum, stats = objective.loss(model, batch)
        total += float(loss_sum)
        units += objective.count(batch)
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    model.train()
    means = step_means(sums, max(units, 1), objective.averaged_over)
    return {"eval_loss": total / max(units, 1), **{f"eval_{k}": v for k, v in means.items()}}


def step_means(totals: dict[str, float], units: int, averaged_over: dict[str, str]) -> dict[str, float]:
    """Each statistic's sum over the step divided by the step's units, or, for a mean over a
    subset, by the sum of the statistic that counts the subset (NaN when the step has none)."""
    means = {}
    for key, value in totals.items():
        denominator = totals.get(averaged_over[key], 0.0) if key in averaged_over else units
        means[key] = value / denominator if denominator else float("nan")
    return means


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of a micro-batch that are not padding."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def item_length(item: dict) -> int:
    """What an item costs in a micro-batch: its tokens (a DPO pair says so itself)."""
    return item.get("length") or len(item["input_ids"])


def make_progress(enabled: bool):
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
        TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Saving


def json_safe(record: dict) -> dict:
    """Non-finite numbers become null: metrics.jsonl stays valid JSON when a step diverges."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def save_final(accelerator, model, tokenizer, config: TrainConfig, out_dir: Path, run: PreparedRun,
               restore_model: Callable[[], None]) -> None:  # fmt: skip
    """The adapter (LoRA) or the full model, in safetensors, with the tokenizer and its template.
    ``restore_model`` undoes `speed_up_training` first: the model as loaded, to save and generate.
    Written to a staging directory, fsynced and moved in; the run directory's ``INCOMPLETE``
    marker goes last, so a crash while saving never leaves something that passes for a model."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    # Sharded (FSDP, DeepSpeed ZeRO-3): every process takes part in gathering the weights whole.
    gathered = final_weights(accelerator, model, config.full)
    if not accelerator.is_main_process:
        return
    refuse_non_finite(gathered if gathered is not None else trained_weights(unwrapped), "final model")
    restore_model()
    staging = out_dir / ".final-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        unwrapped.save_pretrained(staging, safe_serialization=True, state_dict=gathered)
        tokenizer.save_pretrained(staging)
        run.write_manifest(staging)
        save_config(config, staging / "config.yaml")
        if config.sample_prompts and gathered is not None:
            # A sharded model computes only with every process taking part: no generation on one.
            say("sample_prompts: no samples under FSDP or DeepSpeed (the model is split across the processes); "
                f"look at the run with: liandan compare --model {out_dir} ...")  # fmt: skip
        elif config.sample_prompts:
            write_samples(unwrapped, tokenizer, config.sample_prompts, staging / "samples.jsonl")
        moved = sorted(staging.iterdir())
        for path in moved:
            fsync(path)
    except OSError as exc:  # e.g. a full disk: the run directory keeps its checkpoints and its INCOMPLETE marker
        shutil.rmtree(staging, ignore_errors=True)
        raise LiandanError(f"could not write the final model to '{out_dir}': {exc.strerror or exc}; the run's "
                           f"checkpoints are kept: free some disk space and continue with --resume -o {out_dir}") from exc  # fmt: skip
    for path in moved:
        os.replace(path, out_dir / path.name)
    staging.rmdir()
    fsync(out_dir)
    (out_dir / INCOMPLETE).unlink(missing_ok=True)
    fsync(out_dir)


def write_samples(model, tokenizer, prompts: list[str], path: Path) -> None:
    """A few greedy generations from the trained model, so the run shows what it learned."""
    model.eval()
    outputs = generate(model, tokenizer, prompts, mode="chat", config=SamplingConfig(max_new_tokens=128), model_name="run")
    path.write_text("".join(json.dumps({"prompt": prompts[g.prompt_index], "text": g.text, "stopped": g.stopped},
                                       ensure_ascii=False) + "\n" for g in outputs), encoding="utf-8")  # fmt: skip
