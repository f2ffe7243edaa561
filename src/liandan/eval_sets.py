"""Evaluation sets and how a model's outputs on them are scored: what `liandan.evaluation` runs.

    from liandan.eval_sets import read_eval_set, repetition
    task = read_eval_set("examples/extract/test.jsonl", name="task", schema="examples/extract/schema.json")
    sorted(task.items[0].checks.tests)   # ['json', 'reference', 'schema']
    repetition("a b c d a b c d")        # about 0.2: one word 4-gram in five repeats

A set is JSONL of held-out prompts with checks (see `liandan.checks`) or reference answers; for a
record that offers ``tools``, the calls each model writes are read back in its own template's format
(`liandan.tools`) for the ``tool_call`` check and the report. Besides the checks: generation health
(`health`), and likelihoods under a model: of the first model's answers (`answer_nll`, for drift),
of preference pairs (`preference_accuracy`) and of held-out text (`text_nll`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .assistant_masks import encode_chat_example
from .batching import collate
from .checks import INVALID_JSON, parse_checks, parse_json, run_checks
from .encoding import encode_pair, pad_id, text_blocks
from .errors import LiandanError
from .losses import IGNORE_INDEX
from .objectives import collate_pairs, micro_batch_loss, pair_logps, trained_token_nll
from .prompts import Prompt, builtin_path, read_prompts
from .tools import CallFormat, parse_reply


# ---------------------------------------------------------------------------------------------
# Sets


@dataclass
class EvalItem:
    """One prompt of an evaluation set, with what its answer is checked against."""

    id: str
    prompt: Prompt
    checks: Any
    reference: str | None = None
    category: str | None = None
    reference_calls: list[dict] | None = None
    """The calls of the reference turn (None when it makes none)."""

    @property
    def uses_tools(self) -> bool:
        """Whether the model must render tools or calls for this item, or have its calls read."""
        return bool(self.prompt.tools or self.reference_calls or "tool_call" in self.checks.tests
                    or any(m.get("tool_calls") or m["role"] == "tool" for m in self.prompt.messages or ()))  # fmt: skip


@dataclass
class EvalSet:
    name: str
    path: str
    items: list[EvalItem]

    @property
    def tool_item(self) -> EvalItem | None:
        """The first item that uses tools (it names the set in errors), or None."""
        return next((i for i in self.items if i.uses_tools), None)


def read_eval_set(path: str | Path, *, name: str, extra_checks: dict | None = None, schema: str | None = None) -> EvalSet:
    """Read a JSONL set of ``prompt``/``messages`` records with ``checks``, ``reference``, ``id``,
    ``category``. A conversation that ends with an assistant turn has that turn as its reference.
    A record with a reference is also scored against it (exact, or parsed JSON when the reference
    is JSON); a record with neither checks nor reference is an error. A reference turn that makes
    tool calls is kept as ``reference_calls`` and scored with ``tool_call: exact`` by default."""
    path = Path(path)
    prompts = read_prompts(path) if path.suffix == ".jsonl" else _wrong_suffix(path)
    extra = dict(extra_checks or {})
    if schema:
        extra.update({"json": True, "schema": str(Path(schema).resolve())})
    items = []
    for n, prompt in enumerate(prompts, 1):
        where = prompt.source
        calls = reference_calls(prompt)
        reference, prompt, checks = record_checks(prompt, path.parent, extra)
        if checks is None:
            raise LiandanError(f"{where}: field 'checks': this record has no checks and no reference answer to score against")
        category = prompt.meta.get("category")
        items.append(EvalItem(id=str(prompt.meta.get("id") or f"{path.stem}:{n}"), prompt=prompt, checks=checks, reference=reference,
                              category=str(category) if category else None, reference_calls=calls))  # fmt: skip
    return EvalSet(name=name, path=str(path), items=items)


def record_checks(prompt: Prompt, base_dir: Path, extra: dict | None = None) -> tuple[str | None, Prompt, Any]:
    """A prompt record's reference answer (a final assistant turn, or ``reference``), the prompt
    without it, and its parsed checks: its own ``checks`` plus ``extra``, and a comparison with the
    reference (parsed JSON when the reference is JSON) unless a check says how; None without any.
    A reference turn with tool calls is compared by ``tool_call: exact`` unless a check says how;
    with a ``tool_call`` check the reference text is not compared: the right reply to a request
    the tools cannot serve is a plain answer, rarely word for word the reference's."""
    where = prompt.source
    calls = reference_calls(prompt)
    reference, prompt = split_reference(prompt, where)
    if "checks" in prompt.meta and not isinstance(prompt.meta["checks"], dict):
        raise LiandanError(f"{where}: field 'checks': expected an object such as {{\"contains\": [\"Paris\"]}}")
    spec = {**(prompt.meta.get("checks") or {}), **(extra or {})}
    if calls and "tool_call" not in spec:
        spec["tool_call"] = "exact"
    if reference is not None and "reference" not in spec and "tool_call" not in spec:
        spec["reference"] = "json" if looks_like_json(reference) else "exact"
    if not spec:
        return reference, prompt, None
    return reference, prompt, parse_checks(spec, where=where, base_dir=base_dir, reference=reference, record=prompt.meta,
                                           reference_calls=calls, tools=prompt.tools)  # fmt: skip


