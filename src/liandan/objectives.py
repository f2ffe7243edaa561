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
- **orpo** and **simpo** (`liandan.losses.orpo_loss`, `simpo_loss`): reference-free preference
  losses on each reply's per-token average log-prob; no reference pass at all.
- **kto** (`liandan.losses.kto_loss`): one completion per example, desirable or not, normalised by
  the step's examples; each example carries a mismatched row (its completion after another
  prompt) for the KL reference point z0, estimated per micro-batch. ``reward_desirable`` and
  ``reward_undesirable`` are means over their own kind (`Objective.averaged_over`); ``desirable``
  and ``undesirable`` are the kinds' shares of the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .batching import collate, trained_positions
from .losses import IGNORE_INDEX, dpo_loss, kto_loss, kto_reference_point, orpo_loss, simpo_loss, token_nll


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
    rollout: Callable[[Any, list[list[dict]], int, Any], tuple[list[dict], dict]] | None = None
    """Online objectives (GRPO): (model, the step's items per micro-batch, step, accelerator) ->
    (the micro-batches, metrics of the step), built from the policy's own samples."""
    iterations: int = 1
    """Optimizer steps that reuse one rollout (GRPO's num_iterations); the data advances once per rollout."""
    averaged_over: dict[str, str] = field(default_factory=dict)
    """Statistics that are a mean over a subset: the statistic whose sum is their denominator
    (KTO's reward of the desirable examples over the desirable count), instead of the step's units."""


def trained_token_nll(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative log-likelihood of every trained target of a micro-batch, (N,) fp32, and the row
    each belongs to, (N,).

    The model runs without its output head (no logits kept); `token_nll` applies the head to the
    trained positions' final hidden states in chunks, so the (tokens x vocabulary) logits never
    exist in full. A head that is not a plain linear layer (LoRA on the head, trainable tokens)
    falls back to the model's logits at trained positions.
    """
    targets = batch["targets"]
    inputs = {k: v for k, v in batch.items() if k != "targets"}
    head = plain_output_head(model)
    if head is None:
        keep = trained_positions(targets)
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (B, K, V)
        kept = targets[:, keep]
        trained = kept != IGNORE_INDEX
        rows = trained.nonzero()[:, 0]
        return F.cross_entropy(logits[trained].float(), kept[trained], reduction="none"), rows
    none = torch.empty(0, dtype=torch.long, device=targets.device)
    out = model(**inputs, use_cache=False, logits_to_keep=none, output_hidden_states=True)
    trained = targets != IGNORE_INDEX
    hidden = out.hidden_states[-1][trained]  # (N, H): after the final norm
    return token_nll(hidden, head.weight, targets[trained], softcap=final_logit_softcap(model)), trained.nonzero()[:, 0]


UNREPRODUCED_LOGIT_SETTINGS = ("logit_scale", "logits_scaling", "output_multiplier_scale")
"""Config fields with which a family transforms its logits in a way `token_nll` does not
reproduce (Cohere, Granite, ...): such models get their logits from their own forward."""


def plain_output_head(model: Any) -> torch.nn.Linear | None:
    """The output head when the model's logits are ``hidden @ head.weight.T`` (soft-capped at most)."""
    inner = getattr(model, "module", model)  # DDP / accelerate wrapper
    config = inner.config.get_text_config()
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in UNREPRODUCED_LOGIT_SETTINGS):
        return None
    head = inner.get_output_embeddings()
    # Under DeepSpeed ZeRO-3 the head's weight is whole only inside the model's own forward.
    if hasattr(getattr(head, "weight", None), "ds_id"):
        return None
    return head if type(head) is torch.nn.Linear and head.bias is None else None


def final_logit_softcap(model: Any) -> float | None:
    """Gemma 2's final logit soft-capping, c in logits = c * tanh(logits / c), or None."""
    inner = getattr(model, "module", model)
    return getattr(inner.config.get_text_config(), "final_logit_softcapping", None)


def micro_batch_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of token losses of one micro-batch and its trained-token count."""
    nll, _ = trained_token_nll(model, batch)
    return nll.sum(), nll.numel()


def sft_objective(packing: bool, pad_id: int, name: str = "sft") -> Objective:
    return Objective(
        name=name, packing=packing,
        collate=lambda examples: collate(examples, packing, pad_id),
        count=lambda batch: int((batch["targets"] != IGNORE_INDEX).sum()),
        loss=lambda model, batch: (micro_batch_loss(model, batch)[0], {}),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# DPO


def pair_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed reply log-probs of every row: (2B,), chosen rows first, then rejected."""
    nll, rows = trained_token_nll(model, batch)
    return -torch.zeros(batch["input_ids"].shape[0], device=nll.device).index_add(0, rows, nll)


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
            tokens = (batch["targets"][:n] != IGNORE_INDEX).sum(-1).clamp(min=1)
            losses = losses - sft_weight * policy[:n] / tokens
        return losses.sum(), pair_stats(chosen, rejected)

    return Objective(
        name="dpo", packing=False,
        collate=lambda pairs: collate_pairs(pairs, pad_id),
        count=lambda batch: batch["input_ids"].shape[0] // 2,
        loss=loss,
    )  # fmt: skip


