"""``liandan`` under FSDP2 or DeepSpeed on CPU processes (gloo), for the tests. accelerate applies
these engines only on accelerators: on CPU processes an FSDP config silently runs plain DDP, and a
DeepSpeed config is skipped (told the run is on CPU) or finds no backend (every process then
believes it is rank 0 of 1). This entry point lets accelerate take the engine its config names on
CPU too, then runs the CLI; everything after that is accelerate's own FSDP2 preparation
(``fully_shard`` of each decoder layer) or DeepSpeed preparation (DeepSpeed's CPU accelerator), and
liandan's loop as on GPUs.

    accelerate launch --config_file examples/accelerate/fsdp2.yaml --num_processes 2 tests/accelerate_on_cpu.py sft ...
    accelerate launch --config_file examples/accelerate/zero3.yaml --num_processes 2 tests/accelerate_on_cpu.py sft ...

``accelerate launch`` says which engine the config names (``ACCELERATE_USE_FSDP`` or
``ACCELERATE_USE_DEEPSPEED`` in each process's environment); only that engine's patch is applied.

With ``STOP_AFTER=N`` in the environment the run ends after N steps as if it had been stopped
there (a checkpoint, no final model), for the resume test.
"""

from __future__ import annotations

import functools
import os
import sys

from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

import liandan.train
from liandan.cli import app


def _take_fsdp_on_cpu() -> None:
    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # Each later AcceleratorState() copies the process state's type over its own: set both.
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


def _start_deepspeed_over_gloo() -> None:
    original_backend, original_init = PartialState._prepare_backend, Accelerator.__init__

    def gloo_when_none(self, cpu=False, sagemaker_dp=False, backend=None):
        found, kind = original_backend(self, cpu, sagemaker_dp, backend)
        return ("gloo", DistributedType.MULTI_CPU) if found is None else (found, kind)

    def init_without_cpu(self, *args, cpu=False, **kwargs):
        original_init(self, *args, cpu=False, **kwargs)

    PartialState._prepare_backend = gloo_when_none
    Accelerator.__init__ = init_without_cpu


def _stop_after(steps: int) -> None:
    train = liandan.train.train

    @functools.wraps(train)
    def train_stopping(*args, stop_after=None, **kwargs):
        return train(*args, stop_after=steps, **kwargs)

    liandan.train.train = train_stopping


def main() -> None:
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        _take_fsdp_on_cpu()
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        _start_deepspeed_over_gloo()
    else:
        sys.exit("tests/accelerate_on_cpu.py: launch it with an FSDP or DeepSpeed accelerate config")
    if os.environ.get("STOP_AFTER"):
        _stop_after(int(os.environ["STOP_AFTER"]))
    try:
        app()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
    # Leave without the interpreter's teardown. The run has finished and closed its files. Both
    # engines keep gloo groups alive after accelerate destroys the process group (FSDP2 through
    # DTensor's caches of its device mesh, DeepSpeed through its own groups), so their C++ worker
    # threads are still running while Python finalizes; one of them then, rarely, aborts the
    # process ("terminate called without an active exception", after "Finished ..." was printed).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
