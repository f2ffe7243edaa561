"""GRPO speed: liandan vs TRL's GRPOTrainer, same model, prompts, reward and settings, one run.

    pip install -e ".[bench]"          # TRL and datasets, for this benchmark only
    python benchmarks/grpo_vs_trl.py [--repeats 2] [--steps 6] [--model PATH] [--threads 1]

Each trainer runs in a fresh process, in turn (liandan, TRL; then again for each repeat), on the
same job:

- the built-in default model (SmolLM2-135M-Instruct, loaded from liandan's local copy by both;
  ``--model`` for another directory), LoRA rank 16, alpha 32, no dropout, every linear layer;
  bf16 autocast where the CPU has it (liandan: mixed_precision auto; TRL: bf16=True), fp32
  otherwise; on the GPU when there is one, else the CPU (TRL: use_cpu);
- 16 arithmetic prompts ("What is 12 + 7? Answer with the number only."), as a user turn in the
  model's chat template; the reward is 1.0 when the first number in the completion is the answer,
  else 0. liandan gets it as the record's own check ({"regex": "^\\D*19(?!\\d)"}, rewards
  ["checks"]); TRL as a Python reward function reading the records' ``answer`` column;
- 4 prompts x 4 generations = 16 completions per optimizer step (TRL: per_device_train_batch_size
  16, num_generations 4, gradient_accumulation_steps 1, so steps_per_generation 1 and
  generation_batch_size 16: one generation round per optimizer step), at most 64 completion
  tokens, temperature 1.0, top_p 1.0, top_k off, beta 0 (no reference pass), num_iterations 1
  (no extra pass for pi_old), loss_type dapo, scale_rewards group, epsilon 0.2 both sides;
- AdamW lr 1e-5, cosine schedule, no warmup, no weight decay, gradient norm clipped at 1.0,
  ``--steps`` steps (default 6), seed 0; no evaluation, no checkpoints in the loop (liandan:
  save_every 0, save_every_minutes 0; TRL: save_strategy "no"), no trackers.

Each child runs with ``--threads`` CPU threads (default 1; 0 = torch's default, one per core).
On a machine that is also running something else, torch's threads wait for each other at every
small operation of token-by-token decoding: on 2 cores beside another job, sampling 16 rows of
the default model took 4.3 s per token with 2 threads and 0.47 s with 1.

TRL defaults that liandan does not share are switched off: activation checkpointing
(gradient_checkpointing=False), vLLM (use_vllm=False) and completion logging (log_completions=
False; liandan writes only the first prompt's completions to completions.jsonl). What cannot be
switched off is left as it is: TRL computes the entropy of every completion token for its logs,
and liandan saves the adapter after the loop (outside the timed loop).

Measured per run, in a fresh child process:

- **s/step**: the median time between consecutive optimizer steps, i.e. over the steps after the
  first (the same hook for both: torch's global optimizer-step hook; a step is sampling, scoring,
  forward/backward, clipping, the optimizer and each trainer's logging);
- **gen s/step**: of that, the median time per step spent sampling (TRL: inside the PEFT model's
  ``generate``; liandan: inside `liandan.group_sampling.sample_groups`, which prefills each prompt
  once and drops finished completions from the batch), so **train s/step** = s/step - gen s/step
  is the rest;
- **loop s**: the training loop's wall time (liandan: its own TrainResult.seconds, the sum of its
  step times; TRL: the wall time of ``trainer.train()``) and **loop/step** = loop s / steps;
- **peak RSS** of the child (ru_maxrss), the **mean reward** over every completion of the run,
  and the mean completion length in tokens (generation time follows it).

The last line is ``ratio_vs_trl: X.XX`` = TRL s/step / liandan s/step (above 1: liandan faster).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS, GENERATIONS, PROMPTS_PER_STEP, MAX_COMPLETION = 16, 4, 4, 64
LR, RANK, ALPHA = 1e-5, 16, 32
RUNNERS = ["liandan", "trl"]


def write_prompts(path: Path) -> Path:
    """16 sums and differences with their answers; each record carries both the liandan check and
    the plain answer (TRL's reward reads ``answer``)."""
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(PROMPTS):
            a, b = rng.randint(10, 60), rng.randint(2, 30)
            op, answer = rng.choice([("+", a + b), ("-", a - b)])
            f.write(json.dumps({"prompt": f"What is {a} {op} {b}? Answer with the number only.",
                                "checks": {"regex": rf"^\D*{answer}(?!\d)"}, "answer": str(answer)}) + "\n")  # fmt: skip
    return path


def first_number_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """TRL reward function: 1.0 when the completion's first number is the answer (the same test as
    the liandan records' regex)."""
    scores = []
    for completion, expected in zip(completions, answer, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        match = re.search(r"\d+", text)
        scores.append(float(match is not None and match.group() == expected))
    return scores


# ---------------------------------------------------------------------------------------------
# Children: one training run each, printing one JSON line


def install_timers() -> dict[str, list]:
    """The same clocks for both trainers: a timestamp after every optimizer step, and the time of
    every sampling call, keyed by the step it belongs to: TRL samples through the PEFT model's
    ``generate``, liandan through `liandan.group_sampling.sample_groups` (which calls ``generate``
    only for a model whose cache it cannot regroup; a call inside another is not counted twice)."""
    import liandan.grpo
    from peft import PeftModelForCausalLM
    from torch.optim.optimizer import register_optimizer_step_post_hook

    clocks: dict[str, list] = {"steps": [], "generate": []}
    register_optimizer_step_post_hook(lambda *_: clocks["steps"].append(time.perf_counter()))
    depth = [0]

    def timed(function):
        def run(*args, **kwargs):
            started = time.perf_counter()
            depth[0] += 1
            try:
                return function(*args, **kwargs)
            finally:
                depth[0] -= 1
                if not depth[0]:
                    clocks["generate"].append((len(clocks["steps"]), time.perf_counter() - started))

        return run

    PeftModelForCausalLM.generate = timed(PeftModelForCausalLM.generate)
    liandan.grpo.sample_groups = timed(liandan.grpo.sample_groups)
    return clocks


def child_liandan(model_dir: str, prompts: Path, out: Path, steps: int, bf16: bool) -> dict:
    from liandan.config import GRPOConfig, LoraConfig
    from liandan.train import train_grpo

    config = GRPOConfig(model=model_dir, data=[str(prompts)], output_dir=str(out), rewards=["checks"],
                        batch_size=PROMPTS_PER_STEP, num_generations=GENERATIONS, max_completion_length=MAX_COMPLETION,
                        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, num_iterations=1, epsilon=0.2, epsilon_high=0.2,
                        loss_type="dapo", scale_rewards="group", lr=LR, warmup_ratio=0.0, weight_decay=0.0,
                        max_grad_norm=1.0, max_steps=steps, seed=0, save_every=0, save_every_minutes=0,
                        mixed_precision="auto",
                        lora=LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.0, target_modules=["all-linear"]))  # fmt: skip
    result = train_grpo(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"loop_seconds": result.seconds, "steps": result.steps,
            "rewards": [r["reward"] for r in records], "lengths": [r["completion_tokens"] for r in records]}  # fmt: skip


def child_trl(model_dir: str, prompts: Path, out: Path, steps: int, bf16: bool) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                          for r in rows])  # fmt: skip
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=PROMPTS_PER_STEP * GENERATIONS,
                      gradient_accumulation_steps=1, num_generations=GENERATIONS, max_completion_length=MAX_COMPLETION,
                      temperature=1.0, top_p=1.0, top_k=0, beta=0.0, num_iterations=1, epsilon=0.2, loss_type="dapo",
                      scale_rewards="group", learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0,
                      weight_decay=0.0, max_grad_norm=1.0, max_steps=steps, seed=0, bf16=bf16, fp16=False,
                      use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False, use_vllm=False,
                      log_completions=False, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=first_number_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora)  # fmt: skip
    started = time.perf_counter()
    output = trainer.train()
    loop = time.perf_counter() - started
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    return {"loop_seconds": loop, "steps": output.global_step, "rewards": [e["reward"] for e in logs],
            "lengths": [e["completions/mean_length"] for e in logs]}  # fmt: skip


