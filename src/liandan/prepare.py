"""Everything a training run needs before its first step, for every stage: the model and
tokenizer, the encoded data, LoRA or full fine-tuning, the objective, and the manifest that makes
the run directory describe itself.

    from liandan.prepare import prepare_sft
    run = prepare_sft(config, Path(config.output_dir), main_process=True, resume=False)
    run.train[0]["input_ids"], run.train[0]["labels"]

`prepare_dpo` and `prepare_pretrain` do the same for preference pairs and raw text; the loop in
`liandan.train` takes any of them.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import accelerate
import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import TrainableTokensWrapper
from rich.console import Console

from . import __version__
from .chat import ensure_chat_template, stop_token_ids
from .config import DPOConfig, GRPOConfig, PretrainConfig, SFTConfig, TrainConfig, save_config
from .data import read_examples, read_texts, split_examples, summarize_skipped
from .encoding import add_mismatched_rows, encode_all, encode_pair, encode_unpaired, pad_id, text_blocks
from .engines import sharded_launch
from .errors import LiandanError, say
from .files import file_sha256
from .grpo import Rollouts, grpo_objective, read_grpo_prompts
from .models import load_model, resolve_model, weights_sha256
from .objectives import dpo_objective, kto_objective, precompute_reference, reference_free_objective, sft_objective
from .preference import read_pairs, read_unpaired
from .quantization import check_quantize, manifest_entry, prepare_quantized, quantization_config
from .replay import replay_examples
from .rewards import parse_rewards
from .tools import prepare_tools


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

    def write_manifest(self, out_dir: Path) -> None:
        (out_dir / "manifest.json").write_text(json.dumps(self.manifest, indent=2, ensure_ascii=False) + "\n")


def prepare_sft(config: SFTConfig, out_dir: Path, *, main_process: bool, resume: bool, device: Any = "cpu") -> PreparedRun:
    """Run on the main process first (it writes the run directory and any replay cache), then on
    the others, which find both in place."""
    model, tokenizer, added_template, new_token_ids = load_trainable_base(config, out_dir, main_process, resume, device)
    data = read_examples(config.data, format=config.format, purpose="sft", skip_invalid=config.skip_invalid)
    if config.eval_data:
        train_examples = data.examples
        eval_examples = read_examples(config.eval_data, format=config.format, purpose="sft", skip_invalid=config.skip_invalid).examples
    else:
        train_examples, eval_examples = split_examples(data.examples, config.eval_fraction, config.seed)
    tools_note = prepare_tools(tokenizer, config.tools_template, train_examples + eval_examples)
    if tools_note and main_process:
        say(f"tools: {tools_note}")
    replay, replay_info = replay_examples(config, tokenizer, len(train_examples),
                                          weights_sha256=weights_hash(resolve_model(config.model)), device=device)  # fmt: skip
    train, train_stats = encode_all(tokenizer, train_examples + replay, config.max_length, special_text=config.special_text)
    evals, eval_stats = encode_all(tokenizer, eval_examples, config.max_length, special_text=config.special_text)
    if not train:
        raise LiandanError("no training example has a trained token after encoding (see the report above)")
    model = attach_trainable(model, config, new_token_ids)
    manifest = build_manifest(config, model, tokenizer, sft_data_manifest(data, train_stats, eval_stats, config.eval_data), added_template)
    if replay_info:
        manifest["replay"] = replay_info
    if tools_note:
        manifest["tools_template"] = config.tools_template
    run = PreparedRun(model=model, tokenizer=tokenizer, train=train, eval=evals,
                      objective=sft_objective(config.packing, pad_id(tokenizer)), manifest=manifest)  # fmt: skip
    return finish(run, config, out_dir, main_process, resume, lambda: print_data_summary(data, train_stats, eval_stats, replay_info))


def prepare_dpo(config: DPOConfig, out_dir: Path, *, main_process: bool, resume: bool, device: Any = "cpu") -> PreparedRun:
    model, tokenizer, added, new_ids = load_trainable_base(config, out_dir, main_process, resume, device)
    train, evals = encode_preferences(config, tokenizer)
    model = attach_trainable(model, config, new_ids)
    pad = pad_id(tokenizer)
    reference_free = config.loss in ("orpo", "simpo")
    if config.full and not reference_free:  # no adapters to switch off: the reference log-probs are computed now, once
        precompute_reference(model, train + evals, pad, device=reference_device(device))
    unit = "examples" if config.loss == "kto" else "pairs"
    data = {"files": file_hashes([*config.data, *config.eval_data]), f"train_{unit}": len(train), f"eval_{unit}": len(evals)}  # fmt: skip
    if config.loss == "kto":
        data["train_desirable"] = sum(item["desirable"] for item in train)
    manifest = build_manifest(config, model, tokenizer, data, added)
    manifest["dpo"] = preference_settings(config)
    if config.loss == "kto":
        objective = kto_objective(pad, config.beta, config.desirable_weight, config.undesirable_weight)
    elif reference_free:
        objective = reference_free_objective(pad, config.loss, config.beta, config.simpo_gamma, config.label_smoothing, config.sft_weight)
    else:
        objective = dpo_objective(pad, config.beta, config.label_smoothing, config.loss, config.sft_weight)
    run = PreparedRun(model=model, tokenizer=tokenizer, train=train, eval=evals, objective=objective, unit=unit, manifest=manifest)
    summary = (f"data: {len(train)} examples, {data['train_desirable']} of them desirable ({len(evals)} held out)" if config.loss == "kto"
               else f"data: {len(train)} preference pairs ({len(evals)} held out)")  # fmt: skip
    return finish(run, config, out_dir, main_process, resume, lambda: say(summary))


def reference_device(device: Any) -> Any:
    """Where full fine-tuning's reference log-probs are computed: on the run's device, where
    accelerate would move the model next anyway, rather than on the CPU it loaded on. Under FSDP
    or DeepSpeed the whole model may not fit one device before it is sharded: it stays put."""
    return "cpu" if sharded_launch() else device


def preference_settings(config: DPOConfig) -> dict:
    """The manifest's "dpo" block: the loss, the settings it uses, and where its reference is."""
    settings = {"beta": config.beta, "loss": config.loss, "label_smoothing": config.label_smoothing, "sft_weight": config.sft_weight}
    if config.loss == "simpo":
        settings["simpo_gamma"] = config.simpo_gamma
    if config.loss == "kto":
        settings.update(desirable_weight=config.desirable_weight, undesirable_weight=config.undesirable_weight)
    if config.loss in ("orpo", "simpo"):
        settings["reference"] = "none (reference-free)"
    else:
        settings["reference"] = "precomputed (full fine-tuning)" if config.full else "the policy with adapters disabled"
    return settings


