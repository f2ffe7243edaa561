"""Bake a system prompt into the weights: the model answers with it, learns to answer so without.

    from liandan.bake import BakeConfig, bake
    summary = bake(BakeConfig(system="examples/persona/system.txt", prompts="examples/persona/prompts.jsonl",
                              task="examples/persona/test.jsonl", output_dir="runs/persona-baked"))
    summary["tokens_saved_per_request"]

1. Teacher: the original model answers the training prompts WITH the system prompt. With checks
   (``--check`` or a task set's shared checks), answers that fail them are re-drawn by sampling
   (up to ``tries`` per prompt) and prompts that never pass are left out: the student learns
   the prompt's effect at its best, not its misses. When under a quarter of the prompts pass (a
   model too small to follow the prompt), the greedy answers are used as they are, and the
   summary says so.
2. Student: LoRA on (prompt -> teacher answer) WITHOUT the system prompt, the ordinary SFT loop.
3. Evaluation on held-out prompts: the original WITH the prompt vs the baked model WITHOUT it,
   adherence by the checks; and what the prompt cost per request: tokens, and prefill time
   measured on this machine.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

from .chat import encode_generation_prompt
from .checks import parse_checks, run_checks
from .config import SFTConfig, load_config
from .errors import LiandanError
from .eval_report import print_metrics, write_eval_report
from .evaluation import EvalConfig, Evaluation
from .files import write_atomic
from .generation import SamplingConfig, generate
from .models import load_model, release_model
from .prompts import builtin_path, read_general_prompts
from .train import train_sft


@dataclass
class BakeConfig:
    model: str = "default"
    """The model to bake the prompt into."""
    system: str = ""
    """The system prompt: its text, or a path to a text file."""
    prompts: str = "default"
    """Training prompts the teacher answers: "default" (liandan's general prompts) or a file."""
    task: str | None = None
    """Held-out prompts with checks for the adherence evaluation (.jsonl)."""
    checks: dict = field(default_factory=dict)
    """Adherence checks for every answer (teacher filter and evaluation), e.g. {"regex": "^Arr"}."""
    output_dir: str = "runs/bake"
    tries: int = 2
    """Teacher answers drawn per prompt until one passes the checks (the first is greedy)."""
    temperature: float = 0.7
    """Sampling temperature of the re-drawn teacher answers."""
    max_new_tokens: int = 128
    """Longest teacher answer and evaluated answer."""
    epochs: float = 3.0
    lr: float = 1e-3
    sft_overrides: list[str] = field(default_factory=list)
    """Further SFT settings as key=value."""
    probes: str = "none"
    """Retention probes to add to the evaluation: default, a file, or none."""

    def __post_init__(self) -> None:
        if self.tries < 1:
            raise LiandanError(f"--tries must be at least 1 (got {self.tries})")


def read_system_prompt(value: str) -> str:
    path = Path(value)
    if len(value) < 4096 and "\n" not in value and path.suffix in (".txt", ".md"):
        if not path.is_file():
            raise LiandanError(f"--system: file '{path}' does not exist")
        value = path.read_text(encoding="utf-8")
    if not value.strip():
        raise LiandanError("--system: the system prompt is empty")
    return value.strip()


def bake(config: BakeConfig, console: Any = None) -> dict:
    console = console or Console()
    system = read_system_prompt(config.system)
    prompts = read_general_prompts(config.prompts, "general")
    if not (config.task or config.checks):
        raise LiandanError("bake needs a way to measure adherence: --task FILE (held-out prompts with checks) or --check KEY=VALUE")
    # Without a task set, adherence is measured on liandan's drift prompts: general, and never trained on.
    task = config.task or str(builtin_path("drift"))
    evaluation = Evaluation(EvalConfig(models=[], task=task, checks=config.checks, probes=config.probes, drift="none",
                                       max_new_tokens=config.max_new_tokens))  # fmt: skip
    checks = _teacher_checks(config, evaluation)
    out = Path(config.output_dir)
    sft = load_config(SFTConfig, None, config.sft_overrides, model=config.model, output_dir=str(out),
                      epochs=config.epochs, lr=config.lr, data=["<bake>"])  # fmt: skip
    if out.exists() and any(out.iterdir()):
        raise LiandanError(f"output directory '{out}' is not empty; choose another --output-dir")

    console.rule("[bold]1/3 Teacher: the original model answers with the system prompt")
    records, teacher = teacher_answers(config, system, prompts, checks, console)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "bake-data.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        sft.data = [str(data)]
        console.rule("[bold]2/3 Student: LoRA without the system prompt")
        trained = train_sft(sft)
        (out / "bake-data.jsonl").write_bytes(data.read_bytes())
    summary = {"system_prompt": system, "teacher": teacher, "training": {"steps": trained.steps, "last_loss": trained.losses[-1]}}
    summary.update(prompt_cost(config, system, prompts[:16], out))
    console.rule("[bold]3/3 Evaluate: original WITH the prompt vs baked WITHOUT it")
    evaluation.run(config.model, name="original + system prompt", system=system)
    evaluation.run(config.model, name="original, no system prompt", system="")
    evaluation.run(str(out), name="baked, no system prompt", system="")
    result = evaluation.result()
    result["title"] = "liandan bake: adherence without the system prompt"
    result["labels"] = {}  # the three names say what each column is
    result["notes"] = [f"evaluated on {task}",
                       f"system prompt: {summary['prompt_tokens']} tokens saved per request, "
                       f"{summary['prefill_ms_saved']:.1f} ms of prefill saved per request on this machine"]  # fmt: skip
    summary["adherence"] = {m: result["scores"][m]["task"]["score"] for m in result["models"]}
    write_eval_report(result, out / "bake-report.html")
    print_metrics(result, console)
    write_atomic(out / "bake-summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    console.print(f"Tokens saved per request: {summary['prompt_tokens']} · prefill time saved per request: "
                  f"{summary['prefill_ms_saved']:.1f} ms · run: {out}", highlight=False)  # fmt: skip
    return summary


def _teacher_checks(config: BakeConfig, evaluation) -> Any:
    """The checks a teacher answer must pass: --check, else the checks every task record shares."""
    if config.checks:
        return parse_checks(config.checks, where="--check")
    specs = {json.dumps(item.prompt.meta.get("checks"), sort_keys=True) for item in evaluation.task.items}
    if len(specs) == 1 and (spec := json.loads(specs.pop())):
        return parse_checks(spec, where=f"{config.task}: shared checks")
    return None


def teacher_answers(config: BakeConfig, system: str, prompts: list, checks, console) -> tuple[list[dict], dict]:
    """Training records (prompt WITHOUT system -> teacher answer) and teacher statistics."""
    model, tokenizer = load_model(config.model)
    kept: dict[int, str] = {}
    greedy: dict[int, str] = {}  # the first, greedy answers that stopped: the prompt's plain effect
    greedy_pass = 0
    try:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("teacher", total=config.tries)
            for attempt in range(config.tries):
                todo = [i for i in range(len(prompts)) if i not in kept]
                if not todo:
                    break
                sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, batch_size=64, seed=attempt,
                                          temperature=0.0 if attempt == 0 else config.temperature)  # fmt: skip
                outputs = generate(model, tokenizer, [prompts[i] for i in todo], system=system, config=sampling)
                for i, g in zip(todo, outputs, strict=True):
                    if attempt == 0 and g.stopped and g.text.strip():
                        greedy[i] = g.text.strip()
                    ok = g.stopped and g.text.strip() and (checks is None or all(run_checks(checks, g.text).values()))
                    if ok:
                        kept[i] = g.text.strip()
                        greedy_pass += attempt == 0
                bar.advance(task)
                if checks is None:
                    break  # without checks the greedy answers are the teacher's answers
    finally:
        release_model(model)
    stats = {"prompts": len(prompts), "passed_checks": len(kept), "greedy_pass_rate": greedy_pass / len(prompts),
             "tries": config.tries, "filtered": True}  # fmt: skip
    console.print(f"teacher: {len(kept)} of {len(prompts)} prompts answered within the checks "
                  f"({stats['greedy_pass_rate']:.0%} on the first, greedy try)", highlight=False)  # fmt: skip
    if checks is not None and len(kept) < max(1, len(prompts) // 4) and len(greedy) > len(kept):
        # A model that barely follows the prompt leaves too little to learn from; bake what the
        # prompt does to it instead, and say so: adherence will be measured, not assumed.
        console.print(f"[yellow]teacher: too few answers pass the checks; training on its {len(greedy)} greedy answers "
                      "that stopped (the prompt's actual effect on this model)[/]")  # fmt: skip
        kept, stats["filtered"] = greedy, False
    if not kept:
        raise LiandanError(f"bake: the teacher stopped by itself on none of the {len(prompts)} prompts within "
                           f"{config.max_new_tokens} tokens; raise --max-new-tokens or check the system prompt")  # fmt: skip
    stats["kept"] = len(kept)
    records = [{"messages": [*prompts[i].chat_messages(), {"role": "assistant", "content": kept[i]}]} for i in sorted(kept)]
    return records, stats


def prompt_cost(config: BakeConfig, system: str, prompts: list, run_dir: Path) -> dict:
    """What the system prompt costs per request: its tokens, and the prefill time it adds, measured
    as the median over ``prompts`` of one forward pass with it minus one without it."""
    model, tokenizer = load_model(str(run_dir))
    extra, with_ms, without_ms = [], [], []
    try:
        with torch.inference_mode():
            for prompt in prompts:
                ids = {}
                for key, messages in (("with", prompt.chat_messages(system)), ("without", prompt.chat_messages())):
                    ids[key] = torch.tensor([encode_generation_prompt(tokenizer, messages)], device=model.device)
                extra.append(ids["with"].shape[1] - ids["without"].shape[1])
                with_ms.append(_prefill_ms(model, ids["with"]))
                without_ms.append(_prefill_ms(model, ids["without"]))
    finally:
        release_model(model)
    return {"prompt_tokens": round(statistics.mean(extra), 1),
            "prefill_ms_with_prompt": statistics.median(with_ms), "prefill_ms_without_prompt": statistics.median(without_ms),
            "prefill_ms_saved": statistics.median(with_ms) - statistics.median(without_ms)}  # fmt: skip


def _prefill_ms(model, input_ids, repeats: int = 3) -> float:
    model(input_ids)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids)
        times.append((time.perf_counter() - start) * 1000)
    return min(times)
