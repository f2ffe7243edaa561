"""Everything a training run needs before its first step: model, tokenizer, encoded data,
LoRA or full fine-tuning, and the manifest that makes the run directory describe itself.

    from liandan.prepare import prepare_sft
    run = prepare_sft(config, Path(config.output_dir), main_process=True, resume=False)
    run.train[0]["input_ids"], run.train[0]["labels"]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chat import encode_chat_example, ensure_chat_template, stop_token_ids
from .config import SFTConfig, save_config
from .data import read_examples, split_examples, summarize_skipped
from .errors import LiandanError
from .files import file_sha256
from .models import load_model, resolve_model
from .objectives import sft_objective
from .replay import replay_examples


@dataclass
class PreparedRun:
    model: Any
    tokenizer: Any
    train: list[dict]
    eval: list[dict]
    objective: Any
    """How a micro-batch becomes a loss (`liandan.objectives`)."""
    unit: str = "trained_tokens"
    """What the loss is normalised by, as logged in metrics.jsonl."""
    manifest: dict = field(default_factory=dict)
    restore_model: Callable[[], None] = lambda: None
    """Undoes the training loop's speed-ups on the model (`liandan.train.speed_up_training`)
    before it is saved or generates."""

    def write_manifest(self, out_dir: Path) -> None:
        (out_dir / "manifest.json").write_text(json.dumps(self.manifest, indent=2, ensure_ascii=False) + "\n")


def prepare_sft(config: SFTConfig, out_dir: Path, *, main_process: bool, resume: bool, device: Any = "cpu") -> PreparedRun:
    """Run on the main process first (it writes the run directory and any replay cache), then on
    the others, which find both in place."""
    model, tokenizer, added_template, new_token_ids = load_trainable_base(config, out_dir, main_process, resume)
    data = read_examples(config.data, format=config.format, purpose="sft", skip_invalid=config.skip_invalid)
    train_examples, eval_examples = split_examples(data.examples, config.eval_fraction, config.seed)
    replay, replay_info = replay_examples(config, tokenizer, len(train_examples),
                                          weights_sha256=weights_hash(resolve_model(config.model)), device=device)  # fmt: skip
    train, train_stats = encode_all(tokenizer, train_examples + replay, config.max_length)
    evals, _ = encode_all(tokenizer, eval_examples, config.max_length)
    if not train:
        raise LiandanError("no training example has a trained token after encoding (see the report above)")
    model = attach_trainable(model, config, new_token_ids)
    manifest = build_manifest(config, tokenizer, sft_data_manifest(data, train_stats, len(evals)), added_template)
    if replay_info:
        manifest["replay"] = replay_info
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume:  # written first, so `liandan sft --resume -o DIR` can find the settings
            save_config(config, out_dir / "config.yaml")
        print_data_summary(data, train_stats, len(evals), replay_info)
    objective = sft_objective(config.packing, pad_id(tokenizer))
    return PreparedRun(model=model, tokenizer=tokenizer, train=train, eval=evals, objective=objective, manifest=manifest)


def load_trainable_base(config, out_dir: Path, main_process: bool, resume: bool):
    """The model in fp32 with its chat template, and the ids of tokens the template added. A run
    directory given as the model is loaded merged: DPO after SFT trains a new adapter on top of
    the SFT model, which is also the reference."""
    if main_process:
        check_output_dir(out_dir, resume)
    if not config.data:
        raise LiandanError("no training data: give --data FILE (repeatable) or data: [...] in the config")
    model, tokenizer = load_model(config.model, device="cpu", dtype="float32", trust_remote_code=config.trust_remote_code)
    vocab_before = len(tokenizer)
    added = ensure_chat_template(tokenizer, model)
    return model, tokenizer, added, list(range(vocab_before, len(tokenizer)))


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def check_output_dir(out_dir: Path, resume: bool) -> None:
    """Never overwrite a finished or running run by accident."""
    if resume:
        return
    if out_dir.exists() and any(out_dir.iterdir()):
        raise LiandanError(
            f"output directory '{out_dir}' is not empty; pass --resume to continue its run, "
            "or choose another --output-dir"
        )


def encode_all(tokenizer: Any, examples: list, max_length: int) -> tuple[list[dict], dict]:
    """Encode every example; examples with nothing to train are reported and dropped."""
    encoded, stats = [], {"examples": 0, "tokens": 0, "trained_tokens": 0, "truncated": 0,
                          "no_trained_tokens": [], "stop_cut_off": 0}  # fmt: skip
    for example in examples:
        try:
            item = encode_chat_example(tokenizer, example.messages, max_length)
        except LiandanError as exc:
            raise LiandanError(f"{example.source}: {exc}") from None
        stats["truncated"] += item.truncated
        stats["stop_cut_off"] += not item.ends_with_stop
        if item.trained_tokens == 0:
            stats["no_trained_tokens"].append(example.source)
            continue
        stats["examples"] += 1
        stats["tokens"] += len(item.input_ids)
        stats["trained_tokens"] += item.trained_tokens
        encoded.append({"input_ids": item.input_ids, "labels": item.labels})
    return encoded, stats


def attach_trainable(model: Any, config: SFTConfig, new_token_ids: list[int]) -> Any:
    """LoRA adapters through PEFT (the base frozen), or every weight trainable with ``full``.
    Rows of newly added tokens (a base model given ChatML) are trained in both cases."""
    if config.full:
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    targets = config.lora.target_modules
    lora = LoraConfig(
        r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets, task_type="CAUSAL_LM",
        trainable_token_indices={"embed_tokens": new_token_ids} if new_token_ids else None,
    )  # fmt: skip
    return get_peft_model(model, lora)


def build_manifest(config, tokenizer, data: dict, added_template: bool) -> dict:
    """What a run directory says about itself: versions, base model, template, tokens, data."""
    import accelerate
    import peft
    import torch
    import transformers

    from . import __version__

    source = resolve_model(config.model)
    template = tokenizer.chat_template or ""
    return {
        "liandan": __version__,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "accelerate": accelerate.__version__},  # fmt: skip
        "base_model": {"spec": config.model, "kind": source.kind, "weights_sha256": weights_hash(source)},
        "method": "full" if config.full else "lora",
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "chat_template_added": added_template,
        "special_tokens": {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                           "pad": tokenizer.pad_token_id, "stop": stop_token_ids(tokenizer)},  # fmt: skip
        "data": data,
    }


def sft_data_manifest(data, stats: dict, eval_count: int) -> dict:
    return {"files": {f: file_sha256(Path(f)) for f in data.files if Path(f).is_file()},
            "format": data.format, "records": len(data.examples) + len(data.skipped),
            "skipped": len(data.skipped), "train_examples": stats["examples"], "eval_examples": eval_count,
            "train_tokens": stats["tokens"], "trained_tokens": stats["trained_tokens"],
            "truncated": stats["truncated"], "no_trained_tokens": len(stats["no_trained_tokens"])}  # fmt: skip


def weights_hash(source) -> str | None:
    path = Path(source.location)
    for candidate in (path / "model.safetensors", path):
        if candidate.is_file():
            return file_sha256(candidate)
    return None


def print_data_summary(data, stats: dict, eval_count: int, replay_info: dict) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    replay = f", {replay_info['examples']} of them replay ({replay_info['source']})" if replay_info else ""
    console.print(
        f"data: {stats['examples']} training examples{replay} ({eval_count} held out), {stats['tokens']} tokens, "
        f"{stats['trained_tokens']} trained; format {data.format}", highlight=False,
    )  # fmt: skip
    if replay_info.get("note"):
        console.print(f"[yellow]replay: {replay_info['note']}[/]")
    if data.skipped:
        console.print(f"[yellow]{summarize_skipped(data.skipped)}[/]", highlight=False)
    if stats["truncated"]:
        console.print(f"[yellow]{stats['truncated']} examples truncated to max_length[/]")
    if stats["no_trained_tokens"]:
        console.print(f"[yellow]{len(stats['no_trained_tokens'])} examples have no trained token and were dropped: {', '.join(stats['no_trained_tokens'][:5])}[/]")
