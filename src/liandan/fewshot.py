"""A prompt-only baseline: the original model with a system prompt and k examples from the training data.

The usual order of resort is prompt, then retrieval, then fine-tuning; this module builds the
prompt that fine-tuning has to beat. K training conversations, drawn with a seed, become
alternating user/assistant turns before every task prompt; what they cost is counted in prompt
tokens per request, the same way for every model.

    from liandan.fewshot import few_shot_turns, with_shots
    turns = few_shot_turns("examples/extract/train.jsonl", k=4, seed=0, exclude=[item.prompt for item in task.items])
    prompts = with_shots([item.prompt for item in task.items], turns)   # each: 8 example turns, then the prompt

`liandan eval --few-shot 4 --few-shot-data TRAIN.jsonl` adds the column "MODEL + 4-shot" (see
`liandan.evaluation.EvalConfig.few_shot`).
"""

from __future__ import annotations

import random
import statistics
from typing import Any

from .chat import encode_generation_prompt
from .data import read_examples
from .errors import LiandanError
from .prompts import Prompt


def few_shot_name(model: str, k: int) -> str:
    """The column's name in reports: ``"default + 4-shot"``."""
    return f"{model} + {k}-shot"


def few_shot_turns(path: str, k: int, *, seed: int = 0, exclude: list[Prompt] = ()) -> list[dict]:
    """``k`` conversations of the training file ``path`` (any format `liandan.data` reads for sft),
    drawn with ``seed``, as one list of turns: their own system turns dropped (the baseline's system
    prompt is the one given with it), and no conversation whose prompt is one of ``exclude`` (the
    eval items: an example that is a test item would hand the model the answer)."""
    if k < 1:
        raise LiandanError(f"--few-shot {k}: expected a number of examples of at least 1")
    examples = read_examples(path, purpose="sft").examples
    held_out = {_prompt_key(p.chat_messages()) for p in exclude}
    candidates = []
    for example in examples:
        turns = [{"role": m["role"], "content": m["content"]} for m in example.messages if m["role"] != "system"]
        if _prompt_key(turns[:-1]) not in held_out:  # the last turn is the assistant's answer
            candidates.append(turns)
    if len(candidates) < k:
        raise LiandanError(f"--few-shot {k}: '{path}' has only {len(candidates)} examples that are not eval prompts "
                           f"({len(examples) - len(candidates)} skipped as equal to one); use a smaller --few-shot")  # fmt: skip
    # sorted indices keep the examples in file order: the draw is the seed's, the order the file's
    chosen = sorted(random.Random(seed).sample(range(len(candidates)), k))
    return [turn for i in chosen for turn in candidates[i]]


def _prompt_key(messages: list[dict]) -> tuple:
    """A conversation's prompt, compared without system turns and surrounding whitespace."""
    return tuple((m["role"], m["content"].strip()) for m in messages if m["role"] != "system")


def with_shots(prompts: list[Prompt], turns: list[dict]) -> list[Prompt]:
    """Each prompt as a conversation that starts with ``turns`` (after the prompt's own system turn,
    which stays first); its display and fields are kept, so reports show the prompt itself."""
    if not turns:
        return list(prompts)
    shot = []
    for prompt in prompts:
        messages = prompt.chat_messages()
        head = messages[:1] if messages[0]["role"] == "system" else []
        shot.append(Prompt(messages=(*head, *turns, *messages[len(head) :]), source=prompt.source, meta=prompt.meta, tools=prompt.tools))
    return shot


def prompt_tokens(tokenizer: Any, prompts: list[Prompt], system: str | None) -> list[int]:
    """Each prompt's length in tokens as generation sends it: the chat-encoded conversation, with
    ``system``, and the assistant header."""
    return [len(encode_generation_prompt(tokenizer, p.chat_messages(system), check_roles=False, tools=list(p.tools) if p.tools else None))
            for p in prompts]  # fmt: skip


def request_cost(tokenizer: Any, prompts: list[Prompt], system: str | None) -> tuple[dict, dict]:
    """What each request costs in prompt tokens: (the mean and median, the per-item counts that the
    paired interval of `liandan.evaluation.compare_models` resamples)."""
    counts = prompt_tokens(tokenizer, prompts, system)
    return {"prompt_tokens": statistics.mean(counts), "prompt_tokens_median": statistics.median(counts)}, {"prompt_tokens": counts}