def encode_preferences(config: DPOConfig, tokenizer: Any) -> tuple[list[dict], list[dict]]:
    """Training and held-out items: encoded pairs, or for KTO encoded examples (pairs split into a
    desirable and an undesirable one) each with its mismatched row for the KL estimate."""
    read = read_unpaired if config.loss == "kto" else read_pairs
    records = read(config.data)
    if config.eval_data:
        held_out = read(config.eval_data)
    else:
        records, held_out = split_examples(records, config.eval_fraction, config.seed)
    if config.loss != "kto":
        return [encode_pair(tokenizer, p, config.max_length, config.special_text) for p in records], \
               [encode_pair(tokenizer, p, config.max_length, config.special_text) for p in held_out]  # fmt: skip
    train = [encode_unpaired(tokenizer, e, config.max_length, config.special_text) for e in records]
    evals = [encode_unpaired(tokenizer, e, config.max_length, config.special_text) for e in held_out]
    return add_mismatched_rows(train, config.max_length), add_mismatched_rows(evals, config.max_length)


def prepare_pretrain(config: PretrainConfig, out_dir: Path, *, main_process: bool, resume: bool, device: Any = "cpu") -> PreparedRun:
    model, tokenizer, added, new_ids = load_trainable_base(config, out_dir, main_process, resume, device)
    documents = read_texts(config.data)
    train, tokens = text_blocks(tokenizer, documents, config.max_length, special_text=config.special_text)
    if not train:
        raise LiandanError(f"{', '.join(config.data)}: too little text for one block of {config.max_length} tokens")
    if config.eval_data:
        evals, eval_tokens = text_blocks(tokenizer, read_texts(config.eval_data), config.max_length, special_text=config.special_text)
    else:  # held-out blocks of the training text
        train, evals = split_examples(train, config.eval_fraction, config.seed)
        eval_tokens = sum(len(block["input_ids"]) for block in evals)
    model = attach_trainable(model, config, new_ids)
    data = {"files": file_hashes([*config.data, *config.eval_data]), "documents": len(documents), "tokens": tokens, "blocks": len(train), "block_size": config.max_length,
            "eval_tokens": eval_tokens, "eval_blocks": len(evals),
            "text_sha256": hashlib.sha256("".join(t for _, t in documents).encode()).hexdigest()}  # fmt: skip
    manifest = build_manifest(config, model, tokenizer, data, added)
    objective = sft_objective(packing=True, pad_id=pad_id(tokenizer), name="pretrain")  # blocks packed, each attending to itself
    run = PreparedRun(model=model, tokenizer=tokenizer, train=train, eval=evals, objective=objective, manifest=manifest)
    summary = (f"data: {len(documents)} documents, {tokens} tokens in {len(train)} blocks of {config.max_length} "
               f"({len(evals)} held-out blocks)")  # fmt: skip
    return finish(run, config, out_dir, main_process, resume, lambda: say(summary))


