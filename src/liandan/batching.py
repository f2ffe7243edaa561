"""Group encoded examples into micro-batches, packed (padding-free) or padded.

    from liandan.batching import plan_batches, collate
    plan = plan_batches([12, 30, 7], batch_tokens=64, packing=True, seed=0)   # e.g. [[2, 0, 1]]
    batch = collate([examples[i] for i in plan[0]], packing=True, pad_id=0)

Packed: the examples of a micro-batch are concatenated into ONE row, with ``position_ids``
restarting at 0 for each example, no attention mask, and ``cu_seq_lens_q`` (where each example
starts, and the row's end). Attention then never crosses examples (`liandan.attention` on CPUs,
flash attention or a block-diagonal mask from the position ids elsewhere), and the loss equals
the unpacked batch's loss — with no compute spent on padding.
"""

from __future__ import annotations

import random

import torch

from .losses import IGNORE_INDEX, next_token_targets


def plan_batches(lengths: list[int], batch_tokens: int, packing: bool, seed: int, batch_size: int = 0) -> list[list[int]]:
    """Shuffle example indices (seeded) and group them greedily within a token budget, and at
    most ``batch_size`` examples per group when that is set (> 0).

    Packed: the sum of lengths stays within ``batch_tokens``. Padded: the number of rows times
    the longest row stays within it.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        candidate = current + [index]
        if packing:
            cost = sum(lengths[i] for i in candidate)
        else:
            cost = len(candidate) * max(lengths[i] for i in candidate)
        if current and (cost > batch_tokens or 0 < batch_size < len(candidate)):
            batches.append(current)
            candidate = [index]
        current = candidate
    if current:
        batches.append(current)
    return batches


def collate(examples: list[dict], packing: bool, pad_id: int) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch. ``targets`` are next-token targets (-100 = not trained)."""
    if packing:
        input_ids, positions, targets, starts = [], [], [], [0]
        for ex in examples:
            input_ids += ex["input_ids"]
            positions += list(range(len(ex["input_ids"])))
            targets += next_token_targets(ex["labels"])
            starts.append(len(input_ids))
        return {
            "input_ids": torch.tensor([input_ids]),  # (1, T)
            "position_ids": torch.tensor([positions]),  # (1, T)
            "targets": torch.tensor([targets]),  # (1, T)
            "cu_seq_lens_q": torch.tensor(starts, dtype=torch.int32),  # (examples + 1,)
        }
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"])
        attention[row, :n] = 1
        targets[row, :n] = torch.tensor(next_token_targets(ex["labels"]))
    return {"input_ids": input_ids, "attention_mask": attention, "targets": targets}  # (B, T) each


def trained_positions(targets: torch.Tensor) -> torch.Tensor:
    """Sequence positions where any row has a trained target. Only these need logits: the output
    head (hidden x vocab) is the largest activation in a small model's step."""
    return (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)  # (K,)



def collate_shared_prefixes(groups: list[tuple[list[int], list[list[int]]]]) -> dict[str, torch.Tensor]:
    """One packed row for GRPO: each prompt once, then its completions, each attending to it.

    A group (prompt, completions) becomes the prompt without its last token (positions from 0;
    nothing trained), then per completion that last prompt token followed by the completion
    (positions continuing the prompt's; every completion token trained). The last prompt token
    is repeated so that each completion's first token has its own position to be predicted from.
    ``shared_prefix_of`` says which example each one continues (-1: none), for
    `liandan.attention.packed_attention`; the log-probs equal those of padded (prompt +
    completion) rows, while the prompt is computed once per group, not once per completion.
    ``completion_of`` (N,): the completion each trained token belongs to, in order."""
    input_ids: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    starts, prefix_of, completion_of = [0], [], []
    index = 0
    for prompt, completions in groups:
        head, last = prompt[:-1], prompt[-1]
        prefix = -1
        if head:
            input_ids += head
            positions += range(len(head))
            targets += [IGNORE_INDEX] * len(head)
            starts.append(len(input_ids))
            prefix = len(prefix_of)
            prefix_of.append(-1)
        for completion in completions:
            input_ids += [last, *completion]
            positions += range(len(head), len(head) + 1 + len(completion))
            targets += [*completion, IGNORE_INDEX]
            starts.append(len(input_ids))
            prefix_of.append(prefix)
            completion_of += [index] * len(completion)
            index += 1
    return {
        "input_ids": torch.tensor([input_ids]),  # (1, T)
        "position_ids": torch.tensor([positions]),  # (1, T)
        "targets": torch.tensor([targets]),  # (1, T)
        "cu_seq_lens_q": torch.tensor(starts, dtype=torch.int32),  # (examples + 1,)
        "shared_prefix_of": torch.tensor(prefix_of),  # (examples,)
        "completion_of": torch.tensor(completion_of),  # (N,)
    }
