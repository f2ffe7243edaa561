"""Checkpoints of a training run, and the refusals that keep a failed run from passing as a model.

    from liandan.checkpoints import latest_checkpoint, check_run_complete
    latest_checkpoint(Path("runs/sft"))    # the newest complete checkpoint, torn ones skipped
    check_run_complete("runs/sft")         # raises while the run's final save has not finished

A checkpoint is a directory ``checkpoints/step-NNNNNN`` holding the trained weights and each
process's RNG states (torch, Python, NumPy; safetensors), the optimizer's state (tensors only,
read back with ``torch.load(weights_only=True)``) and ``trainer_state.json`` (step, skipped
steps, scheduler, settings and data hash, the size of every file). Nothing in it is unpickled.
Under FSDP the weights and the optimizer state are gathered whole onto the main process
(``torch.distributed.checkpoint``'s full state dicts) and scattered back on resume, so a
checkpoint has the same files however many processes wrote it. DeepSpeed keeps its optimizer
inside its engine, whose own checkpoints are pickles: no checkpoints are written under it.

It is written to a temporary directory, fsynced, given its ``COMPLETE`` marker and renamed, so
a crash at any moment leaves the previous complete checkpoint; resume refuses other data or
settings than the checkpoint's unless ``resume_changed`` is set.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle  # only for its error: nothing is unpickled
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .config import TrainConfig, to_dict
from .engines import zero3
from .errors import LiandanError, say
from .files import write_atomic

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
COMPLETE = "COMPLETE"
"""Written last into a checkpoint: without it the checkpoint is torn and skipped."""
INCOMPLETE = "INCOMPLETE"
"""In a run directory from the start of training until its final model is completely saved."""
PROGRESS = "progress.json"
"""In a run directory once training begins: its step, ETA, status and process (`liandan.run_control.ProgressFile`)."""
RESUMABLE_CHANGES = {"output_dir", "save_every", "save_every_minutes", "save_total_limit", "log_every", "eval_every",
                     "report_to", "sample_prompts", "max_bad_steps", "resume_changed"}  # fmt: skip
"""Settings a resumed run may change: they do not change what the steps compute."""


def save_checkpoint(accelerator, out_dir: Path, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    """The trained weights and each process's RNG states (safetensors), the optimizer (tensors
    only) and ``state`` with the scheduler (JSON), written to a temporary directory, fsynced,
    marked complete and renamed: a run killed at any moment keeps its last complete checkpoint.
    Then only the newest ``keep`` checkpoints are kept (0 = all). Every process must call it."""
    step = state["step"]
    final = out_dir / CHECKPOINTS / f"step-{step:06d}"
    tmp = out_dir / CHECKPOINTS / f".tmp-step-{step:06d}"
    weights, optimizer_state = gather_trained(accelerator, model, optimizer)
    refuse_non_finite(weights, f"checkpoint at step {step}")
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        save_file(rng_state(), tmp / f"rng-{accelerator.process_index}.safetensors")
        if accelerator.is_main_process:
            save_file(weights, tmp / "weights.safetensors")
            torch.save(optimizer_state, tmp / "optimizer.pt")  # read back with weights_only=True
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = sorted(p for p in tmp.iterdir())
            scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
            record = {**state, "scheduler": scheduler_state, "layout": layout(accelerator),
                      "files": {p.name: p.stat().st_size for p in files}}  # fmt: skip
            (tmp / STATE_FILE).write_text(json.dumps(record, indent=1) + "\n")
            for path in [*files, tmp / STATE_FILE]:
                fsync(path)
            (tmp / COMPLETE).write_text(f"step {step}\n")
            fsync(tmp / COMPLETE)
            fsync(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync(final.parent)
            rotate_checkpoints(out_dir, keep)
    except OSError as exc:  # a full disk, a lost mount: one clear line, the last complete checkpoint kept
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_checkpoint(out_dir, quiet=True)
        raise LiandanError(
            f"could not write the checkpoint at step {step} in '{out_dir / CHECKPOINTS}': {exc.strerror or exc}; "
            + (f"the last complete checkpoint '{kept}' is kept; " if kept else "")
            + ("free some disk space" if exc.errno == errno.ENOSPC else "fix the cause")
            + " and continue with --resume"
        ) from None
    accelerator.wait_for_everyone()
    return final


def trained_weights(model) -> dict[str, torch.Tensor]:
    """Every trainable parameter by name (tied ones once), copied to the CPU."""
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in model.named_parameters() if p.requires_grad}


def checkpoints_supported(accelerator) -> bool:
    """False under DeepSpeed, whose engine holds the optimizer and saves it only as pickles."""
    return accelerator.distributed_type != DistributedType.DEEPSPEED


def layout(accelerator) -> str:
    """How the optimizer state is keyed: ``fsdp`` (by parameter name) or ``plain`` (by index)."""
    return "fsdp" if accelerator.distributed_type == DistributedType.FSDP else "plain"


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
"""Whole tensors, on the CPU of the main process only, trainable parameters only."""


def gather_trained(accelerator, model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The trainable weights and the optimizer's state, whole. Under FSDP every process takes
    part and the main process gets them ({} elsewhere); otherwise every process has them."""
    if layout(accelerator) == "fsdp":
        raw = getattr(optimizer, "optimizer", optimizer)
        return final_weights(accelerator, model, full=False), get_optimizer_state_dict(model, raw, options=FULL)
    return trained_weights(accelerator.unwrap_model(model)), optimizer.state_dict()


