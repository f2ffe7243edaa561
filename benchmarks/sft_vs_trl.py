"""LoRA fine-tuning speed: liandan vs TRL's SFTTrainer, same model, data and settings, one run.

    pip install -e ".[bench]"          # TRL and datasets, for this benchmark only
    python benchmarks/sft_vs_trl.py [--repeats 2] [--count 48] [--model-dir DIR]

Every trainer runs in a fresh process, in turn (liandan, TRL default, TRL padded, TRL packed;
then again for each repeat), on the built-in default model (SmolLM2-135M-Instruct; or the model
directory given with --model-dir) with the same LoRA (rank 16, alpha 32, no dropout, every linear layer), 48 single-exchange chats of 30 to
310 words (`bench_data.py`), 8 chats per optimizer step, one epoch, lr 2e-4 cosine, no warmup,
the reply (and its stop token) trained, the prompt not:

- **liandan**: its defaults (packed rows, per-example attention, bf16 autocast where the CPU has
  it, the output head applied only at trained positions);
- **TRL default**: SFTTrainer with its own defaults for everything that is not the job itself
  (bf16, activation checkpointing on, padded batches);
- **TRL padded / TRL packed**: its fast settings on this hardware: bf16, activation
  checkpointing off, and padded batches or best-fit packing (padding-free rows).

"TRL best" is the fastest TRL run, whichever setting it was: on CPUs with native bf16 its
defaults have come out ahead of its "fast" settings, so a ratio against the fast ones alone would
flatter liandan.

Measured per run: tokens/s over the training loop (all tokens through the model, and trained
tokens; both counted from the data, so the same for every trainer), the loop's wall time, the
whole run's wall time (load, tokenise, train, save), peak RSS of the process, and the final
loss: the trained model's mean loss per trained token over all 48 chats, computed by the same
code for every trainer, in fp32. liandan's achieved FLOP/s is also shown as a share of the bf16
(or fp32) matrix-multiply peak measured on this machine at the model's own layer shapes.

The last line is ``ratio_vs_trl_best: X.XX`` (liandan tokens/s / TRL best tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LR, BATCH, RANK, ALPHA, MAX_LENGTH = 2e-4, 8, 16, 32, 1024
RUNNERS = ["liandan", "trl-default", "trl-padded", "trl-packed"]


# ---------------------------------------------------------------------------------------------
# Children: one training run each, printing one JSON line


def child_liandan(model_dir: str, data: Path, out: Path) -> dict:
    from liandan.config import LoraConfig, SFTConfig
    from liandan.train import train_sft

    config = SFTConfig(model=model_dir, data=[str(data)], output_dir=str(out), epochs=1, batch_size=BATCH,
                       batch_tokens=BATCH * MAX_LENGTH, max_length=MAX_LENGTH, lr=LR, warmup_ratio=0.0,
                       lora=LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.0))  # fmt: skip
    started = time.perf_counter()
    result = train_sft(config)
    wall = time.perf_counter() - started
    return {"loop_seconds": result.seconds, "wall_seconds": wall, "steps": result.steps, "adapter": str(out)}


def child_trl(kind: str, model_dir: str, data: Path, out: Path) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line)["messages"] for line in data.read_text().splitlines()]
    dataset = datasets.Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in rows])
    job = dict(output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LR,
               lr_scheduler_type="cosine", warmup_steps=0, max_length=MAX_LENGTH, logging_steps=1,
               save_strategy="no", report_to=[], seed=0, use_cpu=not torch.cuda.is_available())  # fmt: skip
    fast = {"trl-default": {},
            "trl-padded": dict(bf16=True, gradient_checkpointing=False),
            "trl-packed": dict(bf16=True, gradient_checkpointing=False, packing=True, packing_strategy="bfd")}[kind]  # fmt: skip
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=SFTConfig(**job, **fast), train_dataset=dataset,
                         processing_class=tokenizer, peft_config=lora)  # fmt: skip
    loop_started = time.perf_counter()
    output = trainer.train()
    loop = time.perf_counter() - loop_started
    trainer.save_model(str(out))
    wall = time.perf_counter() - started
    return {"loop_seconds": loop, "wall_seconds": wall, "steps": output.global_step, "adapter": str(out),
            "trl_config": {k: v for k, v in fast.items()}}  # fmt: skip


def final_loss(model_dir: str, adapter: str, data: Path) -> tuple[float, int, int]:
    """Mean loss per trained token of the adapted model over the data (fp32, same code for all),
    and the data's token and trained-token counts."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from liandan.assistant_masks import encode_chat
    from liandan.batching import collate
    from liandan.objectives import micro_batch_loss

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    rows = [json.loads(line)["messages"] for line in data.read_text().splitlines()]
    encoded = [encode_chat(tokenizer, m, MAX_LENGTH) for m in rows]
    total, trained = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), BATCH):
            loss_sum, n = micro_batch_loss(model, collate(encoded[start : start + BATCH], packing=False, pad_id=0))
            total, trained = total + float(loss_sum), trained + n
    tokens = sum(len(e["input_ids"]) for e in encoded)
    return total / trained, tokens, trained


def run_child(name: str, model_dir: str, data: Path, out: Path) -> None:
    import resource

    import transformers

    transformers.logging.set_verbosity_error()
    result = child_liandan(model_dir, data, out) if name == "liandan" else child_trl(name, model_dir, data, out)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the loss pass
    result["final_loss"], result["tokens"], result["trained_tokens"] = final_loss(model_dir, result["adapter"], data)
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The parent: peak, runs in turn, table