def prepare_grpo(config: GRPOConfig, out_dir: Path, *, main_process: bool, resume: bool, device: Any = "cpu") -> PreparedRun:
    """The prompts and rewards are checked before the model loads; under full fine-tuning with
    beta > 0 a frozen copy of the starting model is the reference."""
    rewards = parse_rewards(config.rewards, config.reward_weights, base_dir=Path("."))
    model, tokenizer, added, new_ids = load_trainable_base(config, out_dir, main_process, resume, device)
    train = read_grpo_prompts(config.data, tokenizer, config, rewards)
    reference = None
    if config.full and config.beta:
        reference = copy.deepcopy(model).eval().requires_grad_(False).to(reference_device(device))
    model = attach_trainable(model, config, new_ids)
    data = {"files": file_hashes(config.data), "prompts": len(train)}
    manifest = build_manifest(config, model, tokenizer, data, added)
    manifest["grpo"] = {"rewards": [{"spec": spec, "name": r.name, "weight": r.weight} for spec, r in zip(config.rewards, rewards, strict=True)],
                        "num_generations": config.num_generations, "loss_type": config.loss_type, "beta": config.beta,
                        "reference": ("none (beta 0)" if not config.beta else "a frozen copy of the starting model" if config.full
                                      else "the policy with adapters disabled")}  # fmt: skip
    rollouts = Rollouts(config, tokenizer, rewards, pad_id(tokenizer), out_dir, reference=reference)
    run = PreparedRun(model=model, tokenizer=tokenizer, train=train, eval=[], objective=grpo_objective(config, rollouts),
                      unit="completion_tokens" if config.loss_type == "dapo" else "completions", manifest=manifest)  # fmt: skip
    summary = (f"data: {len(train)} prompts x {config.num_generations} completions each; rewards "
               + ", ".join(f"{r.name} (x{r.weight:g})" for r in rewards))  # fmt: skip
    return finish(run, config, out_dir, main_process, resume, lambda: say(summary))


# ---------------------------------------------------------------------------------------------
# Shared by the stages


def finish(run: PreparedRun, config: TrainConfig, out_dir: Path, main_process: bool, resume: bool,
           show_summary: Callable[[], None]) -> PreparedRun:  # fmt: skip
    """On the main process: the run directory with the settings (written first, so that
    ``--resume -o DIR`` finds them), and the data summary."""
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            save_config(config, out_dir / "config.yaml")
        show_summary()
        if run.manifest.get("adapted_modules") is not None:
            say(lora_summary(config, run.manifest))
    return run


def lora_summary(config: TrainConfig, manifest: dict) -> str:
    """One line: where the adapters are, e.g. 'LoRA rank 8 on o_proj x2, qkv_proj x2; ...'."""
    modules = ", ".join(f"{kind} x{n}" for kind, n in manifest["adapted_modules"].items()) or "no module"
    rows = manifest.get("trainable_token_rows") or {}
    tokens = f"; new token rows trained in {', '.join(rows)}" if rows else ""
    base = "; the base in 4 bits (QLoRA)" if config.quantize else ""
    return f"LoRA rank {config.lora.rank} on {modules}{tokens}{base}"