def run_child(name: str, model_dir: str, prompts: Path, out: Path, steps: int, bf16: bool, threads: int) -> None:
    import resource

    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)

    transformers.logging.set_verbosity_error()
    clocks = install_timers()
    run = child_liandan if name == "liandan" else child_trl
    result = run(model_dir, prompts, out, steps, bf16)
    stamps = clocks["steps"]
    generate = [0.0] * len(stamps)
    for step, seconds in clocks["generate"]:
        if step < len(generate):
            generate[step] += seconds
    result["step_seconds"] = [b - a for a, b in itertools.pairwise(stamps)]  # steps 2..N
    result["generate_seconds"] = generate[1:]
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The parent: runs in turn, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="rounds of both trainers (median reported)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (at least 2)")
    parser.add_argument("--model", help="model directory (default: liandan's default model)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per trainer (0 = torch's default)")
    parser.add_argument("--only", nargs="*", default=RUNNERS, choices=RUNNERS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is not timed")
    if args.child:
        return run_child(args.child, args.model, Path(args.prompts), Path(args.out), args.steps, args.bf16, args.threads)

    import torch

    from liandan.devices import cpu_supports_bf16
    from liandan.models import resolve_model

    model_dir = args.model or resolve_model("default").location
    bf16 = torch.cuda.is_available() or cpu_supports_bf16()
    work = Path(tempfile.mkdtemp(prefix="liandan-grpo-bench-"))
    try:
        prompts = write_prompts(work / "prompts.jsonl")
        results: dict[str, list[dict]] = {name: [] for name in args.only}
        for round_ in range(args.repeats):
            for name in args.only:
                out = work / f"{name}-{round_}"
                print(f"[round {round_ + 1}/{args.repeats}] {name} ...", flush=True)
                command = [sys.executable, __file__, "--child", name, "--model", model_dir, "--prompts", str(prompts),
                           "--out", str(out), "--steps", str(args.steps), "--threads", str(args.threads)] + (["--bf16"] if bf16 else [])  # fmt: skip
                env = {**os.environ, "TQDM_DISABLE": "1"}
                if args.threads:
                    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
                proc = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
                results[name].append(json.loads(lines[-1][len("RESULT ") :]))
                shutil.rmtree(out, ignore_errors=True)
        print_table(results, model_dir, args.steps, args.repeats, bf16, args.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_table(results: dict[str, list[dict]], model_dir: str, steps: int, repeats: int, bf16: bool, threads: int) -> None:
    def median(runs: list[dict], value) -> float:
        return statistics.median(value(r) for r in runs)

    print(f"\n{Path(model_dir).name}: {steps} steps of {PROMPTS_PER_STEP} prompts x {GENERATIONS} completions "
          f"(<= {MAX_COMPLETION} tokens), {'bf16 autocast' if bf16 else 'fp32'}, {threads or 'default'} thread(s); s/step = median over steps 2..{steps}, "
          f"median of {repeats} run(s) each\n")  # fmt: skip
    print(f"{'trainer':<9}{'s/step':>8}{'gen s/step':>12}{'train s/step':>14}{'loop s':>8}{'loop/step':>11}"
          f"{'peak RSS':>12}{'reward':>8}{'length':>8}")  # fmt: skip
    per_step = {}
    for name, runs in results.items():
        step = median(runs, lambda r: statistics.median(r["step_seconds"]))
        gen = median(runs, lambda r: statistics.median(r["generate_seconds"]))
        loop = median(runs, lambda r: r["loop_seconds"])
        reward = median(runs, lambda r: statistics.mean(r["rewards"]))
        length = median(runs, lambda r: statistics.mean(r["lengths"]))
        per_step[name] = step
        print(f"{name:<9}{step:>8.2f}{gen:>12.2f}{step - gen:>14.2f}{loop:>8.1f}{loop / runs[0]['steps']:>11.2f}"
              f"{median(runs, lambda r: r['peak_rss_mib']):>8.0f} MiB{reward:>8.3f}{length:>8.1f}")  # fmt: skip
    if set(per_step) == {"liandan", "trl"}:
        print(f"ratio_vs_trl: {per_step['trl'] / per_step['liandan']:.2f}")


if __name__ == "__main__":
    main()
