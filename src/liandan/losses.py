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
