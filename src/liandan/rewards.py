"""Rewards for reinforcement learning (`liandan grpo`): what a sampled completion is worth.

    from liandan.rewards import parse_rewards, score_completions
    rewards = parse_rewards(["schema=examples/extract/schema.json", "stop"], weights=[1.0, 0.2])
    total, per_function = score_completions(rewards, completions)

Each reward is a spec string:

- ``checks``: the record's own ``checks`` (and its ``reference``), as `liandan eval` scores a task
  set: the fraction of them passed, from 0 to 1;
- any check of `liandan.checks` as ``KEY=VALUE`` (``regex=^Arr``, ``contains=Paris``,
  ``json``, ``reference=json``...): 1 when it passes, else 0;
- ``schema=FILE``: graded, 0 for an answer that is not JSON, 0.5 for JSON that breaks the schema,
  1 for JSON that follows it;
- ``stop``: 1 when the completion ended with the model's stop token (it did not run out of room);
- ``max_tokens=N``: 1 up to N completion tokens, then falling linearly to 0 at 2N;
- ``python=module:function``: your function, with TRL's reward signature:
  ``function(prompts, completions, completion_ids, **columns) -> list[float | None]``, where
  ``columns`` are the data records' other fields, one value per completion. It runs Python code,
  so it needs ``--allow-code``; the current directory is never searched for the module.

The total is the weighted sum (a ``None`` from a function counts as 0 in it and is left out of
that function's logged mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import CHECKS, INVALID_JSON, Checks, code_allowed, import_user_function, load_schema, parse_check_options, parse_checks, parse_json, run_checks
from .errors import LiandanError
from .prompts import Prompt

BUILTIN = ("checks", "schema", "stop", "max_tokens", "python",
           *(name for name in CHECKS if name not in ("schema", "predicate", "tool_call")))  # fmt: skip


@dataclass
class Completion:
    """One sampled completion, with the record its prompt came from."""

    prompt: Prompt
    """The prompt, with the record's other fields in ``prompt.meta``."""
    text: str
    """The completion's text, without its stop token."""
    ids: list[int]
    """Its token ids (the stop token included when it stopped)."""
    stopped: bool
    reference: str | None = None
    checks: Checks | None = None
    """The record's own checks, parsed (None when it has none)."""


@dataclass
class Reward:
    name: str
    """The name it is logged under (``reward/NAME``)."""
    weight: float
    score: Callable[[list[Completion]], list[float | None]]


def parse_rewards(specs: list[str], weights: list[float] | None = None, *, allow_code: bool | None = None,
                  base_dir: Path | None = None) -> list[Reward]:  # fmt: skip
    """Validate and compile reward specs (see the module docstring); ``weights`` default to 1.
    ``allow_code`` permits python= rewards (None: as set by `liandan.checks.allowing_code`)."""
    allow_code = code_allowed() if allow_code is None else allow_code
    if not specs:
        raise LiandanError("no reward: give --reward SPEC (e.g. checks, 'schema=schema.json', 'regex=^Answer:', stop)")
    weights = list(weights) if weights else [1.0] * len(specs)
    if len(weights) != len(specs):
        raise LiandanError(f"reward_weights: {len(weights)} weights for {len(specs)} rewards; give one weight per reward")
    rewards, seen = [], {}
    for spec, weight in zip(specs, weights, strict=True):
        if not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise LiandanError(f"reward_weights: {weight!r} for reward {spec!r} is not a finite number")
        name, score = _compile(spec, allow_code, base_dir or Path("."))
        seen[name] = seen.get(name, 0) + 1
        rewards.append(Reward(name=name if seen[name] == 1 else f"{name}_{seen[name]}", weight=float(weight), score=score))
    return rewards


