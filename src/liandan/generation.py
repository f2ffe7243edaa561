"""Batched generation from a loaded model, with the stop bookkeeping every command shares.

    from liandan.generation import SamplingConfig, generate
    outputs = generate(model, tokenizer, ["Translate to English: 你好"], mode="chat",
                       config=SamplingConfig(max_new_tokens=64))
    outputs[0].text, outputs[0].stopped

Each output records whether the model *stopped by itself* (produced an end-of-turn or eos
token) or ran into ``max_new_tokens``: the quickest tell of a base model, or of an SFT run that
never learned its stop token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList

from .chat import chat_stop_ids, encode_generation_prompt, has_chat_template, render_chat, stop_token_ids
from .errors import LiandanError
from .prompts import Prompt, prompts_from_strings

MODES = ("chat", "raw")


@dataclass
class SamplingConfig:
    """How to decode. ``temperature 0`` (the default) is greedy: deterministic, and the fairest
    way to compare models; a temperature above 0 samples."""

    max_new_tokens: int = 256
    """Most tokens to generate per output."""
    temperature: float = 0.0
    """Softmax temperature; 0 (the default) means greedy decoding, above 0 samples."""
    top_p: float = 0.95
    """Nucleus sampling: keep the smallest set of tokens with this much probability (1 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    repetition_penalty: float = 1.0
    """Above 1 discourages repeating tokens already in the text (1 = off)."""
    seed: int = 0
    """Random seed, reset before each model so every model sees the same random stream."""
    num_samples: int = 1
    """Outputs per prompt (needs sampling)."""
    batch_size: int = 8
    """Prompts generated together in one batch."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise LiandanError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise LiandanError(f"--temperature must be 0 or more (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise LiandanError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise LiandanError(f"--top-k must be 0 (off) or more (got {self.top_k})")
        if self.repetition_penalty <= 0:
            raise LiandanError(f"--repetition-penalty must be above 0 (got {self.repetition_penalty})")
        if self.num_samples < 1:
            raise LiandanError(f"--num-samples must be at least 1 (got {self.num_samples})")
        if self.num_samples > 1 and self.is_greedy:
            raise LiandanError(
                f"--num-samples {self.num_samples} needs sampling: greedy decoding gives the same "
                "output every time (set --temperature above 0, for example 0.7)"
            )
        if self.batch_size < 1:
            raise LiandanError(f"--batch-size must be at least 1 (got {self.batch_size})")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """One output of one model for one prompt."""

    model: str
    mode: str
    prompt_index: int
    sample: int
    prompt: str
    """The prompt as the model saw it (chat template applied in chat mode)."""
    text: str
    """The new text, without the stop token."""
    new_tokens: int
    """Generated tokens, the stop token included."""
    stopped: bool
    """True if the model ended the output itself; False if it hit ``max_new_tokens``."""
    seconds: float
    """Wall time from the start of its batch until this output's last token (prefill included)."""
    first_token_seconds: float = 0.0
    """Wall time until its batch's first new token: the prompt's prefill and start-up."""
    note: str = ""

    @property
    def tokens_per_second(self) -> float | None:
        """Decoding speed after the first token (prefill excluded); None for a 1-token output."""
        decode = self.seconds - self.first_token_seconds
        return (self.new_tokens - 1) / decode if self.new_tokens > 1 and decode > 0 else None

    def to_dict(self) -> dict:
        return {
            "model": self.model, "mode": self.mode, "prompt_index": self.prompt_index,
            "sample": self.sample, "prompt": self.prompt, "text": self.text,
            "new_tokens": self.new_tokens, "stopped": self.stopped,
            "seconds": round(self.seconds, 4), "first_token_seconds": round(self.first_token_seconds, 4),
            "tokens_per_second": None if self.tokens_per_second is None else round(self.tokens_per_second, 2),
            "note": self.note,
        }  # fmt: skip


def as_prompts(prompts: Iterable[Prompt | str]) -> list[Prompt]:
    items = list(prompts)
    if not items:
        raise LiandanError("no prompts: give --prompt TEXT or --prompts FILE")
    texts = [p for p in items if isinstance(p, str)]
    if texts and len(texts) == len(items):
        return prompts_from_strings(texts)
    return [p if isinstance(p, Prompt) else prompts_from_strings([p])[0] for p in items]


def prompt_text(tokenizer: Any, prompt: Prompt, mode: str, system: str | None) -> str:
    if mode == "chat":
        return render_chat(tokenizer, prompt.chat_messages(system))
    if mode == "raw":
        return prompt.raw_text()
    raise LiandanError(f"--mode {mode}: expected one of {', '.join(MODES)}")


def prompt_ids(tokenizer: Any, prompt: Prompt, mode: str, system: str | None) -> list[int]:
    """The token ids generation starts from. Chat: the template's render, with special-token text
    typed in a message kept as plain characters (a prompt cannot forge a turn). Raw: the text
    tokenized as the model was pre-trained (BOS added; what the user writes is what it reads)."""
    if mode == "chat":
        tools = list(prompt.tools) if prompt.tools else None
        return encode_generation_prompt(tokenizer, prompt.chat_messages(system), check_roles=False, tools=tools)
    return list(tokenizer(prompt_text(tokenizer, prompt, mode, system), add_special_tokens=True)["input_ids"])


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt | str],
    *,
    mode: str = "chat",
    system: str | None = None,
    config: SamplingConfig | None = None,
    model_name: str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Generate for every prompt, ``config.batch_size`` prompts at a time (left-padded).

    ``on_batch(n)`` is called after each batch with the number of prompts it held (for progress).
    """
    config = config or SamplingConfig()
    prompts = as_prompts(prompts)
    name = model_name or getattr(getattr(model, "liandan_source", None), "name", "model")
    texts = [prompt_text(tokenizer, p, mode, system) for p in prompts]
    encoded = [prompt_ids(tokenizer, p, mode, system) for p in prompts]
    note = ""
    if mode == "chat" and not has_chat_template(tokenizer):
        note = "model has no chat template: prompt rendered as ChatML text"
    stops = (chat_stop_ids if mode == "chat" else stop_token_ids)(tokenizer, getattr(model, "generation_config", None))
    torch.manual_seed(config.seed)
    # Prompts of similar length share a batch, so little compute goes to padding.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    results: list[Generation] = []
    for start in range(0, len(texts), config.batch_size):
        indices = order[start : start + config.batch_size]
        batch = [encoded[i] for i in indices]
        new_ids, step_times = _generate_batch(model, tokenizer, batch, config, stops)
        for row, ids in enumerate(new_ids):
            index = indices[row // config.num_samples]
            count, stopped = count_until_stop(ids, stops)
            results.append(Generation(
                model=name, mode=mode, prompt_index=index, sample=row % config.num_samples,
                prompt=texts[index], text=tokenizer.decode(ids[: count - int(stopped)], skip_special_tokens=False),
                new_tokens=count, stopped=stopped, seconds=step_times[min(count, len(step_times)) - 1],
                first_token_seconds=step_times[0], note=note,
            ))  # fmt: skip
        if on_batch:
            on_batch(len(batch))
    return sorted(results, key=lambda g: (g.prompt_index, g.sample))


class _StepClock:
    """A logits processor that only notes the time. Call k (from 1) comes right before new token
    k is picked, so ``times[k - 1]`` is how long the first k new tokens took, prefill included."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter() - self.start)
        return scores


