"""Reward functions with TRL's signature, for the GRPO tests (imported with --allow-code)."""

TARGET = set(range(100, 140))
"""40 of the tiny tokenizer's 400 ids: a random model samples one about a tenth of the time."""


def target_share(prompts, completions, completion_ids, **columns):
    """The share of a completion's tokens that are in TARGET."""
    return [sum(i in TARGET for i in ids) / max(len(ids), 1) for ids in completion_ids]


def echo_columns(prompts, completions, completion_ids, **columns):
    """Fails unless the records' other fields arrive one value per completion; rewards 'answer'."""
    assert all(len(values) == len(completions) for values in columns.values()), columns
    return [float(str(answer) in text) for answer, text in zip(columns["answer"], completions)]
