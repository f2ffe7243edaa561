"""Replay against forgetting: general examples mixed into the task data.

    from liandan.replay import replay_examples
    examples, info = replay_examples(config, tokenizer, task_count=240)

``replay: self`` asks the base model, before any training, to answer general prompts, and trains
on those answers next to the task: the model keeps rehearsing what it already did, in its own
words, so the task cannot pull everything towards itself. ``replay: FILE`` mixes in user data.
``replay_ratio`` R adds round(R x task examples) replay examples (R <= 1). The self answers are
cached under ``$LIANDAN_HOME/replay`` by the base weights, template, prompts and settings, so a
second run with the same base model does not generate them again.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from rich.progress import Progress

from .chat import render_chat
from .config import SFTConfig
from .data import Example, read_examples
from .errors import LiandanError
from .files import file_sha256, liandan_home, write_atomic
from .generation import SamplingConfig, generate
from .models import load_model, release_model
from .prompts import read_general_prompts


def replay_examples(config: SFTConfig, tokenizer: Any, task_count: int, *,
                    weights_sha256: str | None = None, device: Any = "cpu") -> tuple[list[Example], dict]:  # fmt: skip
    """The replay examples to add for ``task_count`` task examples, and what the manifest records."""
    wanted = round(config.replay_ratio * task_count)
    if not config.replay or wanted == 0:
        return [], {}
    if config.replay == "self":
        path = self_replay_file(config, tokenizer, weights_sha256, device)
    else:
        path = Path(config.replay)
    pool = read_examples([str(path)], purpose="sft").examples
    chosen = random.Random(config.seed).sample(pool, min(wanted, len(pool)))
    info = {"source": config.replay, "file": str(path), "sha256": file_sha256(path), "ratio": config.replay_ratio,
            "available": len(pool), "examples": len(chosen), "task_examples": task_count}  # fmt: skip
    if len(chosen) < wanted:
        info["note"] = f"asked for {wanted} replay examples, {len(pool)} available"
    return chosen, info


def self_replay_file(config: SFTConfig, tokenizer: Any, weights_sha256: str | None, device: Any) -> Path:
    """The cached file of the base model's own answers, generated now if missing."""
    prompts = read_general_prompts(config.replay_prompts, "general")
    # Keyed by the prompts as the template renders them, not by the template's text: a template
    # that renders plain chats the same (liandan's ChatML tools template) finds the same answers.
    key = json.dumps({
        "weights": weights_sha256 or config.model,
        "rendered": [render_chat(tokenizer, p.chat_messages()) for p in prompts],
        "max_new_tokens": config.replay_max_new_tokens,
    }, sort_keys=True)  # fmt: skip
    path = liandan_home() / "replay" / f"self-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"
    if path.is_file():
        return path
    records = generate_answers(config, prompts, device)
    if not records:
        raise LiandanError(f"replay self: the base model stopped by itself on none of the {len(prompts)} prompts "
                           f"within replay_max_new_tokens={config.replay_max_new_tokens}; raise it or use --replay FILE")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def generate_answers(config: SFTConfig, prompts: list, device: Any) -> list[dict]:
    """Greedy answers of the untrained model, loaded for inference (bf16 where the hardware has
    it) beside the fp32 copy being trained. An answer that never stopped is left out, since
    training on it would teach the model not to stop."""
    sampling = SamplingConfig(max_new_tokens=config.replay_max_new_tokens, batch_size=64)
    model, tokenizer = load_model(config.model, device=str(device), trust_remote_code=config.trust_remote_code)
    try:
        with Progress(transient=True) as bar:
            task = bar.add_task("replay: the base model answers general prompts", total=len(prompts))
            answers = generate(model, tokenizer, prompts, config=sampling, model_name="base",
                               on_batch=lambda n: bar.advance(task, n))  # fmt: skip
    finally:
        release_model(model)
    return [
        {"messages": [*prompts[g.prompt_index].chat_messages(), {"role": "assistant", "content": g.text.strip()}]}
        for g in answers if g.stopped and g.text.strip()
    ]  # fmt: skip
