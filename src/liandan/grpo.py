"""Reinforcement learning from verifiable rewards: GRPO (Shao et al., 2024, DeepSeekMath) on the
training loop of `liandan.train`.

    from liandan.config import GRPOConfig
    from liandan.train import train_grpo
    train_grpo(GRPOConfig(data=["prompts.jsonl"], rewards=["checks"], max_steps=20))

Each round, the policy itself samples ``num_generations`` completions of every prompt of the
step (batched, with the KV cache, in eval mode, adapters on, the sampling seeded by the round so a
resumed run draws the same; `liandan.group_sampling`: each prompt prefilled once, finished
completions dropped from the batch). Each completion is scored by the rewards (`liandan.rewards`); its
advantage is its reward against its group's (the same prompt's completions):

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)          scale_rewards: group
          (r_i - mean(r_group)) / (std(r_batch) + 1e-4)          scale_rewards: batch
          (r_i - mean(r_group))                                  scale_rewards: none (Dr. GRPO)

and every completion token t is trained with the clipped surrogate of PPO, plus the k3 estimate
of the KL to the reference when ``beta`` > 0 (the reference is the policy with its adapters
switched off under LoRA, a frozen copy of the starting model under full fine-tuning):

    ratio_t = pi(y_t) / pi_old(y_t)
    loss_t  = -min(ratio_t A, clip(ratio_t, 1 - epsilon, 1 + epsilon_high) A)
              + beta (pi_ref(y_t) / pi(y_t) - log(pi_ref(y_t) / pi(y_t)) - 1)

``num_iterations`` optimizer steps reuse one round's completions; pi_old is the policy that
sampled them (with one iteration, pi_old = pi detached: the ratio is 1 and the gradient is the
plain policy gradient). The losses are normalised as each paper does (``loss_type``):

- ``grpo``: the mean over each completion's tokens, then over completions;
- ``dr_grpo`` (Liu et al., 2025): the sum over tokens / (completions x max_completion_length);
- ``dapo`` (Yu et al., 2025): the sum over tokens / all completion tokens of the step.

On a CPU (liandan's packed attention) a micro-batch is one row in which each prompt appears once,
followed by its completions, each attending to it (`liandan.batching.collate_shared_prefixes`):
the prompt's forward and backward are computed once per group instead of once per completion,
and no padding is computed; the log-probs and gradients are those of padded rows.

A prompt record is ``prompt`` (text) or ``messages`` (a conversation; a final assistant turn is
its reference answer), with any other fields: ``checks``, ``reference`` and whatever a Python
reward function reads.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .attention import PACKED, generation_attention, register
from .batching import collate, collate_shared_prefixes
from .chat import chat_stop_ids
from .checkpoints import truncate_metrics
from .config import GRPOConfig
from .errors import LiandanError
from .eval_sets import record_checks
from .generation import SamplingConfig, count_until_stop, prompt_ids
from .group_sampling import sample_groups
from .losses import IGNORE_INDEX
from .objectives import Objective, trained_token_nll
from .prompts import read_prompts
from .rewards import Completion, Reward, score_completions

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "targets", "cu_seq_lens_q", "shared_prefix_of")
"""What of a rollout micro-batch goes into the model (the rest is advantages, weights, log-probs)."""


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


# ---------------------------------------------------------------------------------------------
# The algorithm as tensor functions


def group_advantages(rewards: torch.Tensor, group: int, scale: str, batch_std: torch.Tensor | None = None) -> torch.Tensor:
    """Advantages of (N,) rewards, N = prompts x group, each prompt's completions consecutive.
    ``batch_std``: the std of the whole step's rewards for ``scale="batch"`` (default: of these)."""
    grouped = rewards.view(-1, group)  # (P, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)
    elif scale == "batch":
        centred = centred / ((rewards.std() if batch_std is None else batch_std) + 1e-4)
    return centred.flatten()