# Stop strings: cut the text before them, and while streaming hold back what may become one.


def find_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string starts in ``text``, or None."""
    found = [at for at in (text.find(s) for s in stops) if at >= 0]
    return min(found) if found else None


def streamable_length(text: str, stops: list[str]) -> int:
    """How much of ``text`` can be sent now: not a trailing half-decoded character (U+FFFD until
    its next byte arrives), nor an ending that could be the start of a stop string."""
    end = len(text.rstrip("\ufffd"))
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), held, -1):
            if text.startswith(stop[:k], end - k):
                held = k
                break
    return end - held


def generation_config(sampling: SamplingConfig, stops: Sequence[int], pad_token_id: int | None, **overrides: Any):
    """transformers' GenerationConfig for a `SamplingConfig`: greedy at temperature 0, else
    sampling with its temperature, top-p and top-k; stopping at ``stops``. ``overrides`` replace
    fields (``max_new_tokens`` when the room left is smaller, ``num_return_sequences``)."""
    options = {} if sampling.is_greedy else {
        "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,  # 0: off (None would let generate default to 50)
    }  # fmt: skip
    values = dict(max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.is_greedy,
                  repetition_penalty=sampling.repetition_penalty, eos_token_id=list(stops) or None,
                  pad_token_id=pad_token_id, **options)  # fmt: skip
    return GenerationConfig(**{**values, **overrides})


def _generate_batch(model, tokenizer, rows: list[list[int]], config, stops) -> tuple[list[list[int]], list[float]]:
    """Run one left-padded batch of prompt ids; returns each row's new token ids, and the step
    times of `_StepClock` (an output of n tokens took ``times[n - 1]`` seconds)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens must follow the prompt directly in every row
    try:
        encoded = tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    encoded = encoded.to(model.device)
    gen_config = generation_config(config, stops, tokenizer.pad_token_id, num_return_sequences=config.num_samples)
    clock = _StepClock()
    with torch.inference_mode():
        output = model.generate(
            **encoded, generation_config=gen_config, logits_processor=LogitsProcessorList([clock])
        )
    prompt_len = encoded["input_ids"].shape[1]
    return output[:, prompt_len:].tolist(), clock.times  # (B * num_samples, new)


def count_until_stop(ids: list[int], stops: Sequence[int]) -> tuple[int, bool]:
    """Tokens generated up to and including the first stop token, and whether one was found.

    After a row stops, ``generate`` pads it (often with the eos id itself) until the whole batch
    is done; those pads are not part of the output.
    """
    stop_set = set(stops)
    for i, token in enumerate(ids):
        if token in stop_set:
            return i + 1, True
    return len(ids), False