def _wrong_suffix(path: Path):
    raise LiandanError(f"evaluation set '{path}': expected a .jsonl file")


def split_reference(prompt: Prompt, where: str) -> tuple[str | None, Prompt]:
    reference = prompt.meta.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise LiandanError(f"{where}: field 'reference': expected a string, got {type(reference).__name__}")
    if prompt.messages and prompt.messages[-1]["role"] == "assistant":
        if reference is not None:
            raise LiandanError(f"{where}: field 'reference': given twice (also as the last assistant message)")
        if len(prompt.messages) < 2:
            raise LiandanError(f"{where}: field 'messages': has only the assistant's answer, no prompt")
        last = prompt.messages[-1]
        # A call turn's text is its reference only when it has some; its calls are `reference_calls`.
        reference = last["content"] if last["content"] or not last.get("tool_calls") else None
        prompt = Prompt(messages=prompt.messages[:-1], source=prompt.source, meta=prompt.meta, tools=prompt.tools)
    return reference, prompt


def reference_calls(prompt: Prompt) -> list[dict] | None:
    """The tool calls of a conversation's final assistant turn (its reference), or None."""
    last = prompt.messages[-1] if prompt.messages else None
    return list(last["tool_calls"]) if last and last["role"] == "assistant" and last.get("tool_calls") else None


def looks_like_json(text: str) -> bool:
    return text.strip()[:1] in "{[" and parse_json(text) is not INVALID_JSON


def read_set_spec(spec: str, *, name: str) -> EvalSet | None:
    """``"none"`` -> None; ``"default"`` -> the shipped set; else a file."""
    if spec == "none":
        return None
    path = builtin_path(name) if spec == "default" else Path(spec)
    result = read_eval_set(path, name=name)
    if not result.items:
        raise LiandanError(f"{name} set '{path}' is empty")
    return result


# ---------------------------------------------------------------------------------------------
# Scoring


def score_set(eval_set: EvalSet, generations: list, calls: CallFormat | None = None) -> tuple[list[dict], dict]:
    """Per-example outcomes and the set's aggregates: the share passing all checks and each check.
    With ``calls`` (the evaluated model's call format) each output is also read as a reply: its
    outcome holds the ``calls`` made (and ``call_problem`` when one could not be read), and the
    ``tool_call`` check is split into ``call`` (over the items whose reference makes calls) and
    ``no_call`` (over those whose reference makes none)."""
    outcomes, per_check = [], {}
    for item, gen in zip(eval_set.items, generations, strict=True):
        reply = parse_reply(gen.text, calls) if calls is not None else None
        verdicts = run_checks(item.checks, gen.text, item.reference, reply)
        for name, ok in verdicts.items():
            per_check.setdefault(name, []).append(ok)
        outcome = {"text": gen.text, "stopped": gen.stopped, "new_tokens": gen.new_tokens,
                   "passed": all(verdicts.values()), "checks": verdicts}  # fmt: skip
        if reply is not None:
            outcome["calls"] = reply.calls
            if reply.problem:
                outcome["call_problem"] = reply.problem
        if "tool_call" in verdicts:
            outcome["expects_call"] = bool(item.reference_calls)
        outcomes.append(outcome)
    aggregate = {"score": mean_or_none(o["passed"] for o in outcomes)}
    aggregate.update({name: mean_or_none(v) for name, v in per_check.items()})
    for name, expects in (("call", True), ("no_call", False)):
        split = [o["checks"]["tool_call"] for o in outcomes if o.get("expects_call") is expects]
        if split:
            aggregate[name] = mean_or_none(split)
    categories = sorted({i.category for i in eval_set.items if i.category})
    if categories:
        aggregate["by_category"] = {
            c: mean_or_none(o["passed"] for o, i in zip(outcomes, eval_set.items) if i.category == c) for c in categories
        }
    return outcomes, aggregate