def matmul_peak(model_dir: str, dtype_name: str, tokens: int = 2048) -> float:
    """Best GFLOP/s of a (tokens x in) @ (in x out) matmul over the model's linear-layer shapes,
    on the device the trainers ran on (the GPU when there is one)."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    best = 0.0
    for k, n in [(h, h), (h, kv), (h, i), (i, h), (h, config.vocab_size)]:
        a, b = torch.randn(tokens, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        for _ in range(3):
            a @ b
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < 1.0:
            a @ b
            count += 1
        if device == "cuda":  # the products were queued: wait for them before reading the clock
            torch.cuda.synchronize()
        best = max(best, 2 * tokens * k * n * count / (time.perf_counter() - started) / 1e9)
    return best


def training_flops_per_token(model_dir: str, tokens: int, trained: int, seq_sq: float) -> float:
    """Matmul FLOPs of one LoRA step per token: frozen linears forward + input gradient (4 per
    weight), LoRA matrices forward + both gradients (6 per weight), attention scores and values
    (causal, forward + backward), the output head at trained positions only (forward + input
    gradient). ``seq_sq`` is the sum over examples of length^2."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, i, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * i)
    lora = layers * RANK * (2 * (h + h) + 2 * (h + kv) + 3 * (h + i))
    attention = layers * 3 * 2 * h * seq_sq / tokens  # QK^T and PV, causal half, x3 for backward
    head = 4 * h * c.vocab_size * trained / tokens
    return 4 * linear + 6 * lora + attention + head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all trainers (median reported)")
    parser.add_argument("--count", type=int, default=48, help="chats in the data set")
    parser.add_argument("--only", nargs="*", default=RUNNERS, choices=RUNNERS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help="a model directory to train instead of the default model")
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args.child, args.model_dir, Path(args.data), Path(args.out))

    import torch

    import bench_data
    from liandan.default_model import ensure_default_model
    from liandan.devices import cpu_supports_bf16

    model_dir = args.model_dir or str(ensure_default_model())
    work = Path(tempfile.mkdtemp(prefix="liandan-bench-"))
    try:
        data = bench_data.write_chats(work / "chats.jsonl", args.count)
        bf16 = torch.cuda.is_available() or cpu_supports_bf16()
        results: dict[str, list[dict]] = {name: [] for name in args.only}
        for round_ in range(args.repeats):
            for name in args.only:
                out = work / f"{name}-{round_}"
                print(f"[round {round_ + 1}/{args.repeats}] {name} ...", flush=True)
                proc = subprocess.run([sys.executable, __file__, "--child", name, "--model-dir", model_dir,
                                       "--data", str(data), "--out", str(out)],
                                      capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})  # fmt: skip
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
                results[name].append(json.loads(lines[-1][len("RESULT "):]))
                shutil.rmtree(out, ignore_errors=True)  # the trained adapter is not needed any more

        dtype_name = "bfloat16" if bf16 else "float32"
        peak = matmul_peak(model_dir, dtype_name)
        print_table(results, args.count, args.repeats)
        report_efficiency(results, model_dir, data, peak, dtype_name)
    finally:
        shutil.rmtree(work, ignore_errors=True)

def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def print_table(results: dict[str, list[dict]], count: int, repeats: int) -> None:
    first = next(iter(results.values()))[0]
    tokens, trained = first["tokens"], first["trained_tokens"]
    print(f"\n{count} chats, {tokens} tokens ({trained} trained), {first['steps']} steps of {BATCH} chats; "
          f"median of {repeats} run(s) each\n")  # fmt: skip
    print(f"{'trainer':<14}{'tokens/s':>10}{'trained/s':>11}{'loop s':>9}{'run s':>8}{'peak RSS':>11}{'final loss':>12}")
    for name, runs in results.items():
        loop = median(runs, "loop_seconds")
        print(f"{name:<14}{tokens / loop:>10.1f}{trained / loop:>11.1f}{loop:>9.1f}{median(runs, 'wall_seconds'):>8.1f}"
              f"{median(runs, 'peak_rss_mib'):>8.0f} MiB{median(runs, 'final_loss'):>12.4f}")  # fmt: skip


def report_efficiency(results: dict[str, list[dict]], model_dir: str, data: Path, peak: float, dtype_name: str) -> None:
    from transformers import AutoTokenizer

    from liandan.assistant_masks import encode_chat

    speed = {name: runs[0]["tokens"] / median(runs, "loop_seconds") for name, runs in results.items()}
    loss = {name: median(runs, "final_loss") for name, runs in results.items()}
    if "liandan" in speed:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        lengths = [len(encode_chat(tokenizer, json.loads(line)["messages"], MAX_LENGTH)["input_ids"])
                   for line in data.read_text().splitlines()]  # fmt: skip
        first = results["liandan"][0]
        flops = training_flops_per_token(model_dir, first["tokens"], first["trained_tokens"], sum(n * n for n in lengths))
        achieved = speed["liandan"] * flops / 1e9
        print(f"\nliandan: {flops / 1e6:.0f} MFLOP per token -> {achieved:.0f} GFLOP/s, "
              f"{100 * achieved / peak:.1f}% of the measured {dtype_name} matmul peak ({peak:.0f} GFLOP/s)")  # fmt: skip
    trl = {k: v for k, v in speed.items() if k.startswith("trl-")}  # every TRL setting run: the fastest is the peer
    if "liandan" in speed and "trl-default" in speed:
        print(f"liandan vs TRL default: {speed['liandan'] / speed['trl-default']:.2f}x tokens/s")
    if "liandan" in speed and trl:
        best = max(trl, key=trl.get)
        gap = 100 * (loss["liandan"] - loss[best]) / loss[best]
        print(f"TRL best: {best}; final loss liandan {loss['liandan']:.4f} vs {loss[best]:.4f} ({gap:+.2f}%)")
        print(f"ratio_vs_trl_best: {speed['liandan'] / trl[best]:.2f}")


if __name__ == "__main__":
    main()