def clipped_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, epsilon: float,
                       epsilon_high: float, ref_logp: torch.Tensor | None = None, beta: float = 0.0) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per-token loss of (N,) completion tokens (see the module docstring), with what is logged:
    the KL estimate and where the clip was active (the ratio outside the range on the side where
    the advantage would push it further)."""
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    out = {"clip_low": ((ratio < 1 - epsilon) & (advantages < 0)).float(),
           "clip_high": ((ratio > 1 + epsilon_high) & (advantages > 0)).float()}  # fmt: skip
    if beta:
        diff = ref_logp - logp
        kl = torch.exp(diff) - diff - 1  # k3: unbiased, always >= 0
        loss = loss + beta * kl
        out["kl"] = kl.detach()
    out["loss"] = loss
    return out


def reduce_tokens(values: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, n_rows: int, loss_type: str,
                  max_completion_length: int) -> torch.Tensor:  # fmt: skip
    """Sum over a micro-batch of per-token ``values`` (N,), normalised within each completion as
    ``loss_type`` does; divided by `count_units` over the step it is the loss. ``weights`` (N,)
    are 0 for tokens of masked (truncated) completions."""
    values = values * weights
    if loss_type == "dapo":
        return values.sum()
    if loss_type == "dr_grpo":
        return values.sum() / max_completion_length
    sums = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)
    tokens = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, weights)
    return (sums / tokens.clamp(min=1)).sum()


def row_means(values: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Sum over completions of each one's mean of ``values``: a statistic per completion."""
    return reduce_tokens(values, rows, weights, n_rows, "grpo", 1)


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class PromptRecord:
    prompt: Any
    reference: str | None
    checks: Any


def read_grpo_prompts(paths: list[str], tokenizer: Any, config: GRPOConfig, rewards: list[Reward]) -> list[dict]:
    """Every prompt of the data files as training items: the prompt's token ids (the chat template
    with its assistant header) and its record. A prompt that leaves no room for a completion of
    ``max_completion_length`` within ``max_length``, or that lacks what a reward reads (its checks,
    its reference answer), is an error naming it, before any step."""
    needs_checks = any(r.name == "checks" for r in rewards)
    needs_reference = any(r.name.startswith("reference_") for r in rewards)
    items = []
    room = config.max_length - config.max_completion_length
    for path in paths:
        if Path(path).suffix.lower() != ".jsonl":
            raise LiandanError(f"GRPO data '{path}': expected a .jsonl file of prompt records ('prompt' or 'messages', and any other fields)")
        for prompt in read_prompts(path):
            reference, prompt, checks = record_checks(prompt, Path(path).parent)
            if checks is not None and "tool_call" in checks.tests:
                raise LiandanError(f"{prompt.source}: field 'checks': tool_call is an evaluation check; GRPO does not read "
                                   "tool calls back as rewards yet")  # fmt: skip
            if needs_checks and checks is None:
                raise LiandanError(f"{prompt.source}: field 'checks': the 'checks' reward needs checks or a reference answer in every record")
            if needs_reference and reference is None:
                raise LiandanError(f"{prompt.source}: field 'reference': a reference reward needs a reference answer in every record")
            ids = prompt_ids(tokenizer, prompt, "chat", None)
            if len(ids) > room:
                raise LiandanError(f"{prompt.source}: field '{'messages' if prompt.messages else 'prompt'}': {len(ids)} tokens, more than "
                                   f"max_length - max_completion_length = {room}; raise max_length or shorten the prompt")  # fmt: skip
            items.append({"input_ids": ids, "record": PromptRecord(prompt, reference, checks)})
    if not items:
        raise LiandanError(f"no prompts in {', '.join(paths)}")
    return items


# ---------------------------------------------------------------------------------------------
# Rollouts and the objective


