"""The GPU paths on one CUDA machine, in under 10 minutes: one prepared script for the day a GPU
is at hand (issue 19). Nothing here has a result until it has run on one.

    pip install -e ".[test,bench,gpu]"              # where a package index is reachable
    python benchmarks/gpu_check.py                  # JSON to --out, default $OUT/gpu_check.json when OUT is set
    python benchmarks/gpu_check.py --dry-run        # any machine: the imports and the plan, nothing run

On a machine without an index, bring the wheels of the extras (bitsandbytes, trl, datasets,
pytest, tokenizers) and install them first. flash-attn is not in an extra (it compiles against the
CUDA toolkit for a long time); where it is installed the flash section runs, else it is skipped.

Sections, each in its own process with its own time limit; one failing or running out of time
does not stop the others:

- **families**: ``tests/test_families.py`` and ``tests/test_speed.py`` on CUDA (the tests pick
  the GPU when there is one): every family's first-step loss equals its own forward, LoRA runs
  merge and reload, packed rows train as padded rows, bf16 keeps fp32 adapters.
- **qlora**: a tiny random Llama with ``quantize: 4bit`` and, as such runs usually have it,
  ``activation_checkpointing``: the base really is 4-bit and no 4-bit
  layer is fused, the loss falls, the run directory holds the adapter only, and the adapter
  reloads merged into the fp32 base with a lower loss on the data than the base.
- **fp16**: the same job under ``mixed_precision: fp16`` with accelerate's loss scaler started
  at 2^24, so that the first steps overflow: they are skipped by the scaler and counted as
  ``scaler_skipped``, more of them than ``max_bad_steps``, and the run still finishes and learns.
- **flash**: ``attention: flash_attention_2`` on packed rows (position ids restarting per
  example, no mask: transformers' variable-length path) gives each token the loss it has in a
  padded row, where one causal sequence over the same row does not; and a packed run follows a
  padded SDPA run's losses.
- **trl**: ``benchmarks/sft_vs_trl.py`` on the GPU, on the default model when it is cached, else
  on a random model of its shapes (the machine may have no network to fetch it).

Prints one table; exits 1 when a section failed or ran out of time (a skipped one does not fail).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "tests")]  # bench_data, sft_vs_trl; the tests' tiny model families


@dataclass(frozen=True)
class Section:
    name: str
    limit_s: int
    """Wall-clock limit of the section's process, start-up included."""
    needs: tuple[str, ...]
    """Modules it imports beyond liandan's own dependencies; without one it is skipped."""
    what: str


SECTIONS = [
    Section("families", 150, ("pytest", "tokenizers"), "tests/test_families.py + tests/test_speed.py on CUDA (pytest -x)"),
    Section("qlora", 60, ("bitsandbytes", "tokenizers"), "quantize: 4bit on a tiny Llama: 4-bit base, loss falls, adapter only, reloads"),
    Section("fp16", 60, ("tokenizers",), "mixed_precision: fp16, loss scale from 2^24: overflows skipped, not divergence"),
    Section("flash", 70, ("flash_attn", "tokenizers"), "flash_attention_2 on packed rows = padded rows, per token and per step"),
    Section("trl", 215, ("trl", "datasets"), "benchmarks/sft_vs_trl.py on the GPU"),
]
"""555 s in all at most, so the whole check fits a 10-minute command. (On this project's 2-core
CPU machine the family matrix with test_speed.py took 65 s, and each of the qlora, fp16 and flash
checks under 10 s with CPU stand-ins for the GPU parts; the trl section is the unknown.)"""

JOB = dict(max_steps=30, lr=1e-2, batch_size=4, batch_tokens=512, max_length=64, warmup_ratio=0.0, seed=0, save_every=0,
           save_every_minutes=0.0, lora={"dropout": 0.0})  # fmt: skip
"""The short SFT job of the qlora and fp16 sections (12 chats, 3 steps an epoch)."""
LOSS_DROP = 0.95
"""A job "learns" when its last loss is below this share of its first. On a CPU (bitsandbytes runs
4-bit layers there too) the QLoRA job went 6.05 -> 5.40, and the fp16 job with a CPU loss scaler
from 2^24 (6 steps skipped) 6.05 -> 5.40; while the scaler skipped steps, the loss stayed within
0.3% of 6.05."""


