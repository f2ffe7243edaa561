"""Stopping a training run on request, and its progress for whoever watches it.

    from liandan.run_control import ProgressFile, StopRequest
    stop = StopRequest(); stop.install()        # SIGTERM / Ctrl-C now ask the loop to stop
    ...
    if stop.agreed(accelerator): ...            # at a step boundary: checkpoint, then TrainingStopped
    stop.restore()

`liandan.train` uses both; `liandan.jobs` (the browser UI's runs) reads ``progress.json`` and
stops a run with SIGTERM.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import threading
import time
from pathlib import Path

import torch

from .checkpoints import PROGRESS
from .config import STAGES, TrainConfig
from .errors import LiandanError
from .files import write_atomic


class TrainingStopped(LiandanError):
    """SIGTERM or SIGINT ended the run early, with a checkpoint at ``step`` to resume from. A
    `LiandanError`, so every caller stops with this one line rather than going on to use a model
    that was never written; the training commands print it and exit with status 3."""

    def __init__(self, stage: str, out_dir: Path, step: int, steps: int):
        self.step, self.steps = step, steps
        super().__init__(f"stopped at step {step} of {steps}, with a checkpoint; continue with: "
                         f"liandan {stage} --resume -o {shlex.quote(str(out_dir))}")  # fmt: skip


class StopRequest:
    """SIGTERM or SIGINT (Ctrl-C) asks the loop to stop: it finishes the step in progress (GRPO:
    the round, as its checkpoints fall between rounds) and ends as ``stop_after`` does, with a
    resumable checkpoint and nothing final. A second signal aborts at once through the handler
    that was there before; nothing is half-written then either, since checkpoints are written
    under a temporary name and renamed. Handlers go in from the main thread only (Python allows no
    other). Every process of a multi-process run installs its own, as a launcher passes the
    signal on to each, and the request is summed over processes so that all stop at one step."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self.previous = {}

    def handle(self, signum: int, frame) -> None:
        if self.requested:
            self.restore()
            signal.raise_signal(signum)
            return
        self.requested = True
        # os.write, not print: the signal may have interrupted a print to the same stream.
        name = signal.Signals(signum).name
        os.write(2, f"\n{name}: stopping after this step with a checkpoint (once more to abort)\n".encode())

    def agreed(self, accelerator) -> bool:
        """Whether any process was asked to stop; every process calls it at the same step."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return float(accelerator.reduce(flag, "sum")) > 0


class ProgressFile:
    """``progress.json`` in the run directory, rewritten whole (temporary file, rename) by the main
    process when the loop starts, at each logged step and when it ends: stage, step of steps,
    seconds spent training (over resumes too), ETA at this session's pace, status (running,
    stopping, stopped, finished, failed) and the process id. Nothing is written before the loop
    starts: a run refused at the start leaves the directory it was refused from alone."""

    def __init__(self, config: TrainConfig):
        self.path = Path(config.output_dir) / PROGRESS
        self.stage = next((name for name, cls in STAGES.items() if type(config) is cls), type(config).__name__)
        self.record: dict | None = None
        self.began, self.first, self.earlier = time.monotonic(), 0, 0.0

    def start(self, step: int, steps: int, seconds: float, enabled: bool) -> None:
        self.began, self.first, self.earlier = time.monotonic(), step, seconds
        if enabled:
            self.record = {"stage": self.stage, "step": step, "steps": steps, "seconds": seconds, "eta_seconds": None,
                           "status": "running", "pid": os.getpid()}  # fmt: skip
            self.write(step)

    def seconds(self) -> float:
        return self.earlier + time.monotonic() - self.began

    def write(self, step: int | None = None, status: str = "running") -> None:
        if self.record is None:
            return
        step = self.record["step"] if step is None else step
        done, left, spent = step - self.first, self.record["steps"] - step, time.monotonic() - self.began
        eta = 0.0 if not left else round(spent / done * left, 3) if done else None  # None: no step timed yet
        self.record.update(step=step, seconds=round(self.seconds(), 3), status=status,
                           eta_seconds=None if status == "failed" else eta)  # fmt: skip
        try:
            write_atomic(self.path, json.dumps(self.record) + "\n")
        except OSError:
            if status != "failed":  # a failed run raises its own error; this one must not hide it
                raise
