"""FSDP2 through ``accelerate launch`` with the shipped ``examples/accelerate/fsdp2.yaml``, on 2 CPU
processes (gloo): LoRA and full fine-tuning, DPO with its adapter-off reference, a stopped run
resumed from its sharded checkpoint, activation checkpointing. Each gives the same losses and weights as one process with
twice the gradient accumulation (the same effective batch), and the final save is a plain PEFT
adapter or transformers model that `liandan merge` and transformers load.

accelerate applies an FSDP config only on GPUs; ``tests/accelerate_on_cpu.py`` lets it apply it on CPU
processes too, so that accelerate's own FSDP2 preparation and liandan's loop run as they do on
GPUs. Without it, the same launch on CPUs is plain DDP and liandan says so
(`test_an_fsdp_config_on_cpu_says_it_runs_plain_ddp`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import chat_row, write_jsonl
from liandan.checkpoints import STATE_FILE
from liandan.config import DPOConfig, SFTConfig
from liandan.train import train_dpo, train_sft

ROOT = Path(__file__).resolve().parents[1]
FSDP2 = ROOT / "src" / "liandan" / "examples" / "accelerate" / "fsdp2.yaml"
HARNESS = Path(__file__).with_name("accelerate_on_cpu.py")
COMMON = {"max_steps": 3, "batch_tokens": 96, "max_length": 64, "seed": 3, "lr": 5e-3, "lora.dropout": 0}


@pytest.fixture
def sft_data(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", [chat_row(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(10)])


@pytest.fixture
def pairs(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}], "chosen": f"It is {2 * i}.",
             "rejected": f"It is {2 * i + 1}, I think."} for i in range(10)]  # fmt: skip
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def accelerate_launch(precision: str = "no") -> list[str]:
    """``accelerate launch`` with the shipped FSDP2 config on 2 processes, on any free port."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2), "--num_processes", "2",
            "--main_process_port", "0", "--mixed_precision", precision]  # fmt: skip