def final_weights(accelerator, model, full: bool) -> dict[str, torch.Tensor] | None:
    """What the final save writes, whole, when the processes each hold only part of it: under
    FSDP every process takes part and the main process gets the tensors on its CPU (the trained
    ones for LoRA, every one for full fine-tuning; {} on the other processes); under DeepSpeed
    ZeRO-3, accelerate's gathering (its config needs ``zero3_save_16bit_model: true``). ``None``
    when the model in this process is whole: ``save_pretrained`` reads it as it is."""
    if accelerator.distributed_type == DistributedType.FSDP:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=not full)
        return {k: v.contiguous() for k, v in get_model_state_dict(model, options=options).items()}
    if zero3(accelerator):
        return accelerator.get_state_dict(model)
    return None


def scatter_trained(accelerator, model, optimizer, weights: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """Put saved trainable weights and optimizer state back. Under FSDP the main process's copy
    (read from the checkpoint) is sent to every process, each keeping its own shard."""
    if layout(accelerator) == "fsdp":
        raw = getattr(optimizer, "optimizer", optimizer)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(model, weights, options=options)
        set_optimizer_state_dict(model, raw, optimizer_state, options=options)
        return
    params = {name: p for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(optimizer_state)


def trained_names(accelerator, model) -> set[str]:
    """The names a checkpoint's weights must have: this run's trainable parameters."""
    if layout(accelerator) == "fsdp":
        return set(get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)))
    return {name for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random generators (torch CPU and CUDA, Python's ``random``, NumPy's global
    one) as tensors, so a resumed run draws the same numbers as an uninterrupted one."""
    version, internal, gauss = random.getstate()
    _, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "cpu": torch.get_rng_state(),
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        "python_gauss": torch.tensor([math.nan if gauss is None else gauss], dtype=torch.float64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_extra": torch.tensor([position, has_gauss, cached], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what `rng_state` saved (a generator it does not hold is left as it is)."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "python" in state:
        version, *internal = state["python"].tolist()
        gauss = float(state["python_gauss"][0])
        random.setstate((version, tuple(internal), None if math.isnan(gauss) else gauss))
    if "numpy" in state:
        position, has_gauss, cached = state["numpy_extra"].tolist()
        np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(position), int(has_gauss), cached))


def fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk before anything relies on it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from, or None if it is complete."""
    if not (path / COMPLETE).is_file():
        return f"no {COMPLETE} marker (torn while saving, or written by an older liandan)"
    try:
        files = json.loads((path / STATE_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return f"{STATE_FILE} is missing or unreadable"
    for name, size in files.items():
        if not (path / name).is_file() or (path / name).stat().st_size != size:
            return f"{name} is missing or has the wrong size"
    return None


def latest_checkpoint(out_dir: Path, quiet: bool = False) -> Path | None:
    """The newest complete checkpoint; torn ones are skipped, with a message unless ``quiet``."""
    for path in sorted((out_dir / CHECKPOINTS).glob("step-*"), reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if not quiet:
            say(f"skipping checkpoint '{path}': {problem}")
    return None


def rotate_checkpoints(out_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; torn ones older than the newest go too."""
    found = sorted((out_dir / CHECKPOINTS).glob("step-*"))
    complete = [p for p in found if checkpoint_problem(p) is None]
    kept = complete[-keep:] if keep > 0 else complete
    for path in found:
        if path not in kept and complete and path.name < complete[-1].name:
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(accelerator, out_dir: Path, model, optimizer, scheduler, current: dict, allow_changes: bool) -> dict:
    """Restore the newest complete checkpoint into the model, optimizer, scheduler and RNG, and
    return its state (step, skipped steps). Nothing is unpickled: safetensors, JSON, and the
    optimizer's tensors through ``torch.load(weights_only=True)``."""
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is None:
        raise LiandanError(f"--resume: no complete checkpoint in '{out_dir / CHECKPOINTS}' to resume from")
    state = json.loads((checkpoint / STATE_FILE).read_text())
    check_fingerprint(state.get("fingerprint") or {}, current, checkpoint, allow_changes)
    if state.get("layout", "plain") != layout(accelerator):
        raise LiandanError(f"--resume: checkpoint '{checkpoint}' was written {'with' if state.get('layout') == 'fsdp' else 'without'} "
                           "FSDP; resume it the same way (its optimizer state is keyed differently)")  # fmt: skip
    names = trained_names(accelerator, model)
    weights, saved_optimizer = {}, {}
    if accelerator.is_main_process or layout(accelerator) == "plain":
        weights = load_file(checkpoint / "weights.safetensors", device="cpu")
        if weights.keys() != names:
            raise LiandanError(f"--resume: checkpoint '{checkpoint}' holds other trained weights than this run has "
                               f"(e.g. {min(weights.keys() ^ names)!r})")  # fmt: skip
        try:  # weights_only: a planted pickle cannot run code, it fails to load
            saved_optimizer = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise LiandanError(
                f"--resume: '{checkpoint / 'optimizer.pt'}' is not a tensors-only optimizer state: {exc}"
            ) from None
    scatter_trained(accelerator, model, optimizer, weights, saved_optimizer)
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    set_rng_state(load_file(checkpoint / f"rng-{accelerator.process_index}.safetensors"))
    return {**state, "fingerprint": current}


def fingerprint(config: TrainConfig, manifest: dict, items: list[dict]) -> dict:
    """What a resumed run must share with its checkpoint: the settings that change what a step
    computes, and a hash of the data (its files, counts and token ids)."""
    settings = json.loads(json.dumps({k: v for k, v in to_dict(config).items() if k not in RESUMABLE_CHANGES}))
    digest = hashlib.sha256(json.dumps(manifest.get("data"), sort_keys=True, default=str).encode())
    for item in items:  # the token ids and masks of every item
        digest.update(json.dumps({k: v for k, v in item.items() if isinstance(v, (list, dict, int, str))}, sort_keys=True, default=str).encode())
    return {"settings": settings, "data_sha256": digest.hexdigest()}


def check_fingerprint(saved: dict, current: dict, checkpoint: Path, allow_changes: bool) -> None:
    before, now = saved.get("settings") or {}, current["settings"]
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    problems = [f"settings ({', '.join(changed)})"] if changed else []
    if saved.get("data_sha256") != current["data_sha256"]:
        problems.append("training data")
    if not problems:
        return
    message = f"--resume: the {' and the '.join(problems)} differ from those checkpoint '{checkpoint}' was made with"
    if not allow_changes:
        raise LiandanError(f"{message}; resume with the original ones, or --set resume_changed=true to continue anyway")
    say(f"{message}; continuing (resume_changed is set)")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the metrics of steps after ``step`` (logged before a crash, to be run again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass  # a line torn by the crash
    write_atomic(path, "".join(kept))


def refuse_non_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise naming the first tensor with a NaN or an infinity: a diverged model is never saved."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LiandanError(f"{what}: weight '{name}' has non-finite values (NaN or inf); the model diverged, "
                               "refusing to write it")  # fmt: skip


def check_run_complete(path: str | Path) -> None:
    """For anything that loads a run directory as a model: refuse one whose training has not
    finished (its final save never completed, so its weights may be missing or half written)."""
    if (Path(path) / INCOMPLETE).is_file():
        raise LiandanError(f"'{path}' is an unfinished training run: its final model was never completely saved "
                           f"(it still has its {INCOMPLETE} marker); continue it with --resume -o {path}")  # fmt: skip
