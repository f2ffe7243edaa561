"""The GPU paths (issue 19): QLoRA, fp16 with loss scaling, flash attention on packed rows, and
where DPO's reference log-probs are computed. What a CPU can check is checked here on the CPU:
the settings and their errors; QLoRA end to end where bitsandbytes is installed (its 4-bit layers
run on a CPU too); the loop under a real GradScaler on the CPU; packed rows reaching a
flash-attention kernel as position ids without a mask; the reference log-probs on the run's
device. The rest needs CUDA and is skipped here with the reason; `benchmarks/gpu_check.py` runs
it on a GPU machine (these tests call its checks).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

import liandan.objectives as objectives
import liandan.prepare as prepare
import liandan.train as train
from conftest import CHATML, build_model_dir, chat_row, write_jsonl
from liandan.attention import packed_attention
from liandan.config import DPOConfig, SFTConfig
from liandan.engines import optimizer_step
from liandan.errors import LiandanError
from liandan.models import load_model
from liandan.quantization import check_quantize, compute_dtype, quantized_layers
from liandan.train import train_sft

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
_saved_path = list(sys.path)
sys.path.insert(0, str(BENCHMARKS))
import gpu_check  # noqa: E402  the GPU machine's checks, shared with the CUDA-only tests below

sys.path[:] = _saved_path  # gpu_check adds benchmarks/ and tests/ for itself; the session keeps its own path

HAS_CUDA = torch.cuda.is_available()
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run benchmarks/gpu_check.py on one)")
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (pip install bitsandbytes; its 4-bit layers run on a CPU too)")


@pytest.fixture
def sft_data(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", [chat_row(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(12)])


def settings(model_dir, data, out, **overrides):
    values = dict(model=str(model_dir), data=[str(data)], output_dir=str(out), max_steps=6, lr=1e-2, batch_size=4,
                  batch_tokens=512, max_length=64, mixed_precision="no", warmup_ratio=0.0, seed=0, save_every=0,
                  save_every_minutes=0.0)  # fmt: skip
    values.update(overrides)
    return values


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# QLoRA: the setting and its errors


@pytest.mark.parametrize("values, message", [
    (dict(quantize="8bit"), "quantize must be 4bit or unset (got '8bit')"),
    (dict(quantize="4bit", full=True), "quantize: 4bit trains LoRA adapters on frozen 4-bit weights; it cannot be combined with full: true"),
    (dict(attention="flash_attention_2", mixed_precision="no"), "attention: flash_attention_2 computes in bf16 or fp16 only"),
])  # fmt: skip
def test_gpu_settings_are_checked_with_the_setting_named(values, message):
    with pytest.raises(LiandanError) as caught:
        SFTConfig(data=["x"], **values)
    assert str(caught.value).startswith(message)
    assert DPOConfig(data=["x"], quantize="4bit").quantize == "4bit"


def test_quantize_refuses_a_run_without_cuda_before_the_model_loads(chat_model_dir, sft_data, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(LiandanError, match=r"^quantize: 4bit saves GPU memory and runs on a CUDA GPU only; this run's device is cpu"):
        train_sft(SFTConfig(**settings(chat_model_dir, sft_data, tmp_path / "run", quantize="4bit")))


def test_quantize_errors_name_the_missing_package_the_launcher_and_the_model_kind(monkeypatch):
    config = SFTConfig(data=["x"], quantize="4bit")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(LiandanError, match=r"quantize: 4bit needs the bitsandbytes package: pip install bitsandbytes"):
        check_quantize(config, "cuda", "hf_dir")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(LiandanError, match=r"quantize: 4bit is not supported under FSDP"):
        check_quantize(config, "cuda", "hf_dir")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    with pytest.raises(LiandanError, match=r"quantize: 4bit .* a \.gguf file"):
        check_quantize(config, "cuda", "gguf")
    with pytest.raises(LiandanError, match=r"quantize: 4bit .* LoRA run directory.*liandan merge"):
        check_quantize(config, "cuda:1", "adapter")
    check_quantize(config, torch.device("cuda", 0), "hub")  # every condition met: no error
    check_quantize(SFTConfig(data=["x"]), "cpu", "gguf")  # not asked for: nothing checked


def test_the_4bit_layers_compute_in_the_runs_precision():
    assert compute_dtype("bf16") == torch.bfloat16 and compute_dtype("fp16") == torch.float16
    assert compute_dtype("no") == torch.float32
    assert compute_dtype("auto") == (torch.bfloat16 if HAS_CUDA and torch.cuda.is_bf16_supported() else torch.float16)


@pytest.fixture(scope="module")
def wide_chat_model_dir(tmp_path_factory) -> Path:
    """``chat_model_dir`` at width 64. On a CPU with AVX-512 bf16, bitsandbytes' 4-bit layers in
    eval mode repack their weights in blocks of 64 inputs (and 32 outputs), which fails inside
    bitsandbytes for the 32-wide layers of ``chat_model_dir`` (``shape '[32, 0]' is invalid``)."""
    return build_model_dir(tmp_path_factory.mktemp("wide-chat-model"), CHATML, "<|im_end|>", hidden_size=64)


@needs_bnb
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_qlora_trains_adapters_on_a_4bit_base_and_saves_only_them(wide_chat_model_dir, sft_data, tmp_path, monkeypatch,
                                                                  precision):
    """bitsandbytes' 4-bit layers run on a CPU too, so the whole path runs here, with the CUDA
    check told the device is a GPU: the base is 4-bit while training (no LoRA layer over it
    fused), the loss falls, only the adapter is saved, and it reloads merged into the fp32 base."""
    real_check = prepare.check_quantize
    monkeypatch.setattr(prepare, "check_quantize", lambda config, device, kind: real_check(config, "cuda", kind))
    run, seen = tmp_path / "run", {}
    with gpu_check.watched_speed_ups(seen):  # the sample prompt: generation on the 4-bit model too
        result = train_sft(SFTConfig(**settings(wide_chat_model_dir, sft_data, run, quantize="4bit", max_steps=10,
                                                mixed_precision=precision, sample_prompts=["What is 1 plus 1?"])))
    assert seen == {"quantized_weights": 14, "fused_layers": 0}  # 2 layers x 7 projections
    assert result.losses[-1] < 0.95 * result.losses[0]
    assert (run / "adapter_model.safetensors").is_file() and not list(run.glob("model*.safetensors"))
    assert len((run / "samples.jsonl").read_text().splitlines()) == 1
    from safetensors.torch import load_file

    adapter = load_file(run / "adapter_model.safetensors")
    assert adapter and all("lora_" in name and t.dtype == torch.float32 for name, t in adapter.items())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["method"] == "qlora" and manifest["quantize"] == {
        "mode": "4bit", "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32" if precision == "no" else "bfloat16"}
    merged = gpu_check.data_loss(run, sft_data)
    base = gpu_check.data_loss(wide_chat_model_dir, sft_data)
    assert merged < 0.95 * base  # the adapter learned, and reloads without the 4-bit base
    model, _ = load_model(str(run), dtype="float32")
    assert quantized_layers(model) == 0 and all(p.dtype == torch.float32 for p in model.parameters())


@needs_bnb
def test_qlora_with_activation_checkpointing_trains_as_without(chat_model_dir, sft_data, tmp_path, monkeypatch):
    """QLoRA as 7B-class models are fine-tuned on one consumer GPU, with activation checkpointing:
    the 4-bit layers recomputed in backward give the same losses as kept activations."""
    real_check = prepare.check_quantize
    monkeypatch.setattr(prepare, "check_quantize", lambda config, device, kind: real_check(config, "cuda", kind))
    runs = [train_sft(SFTConfig(**settings(chat_model_dir, sft_data, tmp_path / f"run-{on}", quantize="4bit", max_steps=4,
                                           mixed_precision="no", activation_checkpointing=on))).losses for on in (False, True)]  # fmt: skip
    assert runs[1] == pytest.approx(runs[0], rel=1e-6)


def test_lora_fusion_leaves_a_layer_over_a_4bit_weight_alone(chat_model_dir):
    """Without bitsandbytes: a base layer that subclasses nn.Linear but is not one (as
    bitsandbytes' Linear4bit does) is never fused, since F.linear cannot read its weight."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from liandan.lora_fusion import eligible
    from liandan.prepare import attach_trainable

    model, _ = load_model(str(chat_model_dir), dtype="float32")
    model = attach_trainable(model, SFTConfig(data=["x"]), [])
    layer = next(m for m in model.modules() if type(m) is LoraLinear)
    assert eligible(layer)

    class Packed4bit(torch.nn.Linear):
        pass

    layer.base_layer.__class__ = Packed4bit
    assert not eligible(layer)


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (pip install bitsandbytes)")
@needs_cuda
def test_qlora_on_cuda(tmp_path):
    measured = gpu_check.check_qlora(tmp_path)
    assert measured["quantized_weights"] > 0 and measured["fused_layers"] == 0


# ---------------------------------------------------------------------------------------------
# fp16: the loss scaler's skipped steps are not divergence


class FakeScaler:
    def __init__(self, scale: float):
        self.scale, self.updates = scale, 0

    def get_scale(self) -> float:
        return self.scale

    def update(self) -> None:
        self.updates += 1


class FakeOptimizer:
    def __init__(self, skips: bool = False):
        self.steps, self.skips, self.step_was_skipped = 0, skips, False

    def step(self) -> None:
        self.steps += 1
        self.step_was_skipped = self.skips


@pytest.mark.parametrize("loss, norm, scale, skips, expected, steps, updates", [
    (2.0, 1.0, None, False, (False, False), 1, 0),          # no scaler: a plain step
    (float("nan"), 1.0, None, False, (True, False), 0, 0),  # no scaler: a non-finite loss is divergence
    (2.0, float("inf"), None, False, (True, False), 0, 0),  # ... and so is a non-finite norm
    (2.0, 1.0, 1024.0, False, (False, False), 1, 0),        # scaler: a plain step
    (2.0, float("inf"), 1024.0, True, (False, True), 1, 0), # scaler: an overflow at scale 1024 is calibration
    (2.0, float("inf"), 1.0, True, (True, False), 1, 0),    # ... at scale 1 the gradients themselves are not finite
    (float("inf"), float("inf"), 1024.0, True, (True, False), 0, 1),  # a non-finite loss: divergence; the scaler updated
])  # fmt: skip
def test_optimizer_step_tells_overflow_from_divergence(loss, norm, scale, skips, expected, steps, updates):
    optimizer, scaler = FakeOptimizer(skips), (FakeScaler(scale) if scale is not None else None)
    assert optimizer_step(optimizer, scaler, loss, norm) == expected
    assert optimizer.steps == steps
    assert (scaler.updates if scaler else 0) == updates


@pytest.fixture
def cpu_loss_scaling(monkeypatch):
    """The loop's Accelerator as it is on a GPU under fp16: autocast to fp16 and a GradScaler
    (accelerate runs fp16 on a CPU as fp32, without either). The scale starts at 2^22, where the
    tiny model's fp16 gradients overflow for the first few steps."""

    class CpuLossScaling(train.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.native_amp = True  # accelerate autocasts and unscales only then
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**22, growth_interval=10**6)

    monkeypatch.setattr(train, "Accelerator", CpuLossScaling)


def test_fp16_overflow_steps_are_the_scalers_not_divergence(chat_model_dir, sft_data, tmp_path, cpu_loss_scaling):
    """Before: the first overflow counted as divergence, so the scaler never stepped nor lowered
    its scale, and the next step's unscale_ raised; with max_bad_steps 2 a healthy run stopped."""
    run = tmp_path / "run"
    result = train_sft(SFTConfig(**settings(chat_model_dir, sft_data, run, mixed_precision="fp16", max_steps=10, max_bad_steps=2)))
    lines = metrics(run)
    skipped = lines[-1]["scaler_skipped"]
    assert skipped > 2 and lines[-1]["skipped_steps"] == 0
    assert [m["scaler_skipped"] for m in lines[:skipped]] == list(range(1, skipped + 1))  # the first steps, in a row
    scales = [m["loss_scale"] for m in lines]
    assert scales[:skipped] == [2.0 ** (21 - i) for i in range(skipped)] and len(set(scales[skipped:])) == 1
    assert all(m["grad_norm"] is None for m in lines[:skipped]) and all(m["grad_norm"] > 0 for m in lines[skipped:])
    assert result.losses[-1] < result.losses[skipped]  # it learns once calibrated
    assert (run / "adapter_model.safetensors").is_file()


def test_a_non_finite_loss_under_fp16_is_still_divergence(chat_model_dir, sft_data, tmp_path, cpu_loss_scaling, monkeypatch):
    original = train.prepare_sft

    def poisoned(*args, **kwargs):
        run = original(*args, **kwargs)
        loss = run.objective.loss
        run.objective.loss = lambda model, batch: (lambda s: (s[0] * float("nan"), s[1]))(loss(model, batch))
        return run

    monkeypatch.setattr(train, "prepare_sft", poisoned)
    with pytest.raises(LiandanError, match=r"training diverged: 3 steps in a row \(up to step 3\)"):
        train_sft(SFTConfig(**settings(chat_model_dir, sft_data, tmp_path / "run", mixed_precision="fp16", max_bad_steps=3)))
    assert [m["skipped_steps"] for m in metrics(tmp_path / "run")] == [1, 2, 3]
    assert [m["scaler_skipped"] for m in metrics(tmp_path / "run")] == [0, 0, 0]


@needs_cuda
def test_fp16_on_cuda(tmp_path):
    measured = gpu_check.check_fp16(tmp_path)
    assert measured["skipped_steps"] == 0


# ---------------------------------------------------------------------------------------------
# flash attention: packed rows reach the kernel as position ids, with no mask


@pytest.fixture
def cpu_flash_attention(monkeypatch):
    """A CPU stand-in for flash_attention_2 behind transformers' own dispatch and mask creation:
    it records what it is handed, and computes what the flash kernel computes from the position
    ids (transformers' `_is_packed_sequence` and `prepare_fa_kwargs_from_position_ids`, then
    causal attention within each example)."""
    calls = []

    def varlen(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        position_ids, given = kwargs.pop("position_ids"), kwargs.pop("cu_seq_lens_q", None)
        packed = attention_mask is None and _is_packed_sequence(position_ids, query.shape[0])
        (derived, _), _ = prepare_fa_kwargs_from_position_ids(position_ids)
        calls.append({"mask": attention_mask, "packed": packed, "derived": derived.tolist(),
                      "given": given.tolist() if given is not None else None})  # fmt: skip
        assert packed, "transformers would not take flash attention's variable-length path on this batch"
        return packed_attention(module, query, key, value, None, dropout, scaling, cu_seq_lens_q=derived, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", varlen)
    monkeypatch.setattr(PreTrainedModel, "_check_and_adjust_attn_implementation", lambda self, name, *a, **k: name)
    monkeypatch.setattr(prepare, "check_attention_kernel", lambda config, device: None)
    return calls


def test_packed_rows_reach_flash_attention_as_restarting_positions_without_a_mask(chat_model_dir, sft_data, tmp_path,
                                                                                   cpu_flash_attention):  # fmt: skip
    """The loop under attention: flash_attention_2 hands the kernel no mask and position ids that
    restart at each example, so transformers' flash path splits the row into the examples the
    collator packed; and the run's losses are those of padded rows under SDPA. (On a CPU,
    accelerate runs fp16 as fp32, which makes the comparison exact.)"""
    flash = train_sft(SFTConfig(**settings(chat_model_dir, sft_data, tmp_path / "flash", attention="flash_attention_2",
                                           mixed_precision="fp16", packing=True)))  # fmt: skip
    assert cpu_flash_attention and all(c["mask"] is None and c["packed"] for c in cpu_flash_attention)
    assert all(c["derived"] == c["given"] and len(c["derived"]) > 2 for c in cpu_flash_attention)  # several examples a row
    padded = train_sft(SFTConfig(**settings(chat_model_dir, sft_data, tmp_path / "padded", attention="sdpa", packing=False)))
    assert flash.losses == pytest.approx(padded.losses, rel=1e-5)


def test_flash_attention_is_refused_without_cuda_or_its_package(monkeypatch):
    config = SFTConfig(data=["x"], attention="flash_attention_2")
    with pytest.raises(LiandanError, match=r"^attention: flash_attention_2 runs on a CUDA GPU only; this run's device is cpu"):
        prepare.check_attention_kernel(config, torch.device("cpu"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(LiandanError, match=r"attention: flash_attention_2 needs the flash-attn package: pip install flash-attn"):
        prepare.check_attention_kernel(config, torch.device("cuda"))
    prepare.check_attention_kernel(SFTConfig(data=["x"]), torch.device("cpu"))  # not asked for: nothing checked


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn (pip install flash-attn)")
@needs_cuda
def test_flash_attention_packed_rows_equal_padded_rows_on_cuda(tmp_path):
    measured = gpu_check.check_flash(tmp_path)
    assert all(m["token_gap_packed"] < 0.05 for m in measured.values())


# ---------------------------------------------------------------------------------------------
# DPO's reference log-probs: computed on the run's device


def test_full_dpo_computes_its_reference_on_the_runs_device(chat_model_dir, tmp_path, monkeypatch):
    """The reference pass of full fine-tuning runs where the model trains, not on the CPU it
    loaded on: here the 'meta' device stands for a GPU (it computes nothing, so the log-probs
    are faked; what is checked is where the model and the batches are)."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No."} for i in range(5)])
    seen = []

    def where(model, batch):
        seen.append((next(model.parameters()).device.type, {v.device.type for v in batch.values()}))
        return torch.zeros(batch["input_ids"].shape[0])

    monkeypatch.setattr(objectives, "pair_logps", where)
    config = DPOConfig(**settings(chat_model_dir, pairs, tmp_path / "run", full=True, eval_fraction=0.2))
    run = prepare.prepare_dpo(config, tmp_path / "run", main_process=True, resume=False, device=torch.device("meta"))
    assert seen and all(found == ("meta", {"meta"}) for found in seen)
    assert all(item["ref_logps"] == (0.0, 0.0) for item in run.train + run.eval)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # sharded: the whole model stays where it loaded
    assert prepare.reference_device(torch.device("cuda", 0)) == "cpu"


def test_the_reference_log_probs_travel_with_the_batch(chat_model_dir):
    """Precomputed log-probs are a tensor of the micro-batch (the loop moves every tensor of it to
    the device), and the on-the-fly reference (LoRA: adapters off) is computed on the batch's
    device and stays there."""
    from liandan.encoding import encode_pair
    from liandan.preference import PreferencePair
    from liandan.prepare import attach_trainable

    model, tokenizer = load_model(str(chat_model_dir), dtype="float32")
    pair = PreferencePair([{"role": "user", "content": "Q?"}], "Yes.", "No.", "pairs.jsonl:1")
    pairs = [encode_pair(tokenizer, pair, 64) for _ in range(2)]
    batch = objectives.collate_pairs([{**p, "ref_logps": (-1.0, -2.0)} for p in pairs], tokenizer.pad_token_id)
    assert batch["ref_logps"].tolist() == [-1.0, -1.0, -2.0, -2.0]
    model = attach_trainable(model, SFTConfig(data=["x"]), [])
    batch.pop("ref_logps")
    reference = objectives.reference_logps(model, batch)
    assert reference.device == batch["input_ids"].device and not reference.requires_grad


# ---------------------------------------------------------------------------------------------
# The GPU machine's script


def test_gpu_check_plans_its_sections_without_a_gpu(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True
    assert [s["name"] for s in report["sections"]] == ["families", "qlora", "fp16", "flash", "trl"]
    assert all(s["status"] == "planned" and s["details"].startswith(("would run", "would skip")) for s in report["sections"])
    assert sum(s["seconds"] for s in report["sections"]) < 600  # the limits fit a 10-minute command
    assert "qlora" in proc.stdout and "limits add up to" in proc.stdout