class Skipped(Exception):
    """A section that cannot run here, and why."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)


# ---------------------------------------------------------------------------------------------
# Helpers the sections (and the CUDA tests in tests/test_gpu_paths.py) share


def tiny_llama(path: Path) -> Path:
    """The tests' tiny chat Llama (32 wide, 2 layers, ChatML; tests/conftest.py). Its norms start
    at 1, so LoRA moves its loss within a few steps (the family matrix's models start theirs
    small and random, which LoRA without the head barely moves in 30 steps)."""
    from conftest import CHATML, build_model_dir

    return build_model_dir(path, CHATML, "<|im_end|>")


def sharp_family_model(path: Path, family: str) -> Path:
    """A tiny model of ``family`` (tests/families.py) initialised with std 0.2 instead of 0.02,
    so that its attention is sharp: one example attending to another moves a token's loss by
    whole nats (on a CPU: 5.3 for llama), far above bf16 rounding, where the family matrix's own
    models move it by 0.002."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import CHATML, build_tokenizer
    from families import family_config

    tokenizer = build_tokenizer(CHATML, "<|im_end|>")
    config = family_config(family, tokenizer)
    config.initializer_range = 0.2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_chats(path: Path, count: int = 12) -> Path:
    from conftest import chat_row, write_jsonl

    return write_jsonl(path, [chat_row(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(count)])


def data_loss(model_spec: str | Path, data: Path, max_length: int = 64) -> float:
    """Mean loss per trained token of a model (a run directory loads merged, in fp32) on the data."""
    import torch

    from liandan.batching import collate
    from liandan.data import read_examples
    from liandan.encoding import encode_all, pad_id
    from liandan.models import load_model, release_model
    from liandan.objectives import micro_batch_loss

    model, tokenizer = load_model(str(model_spec), dtype="float32")
    rows, _ = encode_all(tokenizer, read_examples([str(data)]).examples, max_length)
    batch = {k: v.to(model.device) for k, v in collate(rows, packing=False, pad_id=pad_id(tokenizer)).items()}
    with torch.no_grad():
        total, count = micro_batch_loss(model, batch)
    release_model(model)
    return float(total) / count


@contextmanager
def watched_speed_ups(seen: dict) -> Iterator[None]:
    """Record, as the loop sets up its speed-ups, how many of the model's weights are 4-bit and
    how many LoRA layers it fused (`liandan.lora_fusion` must leave 4-bit layers alone)."""
    import liandan.training_setup as setup
    from liandan.quantization import quantized_layers

    original = setup.fuse_lora_layers

    def fuse_and_count(model):
        unfuse = original(model)
        seen["quantized_weights"] = quantized_layers(model)
        seen["fused_layers"] = sum("forward" in m.__dict__ for m in model.modules())
        return unfuse

    setup.fuse_lora_layers = fuse_and_count
    try:
        yield
    finally:
        setup.fuse_lora_layers = original


@contextmanager
def loss_scale_from(init_scale: float) -> Iterator[None]:
    """The loop's Accelerator with its fp16 loss scaler starting at ``init_scale`` (and never
    growing back), so that the first steps overflow and the scaler has to calibrate."""
    import liandan.train as train
    from accelerate.utils import GradScalerKwargs

    original = train.Accelerator

    class HighInitialScale(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, kwargs_handlers=[GradScalerKwargs(init_scale=init_scale, growth_interval=10**6)], **kwargs)

    train.Accelerator = HighInitialScale
    try:
        yield
    finally:
        train.Accelerator = original


# ---------------------------------------------------------------------------------------------
# The sections: each returns what it measured, raises AssertionError when a check fails


def run_families(work: Path, limit_s: float) -> dict:
    report = work / "families.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"--junitxml={report}",
           "tests/test_families.py", "tests/test_speed.py"]  # fmt: skip
    rc, output, timed_out = run_capped(cmd, limit_s - 5, cwd=ROOT)
    counts = {}
    if report.is_file():
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    last = output.strip().splitlines()[-1] if output.strip() else ""
    check(not timed_out, f"pytest ran past {limit_s - 5:.0f} s: {counts}")
    check(rc == 0, f"pytest exited {rc}: {last} {counts}")
    return {**counts, "last_line": last}