def load_trainable_base(config: TrainConfig, out_dir: Path, main_process: bool, resume: bool, device: Any = "cpu"):
    """The model in fp32 with its chat template, and the ids of tokens the template added. A run
    directory given as the model is loaded merged: DPO after SFT trains a new adapter on top of
    the SFT model, which is also the reference.

    The model loads on the CPU (accelerate moves it), except a 4-bit base (``quantize``), which is
    quantized as it loads straight onto the run's ``device``."""
    if main_process:
        check_output_dir(out_dir, resume)
    if not config.data:
        raise LiandanError("no training data: give --data FILE (repeatable) or data: [...] in the config")
    check_quantize(config, device, resolve_model(config.model).kind)
    check_attention_kernel(config, device)
    if config.quantize:
        model, tokenizer = load_model(config.model, device=str(device), dtype="float32", trust_remote_code=config.trust_remote_code,
                                      quantization=quantization_config(config))  # fmt: skip
        model = prepare_quantized(model)
    else:
        model, tokenizer = load_model(config.model, device="cpu", dtype="float32", trust_remote_code=config.trust_remote_code)
    vocab_before = len(tokenizer)
    added = ensure_chat_template(tokenizer, model)
    return model, tokenizer, added, list(range(vocab_before, len(tokenizer)))


def check_attention_kernel(config: TrainConfig, device: Any) -> None:
    """``attention: flash_attention_2`` needs a CUDA GPU and a flash attention kernel: one line
    naming the setting before the model loads, instead of transformers' ImportError mid-run.
    (transformers can also take the kernel from the ``kernels`` package, so that is accepted too.)"""
    if config.attention != "flash_attention_2":
        return
    if torch.device(device).type != "cuda":
        raise LiandanError(f"attention: flash_attention_2 runs on a CUDA GPU only; this run's device is {torch.device(device).type} "
                           "(use attention: auto, which packs rows without it)")  # fmt: skip
    if importlib.util.find_spec("flash_attn") is None and importlib.util.find_spec("kernels") is None:
        raise LiandanError("attention: flash_attention_2 needs the flash-attn package: pip install flash-attn "
                           "(it builds against your CUDA toolkit), or use attention: auto")  # fmt: skip


def check_output_dir(out_dir: Path, resume: bool) -> None:
    """Never overwrite a finished or running run by accident."""
    if resume:
        return
    if out_dir.exists() and any(out_dir.iterdir()):
        raise LiandanError(
            f"output directory '{out_dir}' is not empty; pass --resume to continue its run, "
            "or choose another --output-dir"
        )


def attach_trainable(model: Any, config: TrainConfig, new_token_ids: list[int]) -> Any:
    """LoRA adapters through PEFT (the base frozen), or every weight trainable with ``full``.
    Rows of newly added tokens (a base model given ChatML) are trained in both cases: under LoRA
    in the input embeddings and, when it is a separate matrix, in the output head, so that the
    model can learn to read and to predict them (PEFT's trainable token indices).

    ``all-linear`` is PEFT's choice of every linear layer but the output head, which covers fused
    projections (Phi-3's ``qkv_proj`` and ``gate_up_proj``) and a mixture of experts' expert
    weights; the experts' router is left out (adapting it moves the load balance, which the
    training loss does not watch)."""
    if config.full:
        model.requires_grad_(True)
        return model
    targets, parameters = lora_targets(model, config.lora.target_modules)
    lora = LoraConfig(
        r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
        target_modules=targets, target_parameters=parameters, task_type="CAUSAL_LM",
        trainable_token_indices=token_rows(model, new_token_ids) or None,
    )  # fmt: skip
    return get_peft_model(model, lora)


def lora_targets(model: Any, targets: list[str]) -> tuple[str | list[str], list[str] | None]:
    """PEFT's ``target_modules`` and ``target_parameters``. ``["all-linear"]`` is PEFT's own
    choice, except in a mixture of experts, where PEFT would also adapt the router: there it is
    spelled out as every linear layer but the head, plus the experts' fused 3-D weights."""
    if targets != ["all-linear"]:
        return targets, None
    routers = {name for name, module in model.named_modules() if type(module).__name__.endswith("Router")}
    if not routers:
        return "all-linear", None
    head = model.get_output_embeddings()
    linear = {name.split(".")[-1] for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and module is not head and name not in routers}  # fmt: skip
    experts = {f"{name.split('.')[-1]}.{weight}" for name, module in model.named_modules() if type(module).__name__.endswith("Experts")
               for weight, tensor in module.named_parameters(recurse=False) if tensor.ndim == 3}  # fmt: skip
    return sorted(linear), sorted(experts) or None