def pair_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over the pairs of the rewards, their margin, and how often the chosen reply wins."""
    return {"reward_chosen": chosen.sum(), "reward_rejected": rejected.sum(),
            "margin": (chosen - rejected).sum(), "accuracy": (chosen > rejected).float().sum()}  # fmt: skip


def reference_free_objective(pad_id: int, kind: str, beta: float, gamma: float, label_smoothing: float,
                             sft_weight: float) -> Objective:  # fmt: skip
    """ORPO or SimPO on pairs: each reply's log-prob averaged over its tokens, and no reference
    model, so no reference pass (and nothing precomputed for full fine-tuning)."""

    def loss(model, batch):
        tokens = (batch["targets"] != IGNORE_INDEX).sum(-1).clamp(min=1)  # (2B,) scored tokens per reply
        mean = pair_logps(model, batch) / tokens  # (2B,)
        n = mean.shape[0] // 2
        if kind == "orpo":
            losses, chosen, rejected = orpo_loss(mean[:n], mean[n:], beta)
        elif kind == "simpo":
            losses, chosen, rejected = simpo_loss(mean[:n], mean[n:], beta, gamma, label_smoothing)
        else:
            raise ValueError(f"unknown reference-free loss {kind!r}; expected orpo or simpo")
        if sft_weight:
            losses = losses - sft_weight * mean[:n]
        return losses.sum(), pair_stats(chosen, rejected)

    return Objective(
        name=kind, packing=False,
        collate=lambda pairs: collate_pairs(pairs, pad_id),
        count=lambda batch: batch["input_ids"].shape[0] // 2,
        loss=loss,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# KTO

ROW_KEYS = ("input_ids", "attention_mask", "targets")


def collate_unpaired(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Padded rows: every example's own row, then every example's mismatched row (its completion
    after another prompt; `liandan.encoding.add_mismatched_rows`), and which examples are desirable."""
    own = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    mismatched = [{"input_ids": e["kl_input_ids"], "labels": e["kl_labels"]} for e in examples]
    batch = collate(own + mismatched, packing=False, pad_id=pad_id)  # (2B, T)
    batch["desirable"] = torch.tensor([e["desirable"] for e in examples])  # (B,)
    if all("ref_logps" in e for e in examples):
        batch["ref_logps"] = torch.tensor([e["ref_logps"][0] for e in examples] + [e["ref_logps"][1] for e in examples])
    return batch


def kto_objective(pad_id: int, beta: float, desirable_weight: float, undesirable_weight: float) -> Objective:
    def loss(model, batch):
        desirable = batch["desirable"]
        n = desirable.shape[0]
        rows = {k: batch[k] for k in ROW_KEYS}
        policy = pair_logps(model, {k: v[:n] for k, v in rows.items()})  # (B,)
        inner = getattr(model, "module", model)  # z0 is detached: no gradient, so no sync under DDP
        with torch.no_grad():
            policy_mismatched = pair_logps(inner, {k: v[n:] for k, v in rows.items()})
        ref = reference_logps(model, {**rows, **({"ref_logps": batch["ref_logps"]} if "ref_logps" in batch else {})})
        ref = ref.to(policy.device)  # (2B,): own rows, then mismatched rows
        kl = kto_reference_point(policy_mismatched, ref[n:])
        losses, rewards = kto_loss(policy, ref[:n], desirable, kl, beta, desirable_weight, undesirable_weight)
        right = torch.where(desirable, rewards > 0, rewards < 0)
        stats = {"reward_desirable": rewards[desirable].sum(), "reward_undesirable": rewards[~desirable].sum(),
                 "desirable": desirable.float().sum(), "undesirable": (~desirable).float().sum(),
                 "accuracy": right.float().sum(), "kl": kl * n}  # fmt: skip
        return losses.sum(), stats

    return Objective(
        name="kto", packing=False,
        collate=lambda examples: collate_unpaired(examples, pad_id),
        count=lambda batch: batch["desirable"].shape[0],
        loss=loss,
        averaged_over={"reward_desirable": "desirable", "reward_undesirable": "undesirable"},
    )  # fmt: skip


@torch.no_grad()
def precompute_reference(model: Any, pairs: list[dict], pad_id: int, batch_size: int = 8, device: Any = "cpu") -> None:
    """Full fine-tuning has no adapters to switch off: store the starting model's log-probs of
    both replies of every pair (or both rows of every KTO example) before the first step.

    Computed on ``device`` (the run's accelerator; the model is moved there and stays). The
    numbers are kept with the items and become a ``ref_logps`` tensor of each micro-batch, which
    the loop moves to the device with the rest of the batch: 2 floats a pair, no model pass."""
    model.to(device)
    model.eval()
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = collate_unpaired(chunk, pad_id) if "kl_input_ids" in chunk[0] else collate_pairs(chunk, pad_id)
        logps = pair_logps(model, {k: batch[k].to(device) for k in ROW_KEYS}).tolist()
        for i, pair in enumerate(chunk):
            pair["ref_logps"] = (logps[i], logps[len(chunk) + i])
    model.train()