def _compile(spec: str, allow_code: bool, base_dir: Path) -> tuple[str, Callable]:
    here = f"reward {spec!r}"
    key, _, value = spec.partition("=")
    key = key.strip()
    if key not in BUILTIN:
        raise LiandanError(f"{here}: unknown reward {key!r}; expected one of {', '.join(BUILTIN)}")
    if key == "checks":
        return "checks", _record_checks
    if key == "stop":
        return "stop", lambda completions: [float(c.stopped) for c in completions]
    if key == "max_tokens":
        try:
            limit = int(value)
        except ValueError:
            limit = 0
        if limit < 1:
            raise LiandanError(f"{here}: expected max_tokens=N with N a whole number of tokens above 0")
        return "max_tokens", lambda completions: [min(1.0, max(0.0, 2.0 - len(c.ids) / limit)) for c in completions]
    if key == "schema":
        validator = load_schema(value, here, base_dir)
        return "schema", lambda completions: [_graded_schema(c.text, validator) for c in completions]
    if key == "python":
        function = import_user_function(value.strip(), here, allow_code, "reward function", "the reward settings")
        return f"python:{value.strip().partition(':')[2]}", lambda completions: _call_user(function, value.strip(), completions)
    if key == "json" and not value:
        value = "true"
    check = parse_check_options([f"{key}={value}"])
    if key == "reference":
        compiled: dict[tuple[str, str], Checks] = {}  # per record: compiled once, scored every round
        return f"reference_{value}", lambda completions: [_reference(c, check, here, compiled) for c in completions]
    parsed = parse_checks(check, where=here, base_dir=base_dir)
    return key, lambda completions: [float(all(run_checks(parsed, c.text).values())) for c in completions]


def _record_checks(completions: list[Completion]) -> list[float]:
    scores = []
    for c in completions:
        if not c.checks:
            raise LiandanError(f"{c.prompt.source}: field 'checks': the 'checks' reward needs checks or a reference answer in every record")
        verdicts = run_checks(c.checks, c.text, c.reference)
        scores.append(sum(verdicts.values()) / len(verdicts))
    return scores


def _reference(completion: Completion, check: dict, here: str, compiled: dict) -> float:
    if completion.reference is None:
        raise LiandanError(f"{completion.prompt.source}: field 'reference': {here} needs a reference answer in every record")
    key = (completion.prompt.source, completion.reference)
    if key not in compiled:
        compiled[key] = parse_checks(check, where=completion.prompt.source, reference=completion.reference)
    parsed = compiled[key]
    return float(all(run_checks(parsed, completion.text, completion.reference).values()))


def _graded_schema(text: str, validator: Any) -> float:
    document = parse_json(text)
    if document is INVALID_JSON:
        return 0.0
    return 1.0 if validator.is_valid(document) else 0.5


def _call_user(function: Callable, spec: str, completions: list[Completion]) -> list[float | None]:
    """TRL's signature: prompts and completions as text, or as messages when the prompt is a
    conversation; every other field of the records as a keyword argument, one value per completion."""
    prompts = [list(c.prompt.messages) if c.prompt.messages else c.prompt.text for c in completions]
    texts = [[{"role": "assistant", "content": c.text}] if c.prompt.messages else c.text for c in completions]
    names = sorted({key for c in completions for key in c.prompt.meta} - {"prompts", "completions", "completion_ids"})
    columns = {name: [c.prompt.meta.get(name) for c in completions] for name in names}
    if any(c.reference is not None for c in completions) and "reference" not in columns:
        columns["reference"] = [c.reference for c in completions]
    try:
        values = function(prompts=prompts, completions=texts, completion_ids=[c.ids for c in completions], **columns)
    except Exception as exc:  # the user's function failing is the user's error to see
        raise LiandanError(f"reward python={spec}: raised {type(exc).__name__}: {exc}") from None
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise LiandanError(f"reward python={spec}: returned {got} for {len(completions)} completions; expected one float (or None) per completion")
    for v in values:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise LiandanError(f"reward python={spec}: returned {v!r}; expected finite numbers (or None)")
    return [None if v is None else float(v) for v in values]


def score_completions(rewards: list[Reward], completions: list[Completion]) -> tuple[list[float], dict[str, list[float | None]]]:
    """The weighted total of every completion, and each function's own scores."""
    per_function = {r.name: r.score(completions) for r in rewards}
    total = [sum(r.weight * (per_function[r.name][i] or 0.0) for r in rewards) for i in range(len(completions))]
    return total, per_function
