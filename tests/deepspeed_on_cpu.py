"""``liandan`` under DeepSpeed on CPU processes (gloo), for the tests where deepspeed is installed.
accelerate runs DeepSpeed only on accelerators: told the run is on CPU (liandan says so when there
is no CUDA) it skips the DeepSpeed config, and not told, it finds no backend and every process
believes it is rank 0 of 1. This entry point lets accelerate start DeepSpeed over gloo instead
(DeepSpeed's own CPU accelerator), then runs the CLI; everything after that is accelerate's
DeepSpeed preparation and liandan's loop as on GPUs.

    accelerate launch --config_file examples/accelerate/zero2.yaml --num_processes 2 tests/deepspeed_on_cpu.py sft ...
"""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType

from liandan.cli import app

_original_backend = PartialState._prepare_backend
_original_init = Accelerator.__init__


def _gloo_when_none(self, cpu=False, sagemaker_dp=False, backend=None):
    found, kind = _original_backend(self, cpu, sagemaker_dp, backend)
    return ("gloo", DistributedType.MULTI_CPU) if found is None else (found, kind)


def _init_without_cpu(self, *args, cpu=False, **kwargs):
    _original_init(self, *args, cpu=False, **kwargs)


PartialState._prepare_backend = _gloo_when_none
Accelerator.__init__ = _init_without_cpu

if __name__ == "__main__":
    app()