def check_qlora(work: Path) -> dict:
    import torch

    from liandan.config import SFTConfig
    from liandan.train import train_sft

    model_dir = tiny_llama(work / "llama")
    data = write_chats(work / "chats.jsonl")
    run = work / "qlora"
    seen: dict = {}
    torch.cuda.reset_peak_memory_stats()
    with watched_speed_ups(seen):
        result = train_sft(SFTConfig(model=str(model_dir), data=[str(data)], output_dir=str(run), quantize="4bit",
                                     activation_checkpointing=True, **JOB))  # fmt: skip
    peak_mib = torch.cuda.max_memory_allocated() / 2**20
    files = sorted(p.name for p in run.iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    base, merged = data_loss(model_dir, data), data_loss(run, data)
    measured = {"losses": [round(x, 4) for x in (result.losses[0], result.losses[-1])], **seen, "peak_gpu_mib": round(peak_mib, 1),
                "base_loss": round(base, 4), "merged_loss": round(merged, 4), "files": files}  # fmt: skip
    check(seen.get("quantized_weights", 0) > 0, f"the base was not 4-bit while training: {measured}")
    check(seen.get("fused_layers", -1) == 0, f"LoRA layers over 4-bit weights were fused: {measured}")
    check(result.losses[-1] < LOSS_DROP * result.losses[0], f"the loss did not fall: {measured}")
    check("adapter_model.safetensors" in files and not any(f.startswith("model") for f in files), f"not an adapter-only run: {files}")
    check(manifest["method"] == "qlora" and manifest["quantize"]["quant_type"] == "nf4", f"manifest: {manifest.get('quantize')}")
    check(merged < base, f"the reloaded adapter (merged into the fp32 base) does not fit the data better than the base: {measured}")
    return measured


def check_fp16(work: Path) -> dict:
    from liandan.config import SFTConfig
    from liandan.train import train_sft

    model_dir = tiny_llama(work / "llama")
    data = write_chats(work / "chats.jsonl")
    run = work / "fp16"
    with loss_scale_from(2.0**24):
        result = train_sft(SFTConfig(model=str(model_dir), data=[str(data)], output_dir=str(run), mixed_precision="fp16",
                                     max_bad_steps=2, **JOB))  # fmt: skip
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    measured = {"losses": [round(x, 4) for x in (result.losses[0], result.losses[-1])], "scaler_skipped": last.get("scaler_skipped"),
                "skipped_steps": last["skipped_steps"], "loss_scale": [metrics[0].get("loss_scale"), last.get("loss_scale")]}  # fmt: skip
    check(last.get("scaler_skipped", 0) > 2, f"fewer overflow steps than max_bad_steps: the scaler's path was not exercised: {measured}")
    check(last["skipped_steps"] == 0, f"overflow steps were counted as divergence: {measured}")
    check(result.losses[-1] < LOSS_DROP * result.losses[0], f"the loss did not fall: {measured}")
    return measured


def flash_token_losses(model_dir: Path, data: Path) -> dict[str, Any]:
    """Per-token losses of the same examples in bf16 with flash_attention_2: padded rows, one
    packed row (position ids restarting at each example), and the packed row read as one causal
    sequence (position ids 0..T-1), which lets examples attend to each other."""
    import torch

    from liandan.batching import collate
    from liandan.data import read_examples
    from liandan.encoding import encode_all, pad_id
    from liandan.models import load_model, release_model
    from liandan.objectives import trained_token_nll

    model, tokenizer = load_model(str(model_dir), dtype="bfloat16")  # the GPU, where there is one
    model.set_attn_implementation("flash_attention_2")
    rows, _ = encode_all(tokenizer, read_examples([str(data)]).examples[:6], 64)
    padded = collate(rows, packing=False, pad_id=pad_id(tokenizer))
    packed = collate(rows, packing=True, pad_id=pad_id(tokenizer))  # as the loop hands it over
    joined = {k: v for k, v in packed.items() if k != "cu_seq_lens_q"}
    joined["position_ids"] = torch.arange(packed["input_ids"].shape[1])[None]
    out = {}
    with torch.no_grad():
        for name, batch in (("padded", padded), ("packed", packed), ("joined", joined)):
            out[name] = trained_token_nll(model, {k: v.to(model.device) for k, v in batch.items()})[0].float().cpu()
    release_model(model)
    return out


def check_flash(work: Path) -> dict:
    from liandan.config import SFTConfig
    from liandan.train import train_sft

    if importlib.util.find_spec("flash_attn") is None:
        raise Skipped("flash_attn is not installed (pip install flash-attn)")
    data = write_chats(work / "chats.jsonl")
    measured = {}
    for family in ("llama", "mistral"):  # mistral: an 8-token sliding window inside the kernel
        model_dir = sharp_family_model(work / family, family)
        losses = flash_token_losses(model_dir, data)
        packed_gap = float((losses["packed"] - losses["padded"]).abs().max())
        joined_gap = float((losses["joined"] - losses["padded"]).abs().max())
        runs = {}
        for name, options in (("packed", dict(attention="flash_attention_2", packing=True)), ("padded", dict(attention="sdpa", packing=False))):
            job = {**JOB, "max_steps": 10, "mixed_precision": "bf16", **options}
            runs[name] = train_sft(SFTConfig(model=str(model_dir), data=[str(data)], output_dir=str(work / f"{family}-{name}"), **job)).losses
        gaps = [abs(a - b) / abs(b) for a, b in zip(runs["packed"], runs["padded"])]
        measured[family] = {"token_gap_packed": round(packed_gap, 5), "token_gap_one_sequence": round(joined_gap, 5),
                            "first_step_rel_gap": round(gaps[0], 5), "step_loss_rel_gap": round(max(gaps), 5)}  # fmt: skip
        # bf16 rounds the two layouts' matmuls differently: a token's loss may move by a few hundredths
        check(packed_gap < 0.25, f"{family}: packed rows under flash attention differ from padded rows: {measured[family]}")
        if family == "llama":  # (mistral's 8-token window keeps the examples' answers out of each other's reach)
            check(joined_gap > 4 * 0.25, f"{family}: the check cannot tell packed rows from one sequence: {measured[family]}")
        # the same weights at the first step; bf16 rounding then lets the two runs drift apart a little
        check(gaps[0] < 0.01 and max(gaps) < 0.05, f"{family}: a packed flash run does not follow the padded run's losses: {measured[family]}")
    return measured


def smollm_shaped_model(path: Path) -> Path:
    """A random Llama with SmolLM2-135M's shapes (576 wide, 30 layers, 9 heads, 3 KV heads, tied
    head) and the tests' ChatML tokenizer: the benchmark's model where the default one is not cached."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import CHATML, build_tokenizer

    tokenizer = build_tokenizer(CHATML, "<|im_end|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_trl(work: Path, limit_s: float) -> dict:
    from liandan.default_model import default_model_dir

    cached = default_model_dir()
    if (cached / "config.json").is_file() and (cached / "liandan-source.json").is_file():
        model_dir, model = cached, "default (SmolLM2-135M-Instruct)"
    else:
        model_dir, model = smollm_shaped_model(work / "smollm-shaped"), "random, SmolLM2-135M's shapes, 400-token vocabulary"
    cmd = [sys.executable, str(HERE / "sft_vs_trl.py"), "--model-dir", str(model_dir)]
    rc, output, timed_out = run_capped(cmd, limit_s - 10, cwd=ROOT)
    lines = output.strip().splitlines()
    ratio = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("ratio_vs_trl_best:")), None)
    measured = {"model": model, "ratio_vs_trl_best": ratio, "output": lines[-14:]}
    check(not timed_out, f"sft_vs_trl.py ran past {limit_s - 10:.0f} s: {measured}")
    check(rc == 0, f"sft_vs_trl.py exited {rc}: {lines[-5:]}")
    return measured


CHECKS = {"families": run_families, "qlora": check_qlora, "fp16": check_fp16, "flash": check_flash, "trl": run_trl}


# ---------------------------------------------------------------------------------------------
# Running the sections


def run_capped(cmd: list[str], limit_s: float, cwd: Path | None = None) -> tuple[int, str, bool]:
    """(exit code, stdout + stderr, whether it ran out of time). The command runs in its own
    process group, killed whole at the limit (pytest and the benchmark start processes of their own)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"})  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=max(limit_s, 1))
        return proc.returncode, output, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return proc.returncode, output, True


def run_section(name: str, result_path: Path) -> None:
    """The child: one section, its outcome as JSON in ``result_path``."""
    section = next(s for s in SECTIONS if s.name == name)
    started = time.perf_counter()
    outcome: dict = {"name": name}
    try:
        missing = [m for m in section.needs if importlib.util.find_spec(m) is None]
        if missing:
            raise Skipped(f"not installed: {', '.join(missing)}")
        with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as tmp:
            work = Path(tmp)
            check_fn = CHECKS[name]
            # the two that run a command of their own give it the section's time, less a margin to report
            details = check_fn(work, section.limit_s) if name in ("families", "trl") else check_fn(work)
        outcome.update(status="passed", details=details)
    except Skipped as exc:
        outcome.update(status="skipped", details=str(exc))
    except Exception as exc:  # a failed check or a crash: reported, and the other sections still run
        outcome.update(status="failed", details=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
    outcome["seconds"] = round(time.perf_counter() - started, 1)
    result_path.write_text(json.dumps(outcome, default=str))


def run_all(names: list[str]) -> list[dict]:
    outcomes = []
    for section in [s for s in SECTIONS if s.name in names]:
        print(f"[{section.name}] {section.what} (limit {section.limit_s} s) ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            started = time.perf_counter()
            rc, output, timed_out = run_capped([sys.executable, __file__, "--section", section.name, "--result", str(result)],
                                               section.limit_s)  # fmt: skip
            if result.is_file():
                outcome = json.loads(result.read_text())
            else:
                status = "timeout" if timed_out else "failed"
                outcome = {"name": section.name, "status": status, "seconds": round(time.perf_counter() - started, 1),
                           "details": f"no result (exit {rc}); last output: {output.strip().splitlines()[-3:]}"}  # fmt: skip
        outcome["log_tail"] = output[-3000:]
        outcomes.append(outcome)
        print(f"[{section.name}] {outcome['status']} in {outcome['seconds']} s", flush=True)
    return outcomes


def print_table(outcomes: list[dict]) -> None:
    print(f"\n{'section':<10}{'status':<9}{'seconds':>8}  details")
    for o in outcomes:
        details = o["details"] if isinstance(o["details"], str) else json.dumps(o["details"], default=str)
        print(f"{o['name']:<10}{o['status']:<9}{o['seconds']:>8}  {details[:300]}")


def plan(names: list[str]) -> list[dict]:
    """--dry-run: import what the sections import, and say what each would do or why it would be skipped."""
    import torch

    import liandan.prepare  # noqa: F401  the modules the sections drive
    import liandan.quantization  # noqa: F401
    import liandan.train  # noqa: F401
    import sft_vs_trl  # noqa: F401
    from families import FAMILIES

    outcomes = []
    for section in [s for s in SECTIONS if s.name in names]:
        missing = [m for m in section.needs if importlib.util.find_spec(m) is None]
        status = f"would skip (not installed: {', '.join(missing)})" if missing else "would run"
        outcomes.append({"name": section.name, "status": "planned", "seconds": section.limit_s, "details": f"{status}: {section.what}"})
    print(f"CUDA: {torch.cuda.is_available()}; families: {', '.join(FAMILIES)}; "
          f"limits add up to {sum(s.limit_s for s in SECTIONS if s.name in names)} s")  # fmt: skip
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None
    parser.add_argument("--out", type=Path, default=default_out, help="JSON results (default: $OUT/gpu_check.json when OUT is set)")
    parser.add_argument("--sections", nargs="*", default=[s.name for s in SECTIONS], choices=[s.name for s in SECTIONS])
    parser.add_argument("--dry-run", action="store_true", help="check the imports and print the plan; run nothing (no GPU needed)")
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.section:
        run_section(args.section, args.result)
        return 0

    import torch

    if args.dry_run:
        outcomes = plan(args.sections)
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine, or use --dry-run to check the plan", file=sys.stderr)
        return 2
    else:
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
        outcomes = run_all(args.sections)
    print_table(outcomes)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"gpu": None if args.dry_run else torch.cuda.get_device_name(), "torch": torch.__version__,
                  "dry_run": args.dry_run, "sections": outcomes}  # fmt: skip
        args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"\nwritten: {args.out}")
    return 1 if any(o["status"] in ("failed", "timeout") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
