"""Scaling: liandan vs TRL's best configuration at the shapes of 135M, 360M and 1.7B Llama-family
models, LoRA and full fine-tuning, sequences of 512, 2048 and 8192 tokens, in one run, on the CPU.

    pip install -e ".[bench]"          # TRL and datasets, for the benchmarks only
    python benchmarks/scaling.py --out runs/scaling [--sizes 135m,360m,1.7b] [--seqs 512,2048,8192]
        [--modes lora,full] [--trainers liandan,trl] [--steps 3] [--repeats 1] [--max-seconds 3600] [--profile]

**The models** have the shapes of SmolLM2 (`SHAPES`: Llama architecture, 49,152-token vocabulary,
tied embeddings, head dim 64, RMSNorm eps 1e-5, 8,192 positions), random weights (seed 0,
transformers' own initialisation), nothing downloaded. Each is built once in its own process and
saved with ``save_pretrained`` in fp32, with the SmolLM2 tokenizer of liandan's built-in model:
both trainers load the same weights through their normal loading path (``from_pretrained``), as
they would a real model. That costs a write and a read (7 GB at 1.7B) but keeps a model's memory
out of every process but the one that trains on it.

**The job** is language modelling on raw text, every token trained: liandan's ``train_pretrain``
(the text cut into blocks of exactly ``seq`` tokens by `liandan.encoding.text_blocks`) and TRL's
SFTTrainer on the very same blocks as a tokenized language-modelling data set (``input_ids``;
its labels are the inputs, shifted inside the model's loss). Both train ``seq - 1`` targets a
row; the text is cut so that every block is full, so no padding exists and the tokens counted are
the tokens computed. A step is ``max(1, step_tokens // seq)`` rows (2,048 tokens at seq 512 and
2048, one row of 8,192 at seq 8192), lr 1e-4 cosine, no warmup, AdamW, gradient clipping at 1.0;
LoRA rank 16, alpha 32, no dropout, on every linear layer but the head. This measures the loop and
the kernels, not the batching: with chats of mixed lengths (`sft_vs_trl.py`) liandan's packing
also saves the compute TRL spends on padding. liandan packs a step's blocks into one row, each
block attending only to itself (`liandan.attention`: batched matmuls up to 512 tokens, SDPA per
block above); TRL's rows are the blocks, under the model's SDPA.

**liandan**: its defaults (bf16 autocast where the CPU computes bf16, frozen weights stored in
bf16 under LoRA, the head and loss in chunks at trained positions, the fused LoRA layers).
**TRL best**: SFTTrainer with the same precision as liandan (bf16 where the CPU has it, else fp32:
a CPU without bf16 only emulates it, slowly), no activation checkpointing (its default turns it
on), the rows as they are (padding and packing are the same here, every row being full); where
that would not fit in memory and checkpointing would, TRL checkpoints activations, and the table
says so. The same rule for liandan (``activation_checkpointing``): on only where it would not fit
without. TRL's own defaults are measured in `sft_vs_trl.py`.

**Measured** per cell (size, mode, seq) and trainer, each run in a fresh process so that its peak
RSS is its own, the trainers in turn, ``--repeats`` rounds: tokens/s, the median over the measured
steps after ``--warmup`` discarded ones (then the median over rounds); the peak RSS of the
process, loading included; with ``--profile``, for liandan, where the time of one more step goes
(`scaling_profile.py`). Per size, the matmul peak of this machine at the model's layer shapes in
the compute dtype (`sft_vs_trl.matmul_peak`), and each trainer's achieved GFLOP/s as a share of it
(`flops_per_token`). A run that would not fit in the memory available (`estimate_gib`) is skipped
with the reason; one that grows past it, or runs past ``--max-seconds``, is stopped. The children
see no GPU: this is the CPU benchmark.

Writes ``results.json``, ``scaling.md`` (the tables) and ``scaling.svg`` (tokens/s and peak
memory by size, liandan beside TRL, a pair of charts per mode and sequence length) in ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ROOT = HERE.parent
CORPUS = ROOT / "examples" / "corpus" / "train.txt"
LR, RANK, ALPHA = 1e-4, 16, 32
VOCAB, POSITIONS = 49152, 8192
TRAINERS, MODES = ("liandan", "trl"), ("lora", "full")
GIB = 1024**3


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    rope_theta: float
    vocab: int = VOCAB

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def linear_params(self) -> int:
        """Weights of the layers' linear maps (q, k, v, o, gate, up, down)."""
        h, kv, i = self.hidden, self.kv_width, self.intermediate
        return self.layers * (2 * h * h + 2 * h * kv + 3 * h * i)

    def lora_params(self, rank: int = RANK) -> int:
        h, kv, i = self.hidden, self.kv_width, self.intermediate
        return self.layers * rank * (2 * (h + h) + 2 * (h + kv) + 3 * (h + i))

    def params(self) -> int:
        """All weights: embeddings (tied with the head), layers and norms."""
        return self.vocab * self.hidden + self.linear_params() + (2 * self.layers + 1) * self.hidden


