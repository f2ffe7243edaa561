"""How a micro-batch becomes a loss, for each training stage. The loop in `liandan.train` is the
same for all of them; an objective says what to batch, what the loss is normalised by, and what
else to log.

    from liandan.objectives import sft_objective
    objective = sft_objective(packing=True, pad_id=0)
    batch = objective.collate(examples)
    loss_sum, stats = objective.loss(model, batch)     # divided by objective.count over the step

- **sft** and **pretrain**: next-token loss over trained tokens; normalised by the step's trained
  tokens, so accumulation and processes give the gradient of one big batch.
- **dpo**: the DPO loss per pair (`liandan.losses.dpo_loss`), normalised by the step's pairs; the
  reference log-probs come from the policy with its adapters switched off (LoRA: no second copy
  of the model) or were computed once before training (full fine-tuning).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .batching import collate, trained_positions
from .losses import IGNORE, dpo_loss, sequence_logps, sft_loss_sum


@dataclass
class Objective:
    name: str
    packing: bool
    """Whether micro-batches are planned as packed rows (or padded rows)."""
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    count: Callable[[dict[str, torch.Tensor]], int]
    """The units a micro-batch contributes to the step's normaliser (trained tokens, or pairs)."""
    loss: Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    """(sum of the loss over the micro-batch's units, sums of extra statistics to log per unit)."""


def micro_batch_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of token losses of one micro-batch and its trained-token count, computing logits only
    at trained positions."""
    targets = batch["targets"]
    keep = trained_positions(targets)
    inputs = {k: v for k, v in batch.items() if k != "targets"}
    out = model(**inputs, use_cache=False, logits_to_keep=keep)
    return sft_loss_sum(out.logits, targets[:, keep])  # logits (B, K, V)


def sft_objective(packing: bool, pad_id: int, name: str = "sft") -> Objective:
    return Objective(
        name=name, packing=packing,
        collate=lambda examples: collate(examples, packing, pad_id),
        count=lambda batch: int((batch["targets"] != IGNORE).sum()),
        loss=lambda model, batch: (micro_batch_loss(model, batch)[0], {}),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# DPO


def pair_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed reply log-probs of every row: (2B,), chosen rows first, then rejected."""
    targets = batch["targets"]
    keep = trained_positions(targets)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, logits_to_keep=keep)
    return sequence_logps(out.logits, targets[:, keep])  # logits (2B, K, V)


def reference_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference model's log-probs: precomputed (full fine-tuning) or the policy with its
    LoRA adapters disabled."""
    if "ref_logps" in batch:
        return batch["ref_logps"]
    inner = getattr(model, "module", model)  # under DDP: a no-grad pass needs no gradient sync
    with torch.no_grad(), inner.disable_adapter():
        return pair_logps(inner, batch)


def collate_pairs(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Padded rows: every chosen reply, then every rejected one (one forward pass for both)."""
    rows = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    batch = collate(rows, packing=False, pad_id=pad_id)  # (2B, T)
    if all("ref_logps" in p for p in pairs):
        batch["ref_logps"] = torch.tensor([p["ref_logps"][0] for p in pairs] + [p["ref_logps"][1] for p in pairs])
    return batch


def dpo_objective(pad_id: int, beta: float, label_smoothing: float, kind: str, sft_weight: float) -> Objective:
    def loss(model, batch):
        policy = pair_logps(model, batch)
        ref = reference_logps(model, batch).to(policy.device)
        n = policy.shape[0] // 2
        losses, chosen, rejected = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta, label_smoothing, kind)
        if sft_weight:
            # NLL per token of the chosen reply: keeps the chosen text likely, not just relatively so
            tokens = (batch["targets"][:n] != IGNORE).sum(-1).clamp(min=1)
            losses = losses - sft_weight * policy[:n] / tokens
        stats = {"reward_chosen": chosen.sum(), "reward_rejected": rejected.sum(),
                 "margin": (chosen - rejected).sum(), "accuracy": (chosen > rejected).float().sum()}  # fmt: skip
        return losses.sum(), stats

    return Objective(
        name="dpo", packing=False,
        collate=lambda pairs: collate_pairs(pairs, pad_id),
        count=lambda batch: batch["input_ids"].shape[0] // 2,
        loss=loss,
    )  # fmt: skip


@torch.no_grad()
def precompute_reference(model: Any, pairs: list[dict], pad_id: int, batch_size: int = 8) -> None:
    """Full fine-tuning has no adapters to switch off: store the starting model's log-probs of
    both replies of every pair before the first step."""
    model.eval()
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        logps = pair_logps(model, collate_pairs(chunk, pad_id)).tolist()
        for i, pair in enumerate(chunk):
            pair["ref_logps"] = (logps[i], logps[len(chunk) + i])
    model.train()
