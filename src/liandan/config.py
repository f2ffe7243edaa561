"""Typed run configs: dataclasses, read from YAML, with dotted ``--set key=value`` overrides.

    from liandan.config import SFTConfig, load_config
    config = load_config(SFTConfig, "examples/sft-persona.yaml", ["lr=1e-4", "lora.rank=8"])

Every field carries a one-line docstring; cross-field checks live in ``__post_init__`` and speak
in CLI terms. An unknown key is an error that suggests the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import LiandanError


# The settings that take one of a few words, named so that the checks below and the forms of
# `liandan ui` offer the same ones.
ATTENTION_KERNELS = ("auto", "eager", "sdpa", "flash_attention_2")
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
QUANTIZE_MODES = ("4bit",)
SPECIAL_TEXT_MODES = ("error", "plain")
DPO_LOSSES = ("sigmoid", "ipo", "orpo", "simpo", "kto")


@dataclass
class LoraConfig:
    rank: int = 16
    """LoRA rank r: the width of the low-rank update."""
    alpha: float = 32.0
    """LoRA scale numerator: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the LoRA input during training. Off by default: drawing a fresh mask for the
    input of every adapted layer took 30% of a CPU training step (default model, 2 cores)."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt; ["all-linear"] adapts every linear layer except the output head."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise LiandanError(f"lora.rank must be at least 1 (got {self.rank})")
        if not 0 <= self.dropout < 1:
            raise LiandanError(f"lora.dropout must be in [0, 1) (got {self.dropout})")