SHAPES = {
    # SmolLM2's configs (HuggingFaceTB/SmolLM2-{135M,360M,1.7B}): rope_theta 100,000 for the two
    # small ones, 130,000 for 1.7B; the 1.7B model has as many key/value heads as query heads.
    "135m": Shape("SmolLM2-135M", 576, 1536, 30, 9, 3, 100_000.0),
    "360m": Shape("SmolLM2-360M", 960, 2560, 32, 15, 5, 100_000.0),
    "1.7b": Shape("SmolLM2-1.7B", 2048, 8192, 24, 32, 32, 130_000.0),
    # Not offered in --help: the test's shape, with a tokenizer of 512 tokens trained on the corpus.
    "tiny": Shape("tiny", 64, 128, 2, 4, 2, 10_000.0, vocab=512),
}


# ---------------------------------------------------------------------------------------------
# Children: build a model, or train one cell; each prints one RESULT line


def build_model(size: str, out: Path) -> dict:
    """The random model of ``size`` and its tokenizer, saved in fp32 (seed 0)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from liandan.default_model import ensure_default_model

    shape = SHAPES[size]
    tokenizer = tiny_tokenizer() if size == "tiny" else AutoTokenizer.from_pretrained(ensure_default_model())
    config = LlamaConfig(
        vocab_size=max(shape.vocab, len(tokenizer)), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.hidden // shape.heads, max_position_embeddings=POSITIONS, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta}, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters())}


def tiny_tokenizer():
    """A byte-level BPE of 512 tokens trained on the corpus, with ChatML tokens and template (so
    liandan adds none), for the tiny shape: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from liandan.chat import CHATML_TEMPLATE

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    raw.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")  # fmt: skip
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def train_liandan(cell: dict, model_dir: str, text: str, out: Path, profile: bool) -> dict:
    from liandan.config import LoraConfig, PretrainConfig
    from liandan.train import train_pretrain

    rows, seq = cell["rows"], cell["seq"]
    total = cell["warmup"] + cell["steps"] + profile
    config = PretrainConfig(model=model_dir, data=[text], output_dir=str(out), full=cell["mode"] == "full",
                            lora=LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.0), lr=LR, warmup_ratio=0.0,
                            max_steps=total, batch_tokens=rows * seq, batch_size=rows, max_length=seq,
                            save_every=0, save_every_minutes=0.0, activation_checkpointing=cell["checkpointing"])  # fmt: skip
    window = None
    if profile:
        from scaling_profile import StepProfile

        window = StepProfile(total)
    train_pretrain(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [rows * seq / r["tokens_per_second"] for r in records]
    result = {"step_seconds": seconds[: cell["warmup"] + cell["steps"]], "losses": [r["loss"] for r in records],
              "trained_tokens": [r["trained_tokens"] for r in records]}  # fmt: skip
    if window is not None:
        result["profile"] = {"shares": window.shares, "seconds": window.seconds}
    return result


def train_trl(cell: dict, model_dir: str, text: str, out: Path, bf16: bool) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from liandan.data import read_texts
    from liandan.encoding import text_blocks

    rows, seq = cell["rows"], cell["seq"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    blocks, _ = text_blocks(tokenizer, read_texts([text]), seq)  # liandan's blocks, token for token
    if any(len(b["input_ids"]) != seq for b in blocks):
        raise RuntimeError(f"{text}: a block is not {seq} tokens long")
    dataset = datasets.Dataset.from_dict({"input_ids": [b["input_ids"] for b in blocks]})
    steps: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(time.perf_counter() - self.started)

    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=rows, gradient_accumulation_steps=1,
                     max_steps=cell["warmup"] + cell["steps"], learning_rate=LR, lr_scheduler_type="cosine",
                     warmup_steps=0, max_length=seq, logging_steps=1, save_strategy="no", report_to=[], seed=0,
                     use_cpu=True, bf16=bf16, fp16=False,
                     gradient_checkpointing=cell["checkpointing"])  # fmt: skip
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora if cell["mode"] == "lora" else None, callbacks=[StepTimer()])  # fmt: skip
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    seen = [0] + [int(r["num_tokens"]) for r in logs]  # input tokens so far, padding included
    return {"step_seconds": steps, "losses": [r["loss"] for r in logs], "tokens": [b - a for a, b in itertools.pairwise(seen)]}


