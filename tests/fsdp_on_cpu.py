"""``liandan`` under FSDP2 on CPU processes (gloo), for the tests: accelerate applies an FSDP config
only on accelerators (on CPUs it silently runs plain DDP), so this entry point makes its state take
the FSDP plugin on CPU too, then runs the CLI. Everything after that is accelerate's own FSDP2
preparation (``fully_shard`` of each decoder layer) and liandan's loop as on GPUs.

    accelerate launch --config_file examples/accelerate/fsdp2.yaml --num_processes 2 tests/fsdp_on_cpu.py sft ...

With ``STOP_AFTER=N`` in the environment the run ends after N steps as if it had been stopped
there (a checkpoint, no final model), for the resume test.
"""

from __future__ import annotations

import functools
import os

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

import liandan.train
from liandan.cli import app

_original_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # Each later AcceleratorState() copies the process state's type over its own: set both.
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _init_with_fsdp_on_cpu
if os.environ.get("STOP_AFTER"):
    _train = liandan.train.train

    @functools.wraps(_train)
    def _train_stopping(*args, stop_after=None, **kwargs):
        return _train(*args, stop_after=int(os.environ["STOP_AFTER"]), **kwargs)

    liandan.train.train = _train_stopping

if __name__ == "__main__":
    app()
