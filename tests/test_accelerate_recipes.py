"""The accelerate configs shipped in ``examples/accelerate/``: each loads with accelerate's own
loader, and what ``accelerate launch`` hands the processes (the environment its plugins are built
from) is what the file's name says: DDP, FSDP2, DeepSpeed ZeRO-2 or ZeRO-3, offloaded or not.

Run here: ``ddp-cpu.yaml`` on 2 CPU processes (tests/test_train.py), ``fsdp2.yaml`` (tests/test_fsdp.py),
and ZeRO-2 and ZeRO-3 on 2 CPU processes where deepspeed is installed (through
``tests/accelerate_on_cpu.py``: accelerate itself runs DeepSpeed only on accelerators). The GPU-only
settings (bf16 on GPUs, CPU offload from GPU memory, 8 processes) are checked as configuration only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from safetensors.torch import load_file

from conftest import chat_row, write_jsonl
from liandan.config import TrainConfig

RECIPES = Path(__file__).resolve().parents[1] / "src" / "liandan" / "examples" / "accelerate"
SHIPPED = ["ddp-cpu.yaml", "ddp.yaml", "fsdp2-offload.yaml", "fsdp2.yaml", "zero2-offload.yaml", "zero2.yaml",
           "zero3-offload.yaml", "zero3.yaml"]  # fmt: skip
KINDS = {"ddp": DistributedType.MULTI_GPU, "fsdp2": DistributedType.FSDP, "zero2": DistributedType.DEEPSPEED,
         "zero3": DistributedType.DEEPSPEED}  # fmt: skip


def kind(name: str) -> str:
    return name.removesuffix(".yaml").split("-")[0]


def launched(name: str) -> tuple[object, dict[str, str]]:
    """The arguments and the environment ``accelerate launch --config_file <name>`` gives the
    processes it starts, computed as its launcher does, without starting any."""
    args = launch_command_parser().parse_args(["--config_file", str(RECIPES / name), "-m", "liandan.cli"])
    args, defaults, precision_from_config = _validate_launch_command(args)
    if not args.use_deepspeed:
        return args, prepare_multi_gpu_env(args)
    # as accelerate's launch_command sets it before its DeepSpeed launcher
    fields = [*defaults.deepspeed_config, *(["mixed_precision"] if precision_from_config else [])]
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    return args, prepare_deepspeed_cmd_env(args)[1]


def test_the_shipped_recipes_are_the_tested_ones():
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_a_recipe_loads_with_accelerates_loader_as_its_name_says(name):
    config = load_config_from_file(str(RECIPES / name))
    assert config.distributed_type == KINDS[kind(name)]
    # accelerate launch copies these sections' keys onto its options and silently ignores unknown ones
    options = {action.dest for action in launch_command_parser()._actions}
    nested = {**config.deepspeed_config, **config.fsdp_config}
    assert not set(nested) - options, f"{name}: not accelerate launch options: {sorted(set(nested) - options)}"
    comments = (RECIPES / name).read_text(encoding="utf-8").split("\ncompute_environment")[0]
    assert f"accelerate launch --config_file examples/accelerate/{name} -m liandan.cli" in comments


@pytest.mark.parametrize("name", [n for n in SHIPPED if kind(n) in ("zero2", "zero3")])
def test_deepspeed_recipes_hand_the_processes_their_zero_stage_and_offload(name):
    args, env = launched(name)
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = DeepSpeedPlugin()
    offloaded = name.endswith("-offload.yaml")
    assert plugin.zero_stage == int(kind(name)[-1]) and args.nproc_per_node == "8"
    assert plugin.offload_optimizer_device == ("cpu" if offloaded else "none")
    # ZeRO-2 keeps whole weights in every process: only ZeRO-3 has parameters to offload
    assert plugin.offload_param_device == ("cpu" if offloaded and plugin.zero_stage == 3 else "none")
    # the final save of a ZeRO-3 run needs the shards gathered into whole weights
    assert plugin.zero3_save_16bit_model == (plugin.zero_stage == 3) and plugin.zero3_init_flag == (plugin.zero_stage == 3)
    # DeepSpeed clips in its own step: at liandan's default max_grad_norm. liandan's grad_accum
    # accumulates, so DeepSpeed's own accumulation is left to accelerate (1: liandan passes none).
    assert plugin.gradient_clipping == TrainConfig.__dataclass_fields__["max_grad_norm"].default
    assert plugin.gradient_accumulation_steps == "auto"


@pytest.mark.parametrize("name", [n for n in SHIPPED if kind(n) == "fsdp2"])
def test_fsdp_recipes_hand_the_processes_fsdp2_and_their_offload(name):
    from torch.distributed.fsdp import CPUOffloadPolicy

    args, env = launched(name)
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and args.nproc_per_node == "8"
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy) == name.endswith("-offload.yaml")


@pytest.mark.parametrize("name, processes", [("ddp.yaml", "8"), ("ddp-cpu.yaml", "2")])
def test_ddp_recipes_start_one_process_per_device(name, processes):
    args, env = launched(name)
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed and args.nproc_per_node == processes
    assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env


# ---------------------------------------------------------------------------------------------
# DeepSpeed on 2 CPU processes, where deepspeed is installed

SETTINGS = ["--set", "max_steps=3", "--set", "batch_tokens=96", "--set", "max_length=64", "--set", "mixed_precision=no",
            "--set", "lora.dropout=0", "--set", "seed=3", "--set", "lr=5e-3"]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, chat_model_dir):
    """One process with grad_accum 4: the run 2 processes with grad_accum 2 must reproduce."""
    root = tmp_path_factory.mktemp("one-process")
    data = write_jsonl(root / "sft.jsonl", [chat_row(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(10)])
    subprocess.run([sys.executable, "-m", "liandan.cli", "sft", "--model", str(chat_model_dir), "--data", str(data),
                    *SETTINGS, "--set", "grad_accum=4", "--output-dir", str(root / "run")],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    return data, root / "run"


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def require_deepspeed() -> None:
    """Skip without deepspeed, except in CI (LIANDAN_REQUIRE_DEEPSPEED set): there a skip would hide the checks."""
    if importlib.util.find_spec("deepspeed") is None:
        if os.environ.get("LIANDAN_REQUIRE_DEEPSPEED"):
            pytest.fail("deepspeed is not installed but LIANDAN_REQUIRE_DEEPSPEED is set (pip install -e '.[deepspeed]')")
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]')")


@pytest.mark.parametrize("name", ["zero2.yaml", "zero3.yaml"])
def test_deepspeed_on_two_cpu_processes_matches_one_process(tmp_path, chat_model_dir, one_process, name):
    """2 processes x grad_accum 2 under ZeRO-2 / ZeRO-3 = 1 process x grad_accum 4: the same losses
    (DeepSpeed steps once per step, not once per micro-batch) and the same adapter, gathered whole."""
    require_deepspeed()
    data, reference = one_process
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(RECIPES / name),
              "--num_processes", "2", "--main_process_port", "0", "--mixed_precision", "no",
              str(Path(__file__).with_name("accelerate_on_cpu.py"))]  # fmt: skip
    sft = ["sft", "--model", str(chat_model_dir), "--data", str(data), *SETTINGS, "--set", "grad_accum=2",
           "--output-dir", str(tmp_path / "run")]  # fmt: skip
    done = subprocess.run([*launch, *sft], check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(tmp_path / "run") == pytest.approx(losses(reference), rel=1e-5)
    ours, expected = load_file(tmp_path / "run" / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert ours.keys() == expected.keys()
    for key, tensor in expected.items():
        assert ours[key].shape == tensor.shape and float((ours[key].float() - tensor).abs().max()) < 1e-5, key


@pytest.mark.parametrize("launched, setting, warned", [("no", "bf16", True), ("bf16", "bf16", False), (None, "bf16", False),
                                                        ("fp16", "no", True)])  # fmt: skip
def test_a_launch_precision_that_liandan_overrules_is_named(monkeypatch, capsys, launched, setting, warned):
    """`accelerate launch --mixed_precision X` (or its config's line) reaches the process as
    ACCELERATE_MIXED_PRECISION; accelerate takes liandan's own setting over it. The run says so
    when the two differ, and how to follow the launcher, and stays quiet when they agree."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from liandan.engines import warn_precision_overruled

    if launched is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    try:
        accelerator = Accelerator(cpu=True, mixed_precision=setting)
        assert accelerator.mixed_precision == setting  # liandan's setting wins over the launcher's
        warn_precision_overruled(setting, accelerator)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    said = " ".join(capsys.readouterr().err.split())
    if warned:
        assert f"accelerate launch asked for mixed precision {launched}" in said
        assert f"this run computes in {setting}" in said and f"--set mixed_precision={launched}" in said
    else:
        assert said == ""


def test_auto_names_what_it_resolved_to_when_it_overrules_the_launcher(monkeypatch, capsys):
    from types import SimpleNamespace

    from liandan.engines import warn_precision_overruled

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    warn_precision_overruled("auto", SimpleNamespace(mixed_precision="bf16", is_main_process=True))
    said = " ".join(capsys.readouterr().err.split())
    assert "mixed_precision: auto (resolved to bf16 here) decides" in said
    warn_precision_overruled("auto", SimpleNamespace(mixed_precision="bf16", is_main_process=False))
    assert capsys.readouterr().err == ""  # one process speaks for the run