class Rollouts:
    """Samples and scores a round of completions, and turns them into the step's micro-batches.
    A round is reused for ``num_iterations`` steps."""

    def __init__(self, config: GRPOConfig, tokenizer: Any, rewards: list[Reward], pad_id: int, out_dir: Path,
                 reference: Any = None):  # fmt: skip
        self.config, self.tokenizer, self.rewards, self.pad_id = config, tokenizer, rewards, pad_id
        self.log_path = out_dir / "completions.jsonl"
        self.reference = reference  # a frozen copy of the starting model (full fine-tuning with beta > 0)
        self.round: int | None = None
        self.shared = False  # one row per micro-batch, each prompt shared by its completions (set per round)
        self.batches: list[dict] = []
        self.metrics: dict[str, float] = {}
        self.logged_from: int | None = None

    def __call__(self, model: Any, micro: list[list[dict]], step: int, accelerator: Any) -> tuple[list[dict], dict]:
        round_ = step // self.config.num_iterations
        if round_ == self.round:  # a later iteration on the same samples
            return self.batches, {k: v for k, v in self.metrics.items() if k != "rollout_seconds"}
        started = time.perf_counter()
        self.sample(accelerator.unwrap_model(model), micro, round_, step, accelerator)
        self.round = round_
        self.metrics["rollout_seconds"] = time.perf_counter() - started  # sampling, scoring, pi_old and pi_ref
        return self.batches, self.metrics

    @torch.no_grad()
    def sample(self, model: Any, micro: list[list[dict]], round_: int, step: int, accelerator: Any) -> None:
        config = self.config
        stops = chat_stop_ids(self.tokenizer, getattr(model, "generation_config", None))
        sampling = SamplingConfig(max_new_tokens=config.max_completion_length, temperature=config.temperature,
                                  top_p=config.top_p, top_k=config.top_k, num_samples=config.num_generations)  # fmt: skip
        # Under liandan's packed attention (CPUs) each prompt is in a micro-batch once, shared by its completions.
        self.shared = model.config._attn_implementation == PACKED
        was_training = model.training
        model.eval()
        completions: list[list[Completion]] = []
        rng = torch.get_rng_state()
        try:
            with generation_attention(model):
                for j, items in enumerate(micro):
                    # The same round draws the same samples, on a resumed run too.
                    torch.manual_seed(hash((config.seed, round_, j, accelerator.process_index)) % (2**63))
                    with accelerator.autocast():
                        new_ids = sample_groups(model, [it["input_ids"] for it in items], config.num_generations, sampling,
                                                stops, self.pad_id)  # fmt: skip
                    completions.append(self.completions(items, new_ids, stops))
        finally:
            torch.set_rng_state(rng)
            model.train(was_training)
        scored = [score_completions(self.rewards, group) for group in completions]
        everything = torch.tensor([r for total, _ in scored for r in total])
        self.batches = []
        for items, group, (total, _) in zip(micro, completions, scored, strict=True):
            advantages = group_advantages(torch.tensor(total), config.num_generations, config.scale_rewards, batch_std=everything.std())
            self.batches.append(self.batch(items, group, advantages))
        self.add_logps(model, accelerator)
        self.metrics = self.summarise(completions, scored, everything)
        if accelerator.is_main_process:
            self.log(step, completions[0][: config.num_generations], scored[0], self.batches[0]["advantages"])

    def completions(self, items: list[dict], new_ids: list[list[int]], stops: list[int]) -> list[Completion]:
        out = []
        for row, ids in enumerate(new_ids):
            record = items[row // self.config.num_generations]["record"]
            count, stopped = count_until_stop(ids, stops)
            text = self.tokenizer.decode(ids[: count - int(stopped)], skip_special_tokens=False)
            out.append(Completion(prompt=record.prompt, text=text, ids=ids[:count], stopped=stopped,
                                  reference=record.reference, checks=record.checks))  # fmt: skip
        return out

    def batch(self, items: list[dict], group: list[Completion], advantages: torch.Tensor) -> dict:
        """The micro-batch of completions, only the completions (with their stop tokens) trained:
        one row holding each prompt once and its completions after it (`collate_shared_prefixes`)
        under liandan's packed attention, else padded rows prompt + completion. With each
        completion's advantage and weight (0 for a truncated one when those are masked), and
        ``completion_of``: the completion of each trained token."""
        g = self.config.num_generations
        completions = [c.ids or [self.pad_id] for c in group]  # an empty completion still has a token
        if self.shared:
            batch = collate_shared_prefixes([(it["input_ids"], completions[i * g : (i + 1) * g]) for i, it in enumerate(items)])
        else:
            rows = [{"input_ids": items[r // g]["input_ids"] + ids, "labels": [IGNORE_INDEX] * len(items[r // g]["input_ids"]) + ids}
                    for r, ids in enumerate(completions)]  # fmt: skip
            batch = collate(rows, packing=False, pad_id=self.pad_id)
            batch["completion_of"] = (batch["targets"] != IGNORE_INDEX).nonzero()[:, 0]
        keep = [0.0 if self.config.mask_truncated_completions and not c.stopped else 1.0 for c in group]
        batch["advantages"] = advantages.float()  # (R,)
        batch["keep"] = torch.tensor(keep)  # (R,)
        return batch

    def add_logps(self, model: Any, accelerator: Any) -> None:
        """pi_old (when a round serves several steps) and pi_ref (when beta > 0), per trained token."""
        if self.shared and self.reference is not None and self.reference.config._attn_implementation != PACKED:
            register()
            self.reference.set_attn_implementation(PACKED)
        for batch in self.batches:
            moved = {k: v.to(accelerator.device) for k, v in model_inputs(batch).items()}
            with accelerator.autocast():
                if self.config.num_iterations > 1:
                    batch["old_logps"] = -trained_token_nll(model, moved)[0].cpu()
                if self.config.beta:
                    if self.reference is not None:  # on the run's device, or on the CPU under FSDP / DeepSpeed
                        where = next(self.reference.parameters()).device
                        batch["ref_logps"] = -trained_token_nll(self.reference, {k: v.to(where) for k, v in moved.items()})[0].cpu()
                    else:
                        with model.disable_adapter():
                            batch["ref_logps"] = -trained_token_nll(model, moved)[0].cpu()

    def summarise(self, completions: list[list[Completion]], scored: list, everything: torch.Tensor) -> dict[str, float]:
        flat = [c for group in completions for c in group]
        groups = everything.view(-1, self.config.num_generations)
        metrics = {"reward": float(everything.mean()), "reward_std": float(everything.std()) if everything.numel() > 1 else 0.0,
                   "no_signal_groups": float((groups.std(dim=1) == 0).float().mean()) if groups.shape[1] > 1 else 1.0,
                   "completion_tokens": sum(len(c.ids) for c in flat) / len(flat),
                   "stop_rate": sum(c.stopped for c in flat) / len(flat)}  # fmt: skip
        for reward in self.rewards:
            values = [v for _, per in scored for v in per[reward.name] if v is not None]
            metrics[f"reward/{reward.name}"] = sum(values) / len(values) if values else float("nan")
        return metrics

    def log(self, step: int, group: list[Completion], scored: tuple, advantages: torch.Tensor) -> None:
        """The first prompt's completions of the round, with their rewards, in completions.jsonl."""
        if self.logged_from is None:  # a resumed run drops what it logged after its checkpoint
            truncate_metrics(self.log_path, step)
            self.logged_from = step
        total, per = scored
        with open(self.log_path, "a", encoding="utf-8") as f:
            for i, c in enumerate(group):
                f.write(json.dumps({"step": step + 1, "prompt": c.prompt.display, "completion": c.text, "tokens": len(c.ids),
                                    "stopped": c.stopped, "reward": total[i], "rewards": {k: v[i] for k, v in per.items()},
                                    "advantage": round(float(advantages[i]), 4)}, ensure_ascii=False) + "\n")  # fmt: skip


def count_units(batch: dict[str, torch.Tensor], loss_type: str) -> int:
    """What a micro-batch adds to the step's normaliser: completion tokens (dapo) or completions."""
    if loss_type == "dapo":
        return int(batch["keep"][batch["completion_of"]].sum())
    return int(batch["keep"].numel())


def grpo_objective(config: GRPOConfig, rollouts: Rollouts) -> Objective:
    def loss(model, batch):
        logp = -trained_token_nll(model, model_inputs(batch))[0]  # (N,) log-probs of the completion tokens, in order
        rows = batch["completion_of"]  # (N,) the completion of each
        old = batch["old_logps"] if "old_logps" in batch else logp.detach()
        n_rows = batch["keep"].numel()
        out = clipped_token_loss(logp, old, batch["advantages"][rows], config.epsilon, config.epsilon_high,
                                 batch.get("ref_logps"), config.beta)  # fmt: skip
        weights = batch["keep"][rows]
        loss_sum = reduce_tokens(out["loss"], rows, weights, n_rows, config.loss_type, config.max_completion_length)
        per_unit = (lambda v: (v * weights).sum()) if config.loss_type == "dapo" else (lambda v: row_means(v, rows, weights, n_rows))
        stats = {"clip_ratio_low": per_unit(out["clip_low"]), "clip_ratio_high": per_unit(out["clip_high"])}
        if "kl" in out:
            stats["kl"] = per_unit(out["kl"])
        return loss_sum, stats

    return Objective(name="grpo", packing=True, collate=_no_collate, count=lambda batch: count_units(batch, config.loss_type),
                     loss=loss, rollout=rollouts, iterations=config.num_iterations)  # fmt: skip


def _no_collate(items: list[dict]) -> dict:
    raise LiandanError("GRPO builds its micro-batches from sampled completions (Rollouts), not from the data")