def run_child(args: argparse.Namespace) -> None:
    import resource

    import transformers

    transformers.logging.set_verbosity_error()
    if args.child == "build":
        result = build_model(args.size, Path(args.model_dir))
    else:
        cell = json.loads(args.cell)
        out = Path(args.child_out)
        if cell["trainer"] == "liandan":
            result = train_liandan(cell, args.model_dir, args.text, out, cell["profiled"])
        else:
            result = train_trl(cell, args.model_dir, args.text, out, cell["bf16"])
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Estimates made before a cell runs


ACTIVATIONS = {"liandan": 1.35, "trl": 2.3}
"""Memory a token costs, measured, over `activation_bytes`: the slope of peak RSS between 512 and
2,048 tokens a step (135M shape, LoRA, fp32): 1.88 MB a token for liandan, 3.27 MB for TRL."""


def activation_bytes(shape: Shape, bf16: bool) -> int:
    """Bytes kept for backward per token and layer, by count: the inputs of every matmul, norm,
    rotary embedding and SiLU, about 7h + 3kv + 4i values in the compute dtype, and the fp32
    residual stream (8h bytes)."""
    e = 2 if bf16 else 4
    h, kv, i = shape.hidden, shape.kv_width, shape.intermediate
    return e * (7 * h + 3 * kv + 4 * i) + 8 * h


def estimate_gib(shape: Shape, mode: str, trainer: str, tokens: int, seq: int, bf16: bool, checkpointing: bool = False) -> float:
    """Peak memory of a run, roughly, to skip what cannot fit before it starts (a run that grows
    past the memory available is stopped anyway). Both trainers load fp32 weights; full
    fine-tuning adds fp32 gradients and AdamW's two moments (16 bytes a weight in all). Under
    LoRA with bf16 autocast TRL keeps the fp32 weights and autocast saves a bf16 copy of each for
    backward (liandan stores them in bf16 only, after loading them in fp32). Activations:
    `activation_bytes` a token and layer, times what each trainer was measured to keep
    (`ACTIVATIONS`); with activation checkpointing, each layer's fp32 input and one layer's
    activations. liandan's blocks of up to `liandan.attention.EAGER_MAX` tokens (``seq``) attend
    with batched matmuls, whose (heads x seq x seq) probabilities each layer keeps for backward
    (`attention_probability_bytes`). 0.6 GiB for Python and the libraries."""
    p = shape.params()
    weights = 16 * p if mode == "full" else 4 * p + (2 * p if trainer == "trl" and bf16 else 0)
    layers = 1 if checkpointing else shape.layers
    activations = ACTIVATIONS[trainer] * tokens * layers * activation_bytes(shape, bf16)
    if trainer == "liandan":
        activations += tokens * layers * attention_probability_bytes(shape, seq, bf16)
    if checkpointing:
        activations += tokens * shape.layers * 4 * shape.hidden
    return (weights + activations) / GIB + 0.6


def attention_probability_bytes(shape: Shape, seq: int, bf16: bool) -> int:
    """Bytes a token's attention probabilities take in one layer under liandan's packed attention:
    a query's row of ``seq`` probabilities for each head, in the compute dtype, where blocks of
    ``seq`` tokens attend with batched matmuls (SDPA keeps none above that). Without them the
    estimate of the bf16 grid's 512-token cells was 0.8 to 1.0 GiB under the measured peak (135M
    and 360M LoRA), where the 2,048-token cells were 0.4 under."""
    from liandan.attention import EAGER_MAX

    return shape.heads * seq * (2 if bf16 else 4) if seq <= EAGER_MAX else 0


