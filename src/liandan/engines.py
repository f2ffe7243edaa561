"""What the training loop needs to know about how accelerate runs it: the sharding engine a run
was launched with (FSDP, DeepSpeed), and the precision, with fp16's loss scaler.

    from liandan.engines import resolve_precision, sharded_launch
    resolve_precision("auto")    # "bf16" where the hardware computes it natively, "fp16" on older GPUs, else "no"
    sharded_launch()             # "FSDP" or "DeepSpeed" when `accelerate launch` started this process for one

accelerate applies an FSDP or DeepSpeed config only on accelerators: on CPU processes it runs the
same launch as plain DDP without a word, so `warn_engine_not_applied` says so; and liandan's own
``mixed_precision`` overrules the launcher's, so `warn_precision_overruled` says when they differ.
"""

from __future__ import annotations

import math
import os

import torch
from accelerate.utils import DistributedType

from .devices import cpu_supports_bf16
from .errors import say

SHARDING_FLAGS = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}
"""The variables `accelerate launch` sets for a sharded run, and what each one means."""

ENGINES = {"FSDP": DistributedType.FSDP, "DeepSpeed": DistributedType.DEEPSPEED}


def sharded_launch() -> str | None:
    """"FSDP" or "DeepSpeed" when `accelerate launch` started this process for one (the flags
    accelerate's own Accelerator reads), else None."""
    for variable, name in SHARDING_FLAGS.items():
        if os.environ.get(variable, "false").lower() in ("1", "true", "yes"):
            return name
    return None


def sharded(accelerator) -> bool:
    """FSDP and DeepSpeed manage parameter dtypes themselves (FSDP wants one dtype per flattened
    unit), so frozen weights stay as loaded there."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def zero3(accelerator) -> bool:
    """DeepSpeed ZeRO-3: the weights themselves are partitioned, whole only inside the forward."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3


def warn_engine_not_applied(accelerator) -> None:
    """accelerate applies an FSDP or DeepSpeed config only on accelerators (GPUs); on CPU
    processes it runs plain DDP without a word, each process holding the whole model. Say so."""
    asked = sharded_launch()
    if asked and accelerator.distributed_type != ENGINES[asked] and accelerator.is_main_process:
        plain = "plain DDP, each process holding the whole model" if accelerator.num_processes > 1 else "one process"
        say(f"the accelerate config asks for {asked}, which accelerate applies only on GPUs: on "
            f"{accelerator.device.type} this run is {plain}")  # fmt: skip


def warn_precision_overruled(choice: str, accelerator) -> None:
    """liandan's ``mixed_precision`` decides the precision (as a trainer's own arguments do), and
    accelerate takes it over what `accelerate launch` asked for (``--mixed_precision`` or its
    config's line, which the launcher passes in ACCELERATE_MIXED_PRECISION). Where the two differ,
    say which one the run follows and how to follow the launcher instead."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    used = accelerator.mixed_precision
    if launched is None or launched == used or not accelerator.is_main_process:
        return
    setting = f"mixed_precision: {choice}" + (f" (resolved to {used} here)" if choice != used else "")
    say(f"accelerate launch asked for mixed precision {launched}; liandan's own {setting} decides, so "
        f"this run computes in {used}. To follow the launcher, set mixed_precision: {launched} "
        f"(--set mixed_precision={launched})")  # fmt: skip


def resolve_precision(choice: str) -> str:
    """The ``mixed_precision`` setting as accelerate takes it: auto becomes bf16 where the hardware
    computes it natively, fp16 on a GPU without bf16, else no."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "no"


def optimizer_step(optimizer, scaler, loss: float, norm: float) -> tuple[bool, bool]:
    """The step's update, unless it diverged; returns (diverged, overflowed).

    Without a loss scaler a non-finite loss or gradient norm is divergence: no weight changes.
    Under fp16, accelerate's GradScaler multiplies the loss by its scale S before backward, so
    that small gradients survive in fp16; when a scaled gradient overflows, the scaler's own step
    skips the update and halves S. That is calibration, not divergence (the first steps of an fp16
    run commonly overflow): the step counts as overflowed, and toward ``max_bad_steps`` only once
    S is down to 1 or below, where the scaled gradients are no larger than the true ones. A
    non-finite loss is divergence either way: the scale acts on the backward pass only."""
    if scaler is None:
        diverged = not (math.isfinite(loss) and math.isfinite(norm))
        if not diverged:
            optimizer.step()
        return diverged, False
    if not math.isfinite(loss):
        # The step's gradients were unscaled (in clip_grad_norm_): update() closes that, or the
        # next step's unscale_ raises; with non-finite gradients it also lowers the scale.
        scaler.update()
        return True, False
    scale = scaler.get_scale()
    optimizer.step()  # accelerate's: the scaler's step and update
    overflowed = bool(optimizer.step_was_skipped)
    return overflowed and scale <= 1, overflowed and scale > 1