@dataclass
class TrainConfig:
    """What every training stage shares: the model, the data files, the run directory, LoRA or
    full fine-tuning, the optimizer and schedule, batching, precision and logging. Each stage's
    config adds only the settings that stage uses, so a setting it would ignore is refused."""

    model: str = "default"
    """Base model: default, a model directory, a .gguf file or a hub id."""
    data: list[str] = field(default_factory=list)
    """Training data files (JSONL, JSON, CSV, Parquet; .txt for pretrain)."""
    eval_data: list[str] = field(default_factory=list)
    """Held-out data in the stage's own format (conversations, preference pairs or text): eval loss
    and the stage's statistics during training."""
    eval_fraction: float = 0.0
    """Without eval_data: the fraction of the training data held out instead (0 = none)."""
    output_dir: str = "runs/sft"
    """Run directory: config, manifest, metrics, checkpoints and the final adapter or model."""
    full: bool = False
    """Full fine-tuning instead of LoRA."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings (ignored with full: true)."""
    quantize: str | None = None
    """QLoRA: "4bit" loads the frozen base weights in 4 bits (bitsandbytes NF4) on a CUDA GPU and
    trains LoRA adapters on top; unset keeps the weights as stored. Not with full: true."""
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.05
    """Fraction of the steps spent warming the learning rate up linearly, then cosine decay."""
    epochs: float = 3.0
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 means derive from epochs."""
    batch_tokens: int = 2048
    """Tokens in one micro-batch (packed) or the padded size budget (unpacked)."""
    batch_size: int = 0
    """At most this many examples in a micro-batch (0 = as many as fit in batch_tokens)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_length: int = 1024
    """Longest example in tokens; longer ones are truncated (and reported)."""
    attention: str = "auto"
    """Attention kernel for training: auto (packed rows on a CPU: per-example SDPA; otherwise the
    model's default), eager, sdpa or flash_attention_2."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them: far less
    memory at long sequences and large models, for about a third more compute per step."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0 = off)."""
    mixed_precision: str = "auto"
    """auto (bf16 where supported), no, bf16 or fp16."""
    seed: int = 0
    """Seed for shuffling, dropout and LoRA init."""
    eval_every: int = 0
    """Evaluate every N steps (0 = only at the end, when there is an eval split)."""
    save_every: int = 50
    """Write a resumable checkpoint every N steps (0 = not by steps)."""
    save_every_minutes: float = 30.0
    """Also write one when this many minutes have passed since the last (0 = not by time). With
    both at 0 there are no checkpoints: a crash loses the whole run."""
    save_total_limit: int = 2
    """Keep only the newest N checkpoints (0 = keep all)."""
    max_bad_steps: int = 3
    """Stop the run when this many steps in a row have a non-finite loss or gradient norm (each
    such step is skipped: no weight changes)."""
    resume_changed: bool = False
    """Allow --resume although the data or the training settings differ from the checkpoint's."""
    log_every: int = 1
    """Write metrics every N steps."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts to generate from at the end of the run (saved in samples.jsonl)."""
    report_to: list[str] = field(default_factory=list)
    """Extra trackers through accelerate: tensorboard, wandb (when installed)."""
    trust_remote_code: bool = False
    """Allow model code from the model's repository to run."""
    special_text: str = "error"
    """Special-token text (e.g. '<|im_start|>') typed inside the data: error (stop, naming
    FILE:LINE and field) or plain (train it as ordinary characters). Never a control token."""

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = build(LoraConfig, self.lora, "lora.")
        checks = [
            (math.isfinite(self.lr) and self.lr > 0, f"lr must be a finite number above 0 (got {self.lr})"),
            (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0, f"max_grad_norm must be a finite number, 0 (off) or more (got {self.max_grad_norm})"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"weight_decay must be a finite number, 0 or more (got {self.weight_decay})"),
            (self.log_every >= 1, f"log_every must be at least 1 (got {self.log_every})"),
            (self.eval_every >= 0, f"eval_every must be 0 (only at the end) or more (got {self.eval_every})"),
            (self.save_every >= 0, f"save_every must be 0 (no checkpoints) or more (got {self.save_every})"),
            (math.isfinite(self.save_every_minutes) and self.save_every_minutes >= 0, f"save_every_minutes must be a finite number, 0 (not by time) or more (got {self.save_every_minutes})"),
            (self.save_total_limit >= 0, f"save_total_limit must be 0 (keep all) or more (got {self.save_total_limit})"),
            (self.max_bad_steps >= 1, f"max_bad_steps must be at least 1 (got {self.max_bad_steps})"),
            (self.max_steps >= 0, f"max_steps must be 0 or more (got {self.max_steps})"),
            (math.isfinite(self.epochs) and (self.epochs > 0 or self.max_steps > 0), f"epochs must be a finite number, above 0 when max_steps is 0 (got {self.epochs})"),
            (self.batch_size >= 0, f"batch_size must be 0 (no limit) or more (got {self.batch_size})"),
            (self.grad_accum >= 1, f"grad_accum must be at least 1 (got {self.grad_accum})"),
            (self.max_length >= 8, f"max_length must be at least 8 (got {self.max_length})"),
            (self.batch_tokens >= self.max_length, f"batch_tokens ({self.batch_tokens}) must be at least max_length ({self.max_length})"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1) (got {self.warmup_ratio})"),
            (0 <= self.eval_fraction < 1, f"eval_fraction must be in [0, 1) (got {self.eval_fraction})"),
            (self.attention in ATTENTION_KERNELS, f"attention must be auto, eager, sdpa or flash_attention_2 (got {self.attention!r})"),
            (self.mixed_precision in MIXED_PRECISIONS, f"mixed_precision must be auto, no, bf16 or fp16 (got {self.mixed_precision!r})"),
            (self.attention != "flash_attention_2" or self.mixed_precision != "no", "attention: flash_attention_2 computes in bf16 or fp16 only; set mixed_precision to auto, bf16 or fp16 (got no)"),
            (self.quantize in (None, *QUANTIZE_MODES), f"quantize must be 4bit or unset (got {self.quantize!r})"),
            (not (self.quantize and self.full), "quantize: 4bit trains LoRA adapters on frozen 4-bit weights; it cannot be combined with full: true"),
            (self.special_text in SPECIAL_TEXT_MODES, f"special_text must be error or plain (got {self.special_text!r})"),
        ]  # fmt: skip
        raise_first(checks)