def flops_per_token(shape: Shape, mode: str, seq: int) -> float:
    """Matmul FLOPs per token of one training step (a multiply-add is 2 FLOPs).

    Full: 6 N (forward 2, the input gradient 2, the weight gradient 2) for N = the layers' linear
    weights + the tied head (vocab x hidden). LoRA: 4 per frozen weight (no weight gradient), 6 per
    adapter weight, 4 per head weight. Attention, causal, a query attends (t+1) keys: QK^T and PV
    are 2 x 2 h (t+1) forward, ~2 h seq on average per layer, x3 with backward. The head's last
    position per row (no target) is counted; it is 1 in ``seq``."""
    head = shape.vocab * shape.hidden
    attention = 6 * shape.layers * shape.hidden * seq
    if mode == "full":
        return 6 * (shape.linear_params() + head) + attention
    return 4 * shape.linear_params() + 6 * shape.lora_params() + 4 * head + attention


def available_gib() -> float:
    """What a run may use with everything else on the machine left as it is (MemAvailable)."""
    import psutil

    return psutil.virtual_memory().available / GIB


# ---------------------------------------------------------------------------------------------
# The parent


def write_text(tokenizer, path: Path, seq: int, blocks: int) -> None:
    """The corpus, repeated and then cut, so that liandan's blocks of ``seq`` tokens number exactly
    ``blocks``, all full: the tail left over (under 16 tokens) is dropped by `text_blocks`."""
    corpus = CORPUS.read_text(encoding="utf-8")
    need = seq * blocks

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids) + 1  # + EOS, as text_blocks adds

    text = corpus
    while count(text) < need:
        text += "\n\n" + corpus
    lo, hi = 1, len(text)  # the shortest prefix with enough tokens; the tail is then a token or two
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(text[:mid]) < need else (lo, mid)
    path.write_text(text[:lo], encoding="utf-8")
    tail = count(text[:lo]) - need
    if not 0 <= tail < 16:
        sys.exit(f"could not cut the corpus into {blocks} full blocks of {seq} tokens (tail of {tail})")