def launch(command: str, model, data, out, settings: dict, *, harness: bool = True, env: dict | None = None,
           precision: str = "no"):  # fmt: skip
    """``liandan <command>`` under FSDP2 on 2 CPU processes."""
    entry = [str(HARNESS)] if harness else ["-m", "liandan.cli"]
    args = [*accelerate_launch(precision), *entry, command, "--model", str(model), "--data", str(data), "--output-dir", str(out)]
    # liandan's own setting decides the precision (its auto is bf16 on a CPU that computes bf16): the
    # launch's flag alone would leave the sharded run in bf16 where the one-process run is in fp32
    args += ["--set", f"mixed_precision={precision}"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def one_process(config_class, train_fn, model, data, out, settings: dict):
    """The same run in this process, with twice the accumulation: the same effective batch."""
    lora = {k.split(".", 1)[1]: v for k, v in settings.items() if k.startswith("lora.")}
    rest = {k: v for k, v in settings.items() if not k.startswith("lora.")}
    rest["grad_accum"] = 2 * int(rest.get("grad_accum", 1))
    config = config_class(model=str(model), data=[str(data)], output_dir=str(out), mixed_precision="no", lora=lora, **rest)
    train_fn(config)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def max_difference(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_fsdp2_lora_matches_one_process_and_saves_a_plain_adapter(tmp_path, chat_model_dir, sft_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # 2 micro-batches per step in each process: the first under no_sync, reduced only after the second
    settings = {**COMMON, "grad_accum": 2}
    launch("sft", chat_model_dir, sft_data, tmp_path / "fsdp", settings)
    one_process(SFTConfig, train_sft, chat_model_dir, sft_data, tmp_path / "one", settings)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    sharded, whole = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("fsdp", "one"))
    # the adapter is whole (full shapes, not one process's shard) and equals the one-process run's
    assert sharded["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (16, 64)
    assert max_difference(sharded, whole) < 1e-5  # fp32 sums in another order, through AdamW's normalisation
    assert max(float(v.abs().max()) for k, v in sharded.items() if "lora_B" in k) > 1e-3  # trained, not the zero init

    # plain PEFT loads it; liandan merge folds it into a plain transformers model with the same logits
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    base = AutoModelForCausalLM.from_pretrained(chat_model_dir, dtype=torch.float32)
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, tmp_path / "fsdp")(ids).logits
    merge = subprocess.run([sys.executable, "-m", "liandan.cli", "merge", str(tmp_path / "fsdp"), str(tmp_path / "merged")],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert merge.returncode == 0, merge.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted, atol=1e-4)


def test_fsdp2_full_fine_tuning_matches_one_process_and_saves_a_plain_model(tmp_path, chat_model_dir, sft_data):
    from transformers import AutoModelForCausalLM

    settings = {**COMMON, "full": "true", "lr": 1e-3}
    launch("sft", chat_model_dir, sft_data, tmp_path / "fsdp", settings)
    one_process(SFTConfig, train_sft, chat_model_dir, sft_data, tmp_path / "one", {**settings, "full": True})
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    sharded, whole = (load_file(tmp_path / run / "model.safetensors") for run in ("fsdp", "one"))
    assert max_difference(sharded, whole) < 1e-6
    before = load_file(chat_model_dir / "model.safetensors")
    assert max_difference(sharded, before) > 1e-4  # every weight trained, gathered whole
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp")
    assert model.model.layers[1].mlp.up_proj.weight.shape == (64, 32)


def test_fsdp2_with_activation_checkpointing_matches_one_process_without(tmp_path, chat_model_dir, sft_data):
    """Each decoder layer recomputed in backward while FSDP2 shards it: transformers checkpoints the
    layer's forward and leaves FSDP2's gathering hooks outside, so the losses and the adapter are
    those of one process that keeps its activations."""
    launch("sft", chat_model_dir, sft_data, tmp_path / "fsdp", {**COMMON, "activation_checkpointing": "true"})
    one_process(SFTConfig, train_sft, chat_model_dir, sft_data, tmp_path / "one", COMMON)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    sharded, whole = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("fsdp", "one"))
    assert max_difference(sharded, whole) < 1e-5


def test_fsdp2_in_bf16_follows_one_process_in_bf16(tmp_path, chat_model_dir, sft_data):
    """The shipped config's bf16: FSDP's mixed-precision policy (bf16 compute, fp32 master weights)
    against one process's autocast, which rounds in other places: close, not equal."""
    launch("sft", chat_model_dir, sft_data, tmp_path / "fsdp", COMMON, precision="bf16")
    config = SFTConfig(model=str(chat_model_dir), data=[str(sft_data)], output_dir=str(tmp_path / "one"), mixed_precision="bf16",
                       grad_accum=2, lora={"dropout": 0}, **{k: v for k, v in COMMON.items() if k != "lora.dropout"})  # fmt: skip
    train_sft(config)
    sharded, whole = losses(tmp_path / "fsdp"), losses(tmp_path / "one")
    assert sharded[1] < sharded[0] and sharded == pytest.approx(whole, rel=2e-3)


def test_fsdp2_dpo_with_the_adapter_off_reference_matches_one_process(tmp_path, chat_model_dir, pairs):
    settings = {**COMMON, "lr": 1e-2}
    launch("dpo", chat_model_dir, pairs, tmp_path / "fsdp", settings)
    one_process(DPOConfig, train_dpo, chat_model_dir, pairs, tmp_path / "one", settings)
    sharded = losses(tmp_path / "fsdp")
    # step 1: the policy is its reference (LoRA B starts at 0), so the loss is log 2; then it learns
    assert sharded[0] == pytest.approx(0.693147, abs=1e-5) and sharded[-1] < 0.68
    assert sharded == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


def test_a_stopped_fsdp2_run_resumes_from_its_checkpoint_to_the_same_run(tmp_path, chat_model_dir, sft_data):
    settings = {**COMMON, "max_steps": 4, "save_every": 0}
    launch("sft", chat_model_dir, sft_data, tmp_path / "straight", settings)
    launch("sft", chat_model_dir, sft_data, tmp_path / "resumed", settings, env={"STOP_AFTER": "2"})
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step-000002"
    assert json.loads((checkpoint / STATE_FILE).read_text())["layout"] == "fsdp"
    assert not (tmp_path / "resumed" / "adapter_model.safetensors").exists()
    args = [*accelerate_launch(), str(HARNESS), "sft", "--resume", "--output-dir", str(tmp_path / "resumed")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-5000:]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    straight, resumed = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("straight", "resumed"))
    assert max_difference(straight, resumed) == 0.0


def test_an_fsdp_config_on_cpu_says_it_runs_plain_ddp(tmp_path, chat_model_dir, sft_data):
    """Without the test harness accelerate quietly runs DDP on CPU processes: liandan says so."""
    done = launch("sft", chat_model_dir, sft_data, tmp_path / "run", {**COMMON, "max_steps": 1}, harness=False)
    said = " ".join((done.stdout + done.stderr).split())
    assert "the accelerate config asks for FSDP, which accelerate applies only on GPUs" in said
    assert "plain DDP, each process holding the whole model" in said