@dataclass
class PretrainConfig(TrainConfig):
    """Continued pre-training on raw text; max_length is the block size."""

    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    epochs: float = 1.0
    """Passes over the text (ignored when max_steps > 0)."""
    max_length: int = 512
    """Block size: the text is concatenated (EOS between documents) and cut into blocks of this many tokens."""
    output_dir: str = "runs/pretrain"
    """Run directory."""


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on conversations: only the assistant's replies are trained."""

    format: str | None = None
    """Force a data format (messages, sharegpt, alpaca, prompt_completion); detected if unset."""
    skip_invalid: bool = False
    """Drop invalid records (and report them) instead of stopping at the first one."""
    packing: bool = True
    """Pack several examples into one row without padding: position ids restart at each example
    and attention never crosses examples, so no compute is spent on padding tokens."""
    replay: str | None = None
    """Mix general data in against forgetting: "self" (the base model's own answers to general
    prompts, generated before training and cached) or a data file."""
    replay_ratio: float = 0.5
    """Replay examples per task example (at most 1: replay must not outweigh the task)."""
    replay_prompts: str = "default"
    """Prompts the base model answers for replay "self": "default" (shipped) or a .jsonl/.txt file."""
    replay_max_new_tokens: int = 256
    """Longest self-replay answer; answers that do not stop within it are left out."""
    tools_template: str | None = None
    """For tool-calling data on a model whose chat template renders no tools: "chatml" (liandan's
    ChatML template with tools, for ChatML models such as the default) or a .jinja file. The run
    saves it with its tokenizer; a model whose own template renders tools keeps its own."""

    def __post_init__(self) -> None:
        super().__post_init__()
        raise_first([
            (self.tools_template is None or self.tools_template == "chatml" or self.tools_template.endswith(".jinja"),
             f"tools_template must be chatml or a .jinja file (got {self.tools_template!r})"),
            (0 <= self.replay_ratio <= 1, f"replay_ratio must be between 0 and 1: replay examples per task example, and replay must not outweigh the task (got {self.replay_ratio})"),
            (self.replay_max_new_tokens >= 1, f"replay_max_new_tokens must be at least 1 (got {self.replay_max_new_tokens})"),
        ])  # fmt: skip


@dataclass
class DPOConfig(TrainConfig):
    """Preference alignment on chosen / rejected pairs (DPO, IPO, ORPO, SimPO), or on completions
    labelled desirable or not (KTO)."""

    lr: float = 5e-5
    """Peak learning rate (AdamW); DPO wants a gentler one than SFT."""
    epochs: float = 2.0
    """Passes over the pairs (ignored when max_steps > 0)."""
    output_dir: str = "runs/dpo"
    """Run directory."""
    beta: float | None = None
    """The loss's scale: how far the policy may move from the reference (larger keeps it closer);
    ORPO's lambda. Unset: the loss's own default, 2.0 for simpo (its paper), 0.1 for the others."""
    label_smoothing: float = 0.0
    """Conservative DPO: the share of pairs assumed to be labelled the wrong way round (0 = plain
    DPO); loss sigmoid and simpo only."""
    loss: str = "sigmoid"
    """sigmoid (DPO), ipo, orpo or simpo (both reference-free), or kto (unpaired data accepted)."""
    sft_weight: float = 0.0
    """Weight of an extra NLL term on the chosen reply (0 = off); not with orpo (its loss has one) or kto."""
    simpo_gamma: float = 1.0
    """SimPO's target reward margin gamma: the chosen reply's length-normalised reward must beat
    the rejected one's by this much (1.0 = half the default beta, the paper's gamma / beta = 0.5)."""
    desirable_weight: float = 1.0
    """KTO: weight of the desirable examples' losses (raise it when they are the fewer)."""
    undesirable_weight: float = 1.0
    """KTO: weight of the undesirable examples' losses."""

    def __post_init__(self) -> None:
        super().__post_init__()
        raise_first([(self.loss in DPO_LOSSES, f"loss must be sigmoid, ipo, orpo, simpo or kto (got {self.loss!r})")])
        if self.beta is None:
            self.beta = 2.0 if self.loss == "simpo" else 0.1
        weights = (self.desirable_weight, self.undesirable_weight)
        raise_first([
            (math.isfinite(self.beta) and self.beta > 0, f"beta must be above 0 (got {self.beta})"),
            (0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5) (got {self.label_smoothing})"),
            (self.label_smoothing == 0 or self.loss in ("sigmoid", "simpo"), f"label_smoothing is used by loss sigmoid and simpo only (got loss={self.loss})"),
            (self.sft_weight >= 0, f"sft_weight must be 0 or more (got {self.sft_weight})"),
            (self.sft_weight == 0 or self.loss not in ("orpo", "kto"), f"sft_weight is not used with loss={self.loss}" + (" (its loss already trains the chosen reply's NLL)" if self.loss == "orpo" else "")),
            (math.isfinite(self.simpo_gamma) and self.simpo_gamma >= 0, f"simpo_gamma must be a finite number, 0 or more (got {self.simpo_gamma})"),
            (self.simpo_gamma == 1.0 or self.loss == "simpo", f"simpo_gamma is used by loss simpo only (got loss={self.loss})"),
            (all(math.isfinite(w) and w > 0 for w in weights), f"desirable_weight and undesirable_weight must be above 0 (got {weights[0]} and {weights[1]})"),
            (weights == (1.0, 1.0) or self.loss == "kto", f"desirable_weight and undesirable_weight are used by loss kto only (got loss={self.loss})"),
        ])  # fmt: skip


GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
GRPO_SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class GRPOConfig(TrainConfig):
    """Reinforcement learning from verifiable rewards (GRPO): the policy samples completions of
    each prompt, the rewards score them, and it is pushed toward the better ones (`liandan.grpo`)."""

    lr: float = 5e-5
    """Peak learning rate (AdamW)."""
    epochs: float = 1.0
    """Passes over the prompts (ignored when max_steps > 0)."""
    output_dir: str = "runs/grpo"
    """Run directory."""
    batch_size: int = 4
    """Prompts in a micro-batch; each gets num_generations completions."""
    rewards: list[str] = field(default_factory=lambda: ["checks"])
    """Reward specs (`liandan.rewards`): checks (the record's own), KEY=VALUE checks, schema=FILE
    (graded), stop, max_tokens=N, python=module:function (with --allow-code)."""
    reward_weights: list[float] = field(default_factory=list)
    """One weight per reward (default: 1 each); the reward is their weighted sum."""
    num_generations: int = 4
    """Completions sampled per prompt: the group whose rewards are compared."""
    max_completion_length: int = 128
    """Longest sampled completion in tokens."""
    temperature: float = 1.0
    """Sampling temperature of the completions (above 0)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens up to this probability mass."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0 = all)."""
    num_iterations: int = 1
    """Optimizer steps on each round of completions (above 1: clipped against the sampling policy)."""
    epsilon: float = 0.2
    """Clip the probability ratio below at 1 - epsilon."""
    epsilon_high: float = 0.2
    """Clip it above at 1 + epsilon_high (DAPO raises it to 0.28)."""
    beta: float = 0.0
    """Weight of the KL to the reference (0 = none, no reference pass; the k3 estimator)."""
    loss_type: str = "dapo"
    """How token losses are averaged: grpo (per completion, then over completions), dr_grpo
    (sum / (completions x max_completion_length)) or dapo (sum / all completion tokens)."""
    scale_rewards: str = "group"
    """Divide advantages by the std of the group's rewards (group), of the step's (batch), or not (none)."""
    mask_truncated_completions: bool = False
    """Train nothing on completions that ran out of room (no stop token)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        raise_first([
            (self.num_generations >= 2, f"num_generations must be at least 2: GRPO compares the completions of a prompt (got {self.num_generations})"),
            (self.max_completion_length >= 1, f"max_completion_length must be at least 1 (got {self.max_completion_length})"),
            (self.max_completion_length < self.max_length, f"max_completion_length ({self.max_completion_length}) must be below max_length ({self.max_length}), which holds prompt and completion"),
            (math.isfinite(self.temperature) and self.temperature > 0, f"temperature must be above 0: GRPO samples (got {self.temperature})"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),
            (self.top_k >= 0, f"top_k must be 0 (all) or more (got {self.top_k})"),
            (self.num_iterations >= 1, f"num_iterations must be at least 1 (got {self.num_iterations})"),
            (0 <= self.epsilon < 1, f"epsilon must be in [0, 1) (got {self.epsilon})"),
            (self.epsilon_high >= 0, f"epsilon_high must be 0 or more (got {self.epsilon_high})"),
            (math.isfinite(self.beta) and self.beta >= 0, f"beta must be 0 (no KL) or more (got {self.beta})"),
            (self.loss_type in GRPO_LOSS_TYPES, f"loss_type must be {', '.join(GRPO_LOSS_TYPES)} (got {self.loss_type!r})"),
            (self.scale_rewards in GRPO_SCALE_REWARDS, f"scale_rewards must be {', '.join(GRPO_SCALE_REWARDS)} (got {self.scale_rewards!r})"),
            (self.batch_size >= 1, f"batch_size must be at least 1 prompt (got {self.batch_size})"),
            (not self.eval_data and not self.eval_fraction, "eval_data and eval_fraction do nothing for grpo: measure the run with liandan eval --task (its checks are the rewards')"),
            (bool(self.rewards), "rewards: give at least one reward (e.g. --reward checks)"),
        ])  # fmt: skip


def raise_first(checks: list[tuple[bool, str]]) -> None:
    """Raise the message of the first check that failed, worded for the command line."""
    for ok, message in checks:
        if not ok:
            raise LiandanError(message)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None, **values: Any):
    """Build ``cls`` from a YAML file, then keyword values, then ``key=value`` overrides (dotted
    keys reach nested configs: ``lora.rank=8``). Values are parsed as YAML (``1e-4``, ``true``)."""
    data: dict = {}
    if path is not None:
        data = read_yaml(Path(path))
    for key, value in values.items():
        if value is not None:
            data[key] = value
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise LiandanError(f"--set {item!r}: expected key=value, for example --set lr=1e-4")
        set_dotted(data, key.strip(), parse_value(raw))
    return build(cls, data, "")


def resume_config(output_dir: str | None, overrides: list[str] | None) -> Path | None:
    """The settings file a resumed run started with (``OUTPUT_DIR/config.yaml``), if there is one.
    The directory may be someone else's, so the file is named aloud, and one that lets model code
    run (trust_remote_code) is refused unless ``--set trust_remote_code=true`` says so too."""
    path = Path(output_dir) / "config.yaml" if output_dir else None
    if path is None or not path.is_file():
        return None
    allowed = any(o.replace(" ", "").lower() == "trust_remote_code=true" for o in overrides or [])
    if read_yaml(path).get("trust_remote_code") is True and not allowed:
        raise LiandanError(f"--resume: '{path}' sets trust_remote_code: true, which lets the model's repository run code; "
                           "if you trust this run directory and its model, add --set trust_remote_code=true")  # fmt: skip
    print(f"resuming with the settings in '{path}'", file=sys.stderr)
    return path


def parse_value(raw: str) -> Any:
    """A --set value as YAML, except that YAML 1.1's yes/no/on/off stay words
    (``--set mixed_precision=no`` means the string "no", not False)."""
    if raw.strip().lower() in ("yes", "no", "on", "off", "y", "n", ""):
        return raw.strip()
    return yaml.safe_load(raw)


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise LiandanError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise LiandanError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise LiandanError(f"{path}: expected a mapping of settings at the top level")
    return data


def set_dotted(data: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            raise LiandanError(f"--set {key}: '{part}' is not a group of settings")
    data[last] = value


def build(cls: type, data: dict, prefix: str, stage: str | None = None):
    """Instantiate a config dataclass from a dict, checking names and types field by field.
    ``stage`` names the command in errors (a training config's own; nested groups inherit it)."""
    stage = next((name for name, config in STAGES.items() if config is cls), stage)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise LiandanError(unknown_key(prefix + key, [prefix + name for name in fields], stage))
        kwargs[key] = coerce(value, hints[key], prefix + key, stage)
    return cls(**kwargs)


def unknown_key(key: str, valid: list[str], stage: str | None = None) -> str:
    """The error for a setting ``stage`` does not have: the stage that has it, if another one
    does, and the nearest valid key."""
    where = f"{stage}: " if stage else ""
    owners = [name for name, config in STAGES.items() if name != stage and key in {f.name for f in dataclasses.fields(config)}]
    elsewhere = f" (a setting of {' and '.join(owners)}, which {stage} does not use)" if owners and stage else ""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f"{where}unknown setting '{key}'{elsewhere}; did you mean '{close[0]}'?"
    nearest = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    hint = f"; the nearest valid key is '{nearest[0]}' (all: {', '.join(valid)})" if nearest else ""
    return f"{where}unknown setting '{key}'{elsewhere}{hint}"


def coerce(value: Any, hint: Any, key: str, stage: str | None = None) -> Any:
    """Check a value against a field's type; ints become floats and a string becomes a list."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return coerce(value, hint, key, stage)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise LiandanError(f"setting '{key}': expected a group of settings, got {value!r}")
        return build(hint, value, key + ".", stage)
    if origin is list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise LiandanError(f"setting '{key}': expected a list, got {value!r}")
        return [coerce(item, args[0], f"{key}[{i}]", stage) for i, item in enumerate(items)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if hint is str and isinstance(value, bool):
        raise LiandanError(f"setting '{key}': expected a string, got {value!r} (in YAML write it in quotes, e.g. \"no\")")
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise LiandanError(f"setting '{key}': expected {hint.__name__}, got {value!r}")
    return value


def save_config(config: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True), encoding="utf-8")


STAGES: dict[str, type[TrainConfig]] = {"sft": SFTConfig, "dpo": DPOConfig, "pretrain": PretrainConfig, "grpo": GRPOConfig}
"""Every training stage's config by its command name, as errors name it (a refused setting names
the stage that has it)."""