def run_process(argv: list[str], max_seconds: float, limit_gib: float | None = None) -> tuple[dict | None, str]:
    """Run a child in its own process group; (its RESULT, "") or (None, why it has none). It is
    stopped when it runs past ``max_seconds``, when its memory passes ``limit_gib`` (the estimate
    that let it start was wrong), or when the machine is nearly out of memory."""
    import psutil

    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen([sys.executable, __file__, *argv], stdout=stdout, stderr=stderr, text=True, env=env,
                                start_new_session=True)  # fmt: skip
        started, why = time.monotonic(), ""
        while proc.poll() is None and not why:
            time.sleep(0.5)
            try:
                family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                used = sum(p.memory_info().rss for p in family) / GIB
            except psutil.NoSuchProcess:
                used = 0.0
            if time.monotonic() - started > max_seconds:
                why = f"timed out after {max_seconds:.0f} s"
            elif limit_gib and used > limit_gib:
                why = f"stopped: used over {limit_gib:.1f} GiB, the memory available when it started"
            elif available_gib() < 0.25:
                why = "stopped: the machine ran out of memory"
        if why:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None, why
        stdout.seek(0)
        stderr.seek(0)
        lines = [line for line in stdout.read().splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            killed = " (killed: out of memory?)" if proc.returncode == -signal.SIGKILL else ""
            return None, f"failed, exit {proc.returncode}{killed}: {stderr.read().strip()[-2000:]}"
    return json.loads(lines[-1][len("RESULT ") :]), ""


def run_cell(cell: dict, model_dir: Path, text: Path, work: Path, max_seconds: float, limit_gib: float) -> dict:
    """One run of one trainer on one cell."""
    out = work / f"run-{cell['trainer']}"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result, why = run_process(["--child", "train", "--cell", json.dumps(cell), "--model-dir", str(model_dir),
                               "--text", str(text), "--child-out", str(out)], max_seconds, limit_gib)  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    wall = time.perf_counter() - started
    if result is None:
        return {"status": why, "wall_seconds": wall}
    tokens = cell["rows"] * cell["seq"]
    speed = tokens / statistics.median(result["step_seconds"][cell["warmup"] :])
    return {**result, "status": "ok", "wall_seconds": wall, "tokens_per_second": speed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="135m,360m,1.7b", help="comma-separated: 135m, 360m, 1.7b")
    parser.add_argument("--seqs", default="512,2048,8192", help="comma-separated sequence lengths")
    parser.add_argument("--modes", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--trainers", default="liandan,trl", help="comma-separated: liandan, trl")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per run (tokens/s is their median)")
    parser.add_argument("--warmup", type=int, default=1, help="steps run first and not measured")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each trainer per cell, interleaved (median)")
    parser.add_argument("--step-tokens", type=int, default=2048, help="tokens per step: max(1, this // seq) rows")
    parser.add_argument("--max-seconds", type=float, default=3600, help="a run lasting longer is stopped")
    parser.add_argument("--memory-gib", type=float, help="memory a run may use (default: MemAvailable when it starts)")
    parser.add_argument("--checkpointing", choices=["auto", "always"], default="auto",
                        help="activation checkpointing: auto (each trainer only where a run would not fit without) "
                             "or always (both trainers in every run: what it costs and saves)")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="liandan runs: where one more step's time goes")
    parser.add_argument("--out", default="runs/scaling", help="directory for results.json, scaling.md, scaling.svg")
    parser.add_argument("--child", choices=["build", "train"], help=argparse.SUPPRESS)
    for hidden in ("--size", "--cell", "--model-dir", "--text", "--child-out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU benchmark, here and in every child, even beside a GPU
    if args.child:
        return run_child(args)
    plan = parse_plan(parser, args)
    results = run_grid(args, plan)
    from scaling_report import write_outputs

    write_outputs(results, Path(args.out))


def parse_plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    def words(option: str, value: str, allowed) -> list[str]:
        items = [w.strip().lower() for w in value.split(",") if w.strip()]
        if not items or any(w not in allowed for w in items):
            shown = ", ".join(w for w in allowed if w != "tiny")  # the tests' shape is not offered
            parser.error(f"{option}: expected a comma-separated list of {shown} (got {value!r})")
        return items

    sizes = words("--sizes", args.sizes, SHAPES)
    modes, trainers = words("--modes", args.modes, MODES), words("--trainers", args.trainers, TRAINERS)
    try:
        seqs = [int(s) for s in args.seqs.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seqs: expected comma-separated numbers of tokens (got {args.seqs!r})")
    if not seqs or min(seqs) < 16 or max(seqs) > POSITIONS:
        parser.error(f"--seqs: each between 16 and {POSITIONS} tokens (got {args.seqs!r})")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1, --warmup 0 or more")
    if "trl" in trainers:
        try:
            import trl  # noqa: F401
        except ImportError:
            parser.error('--trainers trl needs TRL: pip install -e ".[bench]" (or --trainers liandan)')
    return {"sizes": sizes, "seqs": seqs, "modes": modes, "trainers": trainers}


def run_grid(args: argparse.Namespace, plan: dict) -> dict:

    from liandan.devices import cpu_supports_bf16

    bf16 = cpu_supports_bf16()
    settings = {k: getattr(args, k) for k in ("steps", "warmup", "repeats", "step_tokens", "max_seconds", "profile",
                                              "checkpointing")}  # fmt: skip
    results = {"machine": machine(bf16), "settings": {**settings, "lr": LR, "lora_rank": RANK, "lora_alpha": ALPHA},
               "sizes": {}, "cells": []}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="liandan-scaling-"))
    try:
        for size in plan["sizes"]:
            cells = [{"size": size, "mode": mode, "seq": seq, "rows": max(1, args.step_tokens // seq), "trainer": trainer,
                      "bf16": bf16, "steps": args.steps, "warmup": args.warmup, "profiled": args.profile and trainer == "liandan"}
                     for mode in plan["modes"] for seq in plan["seqs"] for trainer in plan["trainers"]]  # fmt: skip
            for cell in cells:
                plan_memory(cell, args, bf16)
            if all(cell["estimate_gib"] > memory_limit(args) for cell in cells):
                results["cells"] += [{**cell, "status": skip_reason(cell, args)} for cell in cells]
                print(f"[{size}] every run skipped: {skip_reason(cells[0], args)}", flush=True)
                continue
            results["cells"] += run_size(size, cells, args, bf16, work, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def plan_memory(cell: dict, args: argparse.Namespace, bf16: bool) -> None:
    """The cell's memory estimate, and whether the trainer checkpoints activations: only when it
    would not fit without (each trainer's best configuration that fits), or in every run with
    ``--checkpointing always``."""
    shape, tokens = SHAPES[cell["size"]], cell["rows"] * cell["seq"]
    cell["checkpointing"] = False
    seq = cell["seq"]
    cell["estimate_gib"] = estimate_gib(shape, cell["mode"], cell["trainer"], tokens, seq, bf16)
    if args.checkpointing == "always":
        cell["checkpointing"] = True
        cell["estimate_gib"] = estimate_gib(shape, cell["mode"], cell["trainer"], tokens, seq, bf16, checkpointing=True)
    elif cell["estimate_gib"] > memory_limit(args):
        saving = estimate_gib(shape, cell["mode"], cell["trainer"], tokens, seq, bf16, checkpointing=True)
        if saving <= memory_limit(args):
            cell["checkpointing"], cell["estimate_gib"] = True, saving
    cell["flops_per_token"] = flops_per_token(shape, cell["mode"], cell["seq"])


def memory_limit(args: argparse.Namespace) -> float:
    return args.memory_gib or available_gib()


def skip_reason(cell: dict, args: argparse.Namespace) -> str:
    return f"skipped: needs ~{cell['estimate_gib']:.0f} GiB, machine has {memory_limit(args):.1f}"


def run_size(size: str, cells: list[dict], args: argparse.Namespace, bf16: bool, work: Path, results: dict) -> list[dict]:
    """Build the model of ``size``, run its cells (each trainer in turn, ``repeats`` rounds), and
    measure the matmul peak at its shapes."""
    from sft_vs_trl import matmul_peak
    from transformers import AutoTokenizer

    shape, model_dir = SHAPES[size], work / size
    print(f"[{size}] building the random {shape.name} model ...", flush=True)
    built, why = run_process(["--child", "build", "--size", size, "--model-dir", str(model_dir)], args.max_seconds)
    if built is None:
        sys.exit(f"could not build the {size} model: {why}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    done = []
    for mode, seq in dict.fromkeys((c["mode"], c["seq"]) for c in cells):
        group = [c for c in cells if (c["mode"], c["seq"]) == (mode, seq)]
        text = work / "text.txt"
        write_text(tokenizer, text, seq, group[0]["rows"] * (args.warmup + args.steps + args.profile))
        runs: dict[str, list[dict]] = {c["trainer"]: [] for c in group}
        for _ in range(args.repeats):
            for cell in group:
                saving = " (activation checkpointing)" if cell["checkpointing"] else ""
                label = f"[{size} {mode} seq {seq} x{cell['rows']}] {cell['trainer']}{saving}"
                limit = memory_limit(args)
                if runs[cell["trainer"]] and runs[cell["trainer"]][-1]["status"] != "ok":
                    continue  # skipped, stopped or failed once: not again
                if cell["estimate_gib"] > limit:
                    run = {"status": skip_reason(cell, args)}
                else:
                    print(f"{label} (est. {cell['estimate_gib']:.1f} GiB) ...", flush=True)
                    run = run_cell(cell, model_dir, text, work, args.max_seconds, limit)
                print(f"{label}: {summary(run)}", flush=True)
                runs[cell["trainer"]].append(run)
        done += [aggregate(cell, runs[cell["trainer"]]) for cell in group]
    dtype = "bfloat16" if bf16 else "float32"
    peak = matmul_peak(str(model_dir), dtype)
    results["sizes"][size] = {**asdict(shape), "params": built["params"], "matmul_peak_gflops": peak, "dtype": dtype}
    print(f"[{size}] {dtype} matmul peak at its layer shapes: {peak:.0f} GFLOP/s", flush=True)
    shutil.rmtree(model_dir, ignore_errors=True)
    return done


def aggregate(cell: dict, runs: list[dict]) -> dict:
    """A trainer's row for a cell: the first run's details, the median tokens/s and peak RSS over
    its runs, and every run; the first failure's status if one failed."""
    bad = [r for r in runs if r["status"] != "ok"]
    if bad:
        return {**cell, "status": bad[0]["status"], "runs": runs}
    return {**cell, **runs[0], "runs": runs, "tokens_per_second": statistics.median(r["tokens_per_second"] for r in runs),
            "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in runs)}  # fmt: skip


def summary(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"].strip().splitlines()[-1][:300]
    return f"{row['tokens_per_second']:.1f} tokens/s, peak RSS {row['peak_rss_gib']:.2f} GiB, wall {row['wall_seconds']:.0f} s"


def machine(bf16: bool) -> dict:
    import peft
    import torch
    import transformers

    import liandan

    versions = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__, "liandan": liandan.__version__}  # fmt: skip
    try:
        import trl

        versions["trl"] = trl.__version__
    except ImportError:
        pass
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "bf16": bf16,
            "processor": platform.processor() or platform.machine(), "memory_gib": total_gib(), "versions": versions}  # fmt: skip


def total_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


if __name__ == "__main__":
    main()