def token_rows(model: Any, new_token_ids: list[int]) -> dict[str, list[int]]:
    """PEFT ``trainable_token_indices``: the new rows of the input embeddings, and of the output
    head when the head is not the same matrix (tied heads follow the embeddings)."""
    if not new_token_ids:
        return {}
    names = {id(module): name for name, module in model.named_modules()}
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    rows = {names[id(embeddings)]: new_token_ids}
    if head is not None and head.weight is not embeddings.weight:
        rows[names[id(head)]] = new_token_ids
    return rows


def adapted_modules(model: Any) -> dict[str, Any]:
    """What a LoRA run trains, for the manifest and the data summary: the kinds of layers that
    carry adapters (``q_proj``, ``qkv_proj``, ``experts``...), with how many of each, and the
    modules whose new token rows are trained."""
    adapted: set[str] = set()
    tokens = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):  # PEFT nests one wrapper per expert weight: count the module once
            adapted.add(name.replace(".base_layer", ""))
        if isinstance(module, TrainableTokensWrapper):
            tokens[name.split(".")[-1]] = list(module.token_adapter.token_indices.get("default", []))
    counts: dict[str, int] = {}
    for name in adapted:
        counts[name.split(".")[-1]] = counts.get(name.split(".")[-1], 0) + 1
    return {"adapted_modules": dict(sorted(counts.items())), "trainable_token_rows": tokens}


def build_manifest(config: TrainConfig, model: Any, tokenizer: Any, data: dict, added_template: bool) -> dict:
    """What a run directory says about itself: versions, base model, what is trained, template,
    tokens, data."""
    source = resolve_model(config.model)
    template = tokenizer.chat_template or ""
    return {
        "liandan": __version__,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "accelerate": accelerate.__version__},  # fmt: skip
        "base_model": {"spec": config.model, "kind": source.kind, "weights_sha256": weights_hash(source),
                       **base_path_from_run(source, config.output_dir)},  # fmt: skip
        "method": "full" if config.full else "qlora" if config.quantize else "lora",
        **({} if config.full else adapted_modules(model)),
        **({"quantize": manifest_entry(config)} if config.quantize else {}),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "chat_template_added": added_template,
        "special_tokens": {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                           "pad": tokenizer.pad_token_id, "stop": stop_token_ids(tokenizer)},  # fmt: skip
        "data": data,
    }


def base_path_from_run(source, output_dir: str) -> dict:
    """``{"path_from_run": ...}`` for a local base model: where it is seen from the run directory,
    so that the run finds its base wherever it is used from (`liandan.models.manifest_base`)."""
    if source.kind not in ("hf_dir", "gguf", "adapter"):
        return {}
    return {"path_from_run": os.path.relpath(Path(source.location).resolve(), Path(output_dir).resolve())}


def sft_data_manifest(data, stats: dict, eval_stats: dict, eval_files: list[str]) -> dict:
    return {"files": file_hashes([*data.files, *eval_files]),
            "format": data.format, "records": len(data.examples) + len(data.skipped),
            "skipped": len(data.skipped), "train_examples": stats["examples"], "eval_examples": eval_stats["examples"],
            "train_tokens": stats["tokens"], "trained_tokens": stats["trained_tokens"],
            "truncated": stats["truncated"], "no_trained_tokens": len(stats["no_trained_tokens"]),
            "eval_no_trained_tokens": len(eval_stats["no_trained_tokens"])}  # fmt: skip


def file_hashes(paths: list[str]) -> dict[str, str]:
    """The SHA-256 of each data file (a Hub data set has none), for the manifest."""
    return {f: file_sha256(Path(f)) for f in paths if Path(f).is_file()}


def weights_hash(source) -> str | None:
    """The base model's weights hash for the manifest (`liandan.models.weights_sha256`)."""
    return weights_sha256(source.location)


def print_data_summary(data, stats: dict, eval_stats: dict, replay_info: dict) -> None:
    console = Console(stderr=True)
    replay = f", {replay_info['examples']} of them replay ({replay_info['source']})" if replay_info else ""
    console.print(
        f"data: {stats['examples']} training examples{replay} ({eval_stats['examples']} held out), {stats['tokens']} tokens, "
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
    if eval_stats["no_trained_tokens"]:
        console.print(f"[yellow]{len(eval_stats['no_trained_tokens'])} held-out examples have no trained token and were left "
                      f"out of the eval loss: {', '.join(eval_stats['no_trained_tokens'][:5])}[/]")  # fmt: skip
