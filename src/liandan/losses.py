"""Loss functions as pure tensor code.

    from liandan.losses import next_token_targets, sft_loss_sum
    targets = next_token_targets([-100, -100, 7, 8])     # [-100, 7, 8, -100]
    total, count = sft_loss_sum(logits, targets)           # sum over trained tokens, and their number

The SFT objective is the mean negative log-likelihood of the trained tokens:

    L = -(1 / N) * sum_{t : y_t != -100} log p(y_t | x_<t)

where N counts trained tokens over the *whole* optimizer step (all micro-batches and processes),
so that gradient accumulation gives the same gradient as one big batch. That is why the loss
function returns a sum and a count, and the training loop divides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def next_token_targets(labels: list[int]) -> list[int]:
    """Shift aligned labels (label t = token t, or -100) to next-token targets (target t = the
    token the model should predict at position t). Done per example, so packed examples never
    ask the last token of one example to predict the first of the next."""
    return labels[1:] + [IGNORE]


def sft_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies over positions whose target is not -100, and their count.

    logits: (B, T, V); targets: (B, T). Computed in fp32 for a stable log-softmax.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (B*T, V)
    flat_targets = targets.reshape(-1)  # (B*T,)
    total = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE, reduction="sum")
    return total, int((flat_targets != IGNORE).sum())


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's trained targets: log p(reply | prompt).

    logits: (B, T, V); targets: (B, T) with -100 where not trained. Returns (B,).
    """
    logp = logits.float().log_softmax(-1)  # (B, T, V)
    mask = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * mask).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    kind: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and the implicit rewards of the chosen and rejected replies.

    With log-ratios h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)):

    - ``sigmoid`` (DPO, Rafailov et al. 2023), with label smoothing eps (conservative DPO, the
      share of pairs assumed flipped): L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
    - ``ipo`` (IPO, Azar et al. 2023): L = (h - 1 / (2 beta))^2

    Rewards are beta (log pi(y|x) - log ref(y|x)) for each reply. All inputs are (B,).
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if kind == "sigmoid":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}; expected sigmoid or ipo")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return loss, chosen_rewards, rejected_rewards