def health(generations: list) -> dict:
    """Generation health: stop rate, mean new tokens, and the share of repeated word 4-grams."""
    return {
        "stop_rate": mean_or_none(g.stopped for g in generations),
        "mean_tokens": mean_or_none(g.new_tokens for g in generations),
        "repetition": mean_or_none(repetition(g.text) for g in generations),
    }


def repetition(text: str, n: int = 4) -> float:
    """1 - distinct/total word n-grams: 0 for text that never repeats itself, near 1 for a loop."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def answer_nll(model: Any, tokenizer: Any, prompts: list[Prompt], answers: list[str], batch_size: int = 8,
               per_item: bool = False) -> float | tuple[float, list[float], list[int]]:  # fmt: skip
    """Mean negative log-likelihood per token of ``answers`` (stop token included) given their
    prompts, under ``model``. exp() of it is the perplexity the drift metric reports. With
    ``per_item``: (mean, each answer's NLL sum, each answer's token count), which the paired
    bootstrap of `liandan.uncertainty` resamples."""
    encoded = []
    for prompt, answer in zip(prompts, answers, strict=True):
        item = encode_chat_example(tokenizer, [*prompt.chat_messages(), {"role": "assistant", "content": answer}])
        encoded.append({"input_ids": item.input_ids, "labels": item.labels})
    pad = pad_id(tokenizer)
    total, count, sums, counts = 0.0, 0, [], []
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start : start + batch_size], packing=False, pad_id=pad)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            nll, rows = trained_token_nll(model, batch)  # (N,), (N,): one row index per trained token
            total, count = total + float(nll.sum()), count + nll.numel()
            sums += torch.zeros(batch["input_ids"].shape[0], device=nll.device).index_add(0, rows, nll).tolist()
            counts += (batch["targets"] != IGNORE_INDEX).sum(-1).tolist()
    mean = total / max(count, 1)
    return (mean, sums, counts) if per_item else mean


def preference_accuracy(model: Any, tokenizer: Any, pairs: list, batch_size: int = 8) -> dict:
    """The share of pairs whose chosen reply the model finds more likely than the rejected one
    (summed reply log-probs), and the mean log-prob margin."""
    encoded = [encode_pair(tokenizer, p, max_length=4096) for p in pairs]
    margins: list[float] = []
    per_token: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            batch = {k: v.to(model.device) for k, v in collate_pairs(encoded[start : start + batch_size], pad_id(tokenizer)).items()}
            logps = pair_logps(model, batch).float()
            means = logps / (batch["targets"] != IGNORE_INDEX).sum(-1).clamp(min=1)
            n = logps.shape[0] // 2
            margins += (logps[:n] - logps[n:]).tolist()
            per_token += (means[:n] - means[n:]).tolist()
    # Summed log-probs favour the shorter reply whatever the model prefers; the per-token
    # comparison shows the preference when the two replies differ in length.
    return {"accuracy": mean_or_none(m > 0 for m in margins), "margin": mean_or_none(margins),
            "accuracy_per_token": mean_or_none(m > 0 for m in per_token),
            "items": {"margins": margins, "per_token_margins": per_token}}  # fmt: skip


def text_nll(model: Any, tokenizer: Any, documents: list, block: int = 512,
             per_item: bool = False) -> float | tuple[float, list[float], list[int]]:  # fmt: skip
    """Mean negative log-likelihood per token of held-out text, in blocks of ``block`` tokens;
    with ``per_item``: (mean, each block's NLL sum, each block's token count)."""
    blocks, _ = text_blocks(tokenizer, documents, block)
    sums, counts = [], []
    with torch.inference_mode():
        for item in blocks:
            batch = {k: v.to(model.device) for k, v in collate([item], packing=False, pad_id=pad_id(tokenizer)).items()}
            loss_sum, n = micro_batch_loss(model, batch)
            sums.append(float(loss_sum))
            counts.append(n)
    mean = sum(sums) / max(sum(counts), 1)
    return (mean, sums, counts) if per_item else mean


def mean_or_none(values) -> float | None:
    """The mean of ``values`` (booleans count as 0 and 1), or None when there are none."""
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None
