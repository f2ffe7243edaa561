"""Preference data for DPO: a prompt, the reply people preferred, and the one they did not.

    from liandan.preference import read_pairs
    pairs = read_pairs(["examples/prefs/train.jsonl"])
    pairs[0].prompt      # [{"role": "user", "content": "..."}]
    pairs[0].chosen, pairs[0].rejected

Accepted records (JSONL, JSON, CSV or Parquet, as for SFT):

- ``{"prompt": "text", "chosen": "text", "rejected": "text"}``;
- conversational: ``prompt`` (or ``messages``) a list of messages, ``chosen`` / ``rejected`` a
  string, one assistant message, or a list holding one;
- implicit prompt: ``chosen`` and ``rejected`` both whole conversations that share every turn
  but the last assistant reply.

Unpaired data for KTO (`read_unpaired`): ``{"prompt": ..., "completion": ..., "label": true}``
(TRL's unpaired format; ``completion`` read like a reply above, ``label`` true for a desirable
completion, false for an undesirable one). Preference pairs are accepted there too: each chosen
reply becomes a desirable example, each rejected one an undesirable example.

Every problem is ``FILE:LINE: field 'name': what is wrong``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .data import as_object, read_turns
from .errors import LiandanError
from .records import MISSING, RecordError, describe, field_error, read_records

ROLES = {"system": "system", "user": "user", "assistant": "assistant"}


@dataclass
class PreferencePair:
    prompt: list[dict]
    """The conversation so far; it ends with a user turn."""
    chosen: str
    rejected: str
    source: str


@dataclass
class UnpairedExample:
    prompt: list[dict]
    """The conversation so far; it ends with a user turn."""
    completion: str
    desirable: bool
    source: str


def read_pairs(paths: list[str | Path] | str | Path) -> list[PreferencePair]:
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise LiandanError("no preference data files given")
    pairs = []
    for path in paths:
        count = 0
        for where, record in read_records(str(path)):
            count += 1
            try:
                pairs.append(normalise_pair(as_object(where, record), where))
            except RecordError as exc:
                raise LiandanError(str(exc)) from None
        if count == 0:
            raise LiandanError(f"{path}: has no records")
    return pairs


def read_unpaired(paths: list[str | Path] | str | Path) -> list[UnpairedExample]:
    """KTO examples from unpaired records, or from preference pairs (chosen -> desirable,
    rejected -> undesirable); the two kinds may be mixed."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise LiandanError("no preference data files given")
    examples = []
    for path in paths:
        count = 0
        for where, record in read_records(str(path)):
            count += 1
            try:
                examples += normalise_unpaired(as_object(where, record), where)
            except RecordError as exc:
                raise LiandanError(str(exc)) from None
        if count == 0:
            raise LiandanError(f"{path}: has no records")
    return examples


def normalise_unpaired(record: dict, where: str) -> list[UnpairedExample]:
    if "chosen" in record or "rejected" in record:
        pair = normalise_pair(record, where)
        return [UnpairedExample(pair.prompt, pair.chosen, True, where), UnpairedExample(pair.prompt, pair.rejected, False, where)]
    for key in ("prompt", "completion", "label"):
        if key not in record:
            raise field_error(where, key, "missing: an unpaired record needs 'prompt', 'completion' and 'label' "
                                          f"(true = desirable, false = undesirable), or give a pair with 'chosen' and 'rejected' (found {sorted(record)})")  # fmt: skip
    label = record["label"]
    if not isinstance(label, bool):
        raise field_error(where, "label", f"expected true (desirable) or false (undesirable); got {describe(label)}")
    prompt = read_prompt(record["prompt"], "prompt", where)
    return [UnpairedExample(prompt, read_reply(record["completion"], "completion", where), label, where)]


def normalise_pair(record: dict, where: str) -> PreferencePair:
    for key in ("chosen", "rejected"):
        if key not in record:
            raise field_error(where, key, "missing: a preference record needs 'chosen' and 'rejected' replies "
                                          f"(found {sorted(record)})")  # fmt: skip
    prompt_key = "prompt" if "prompt" in record else "messages" if "messages" in record else None
    if prompt_key is None:
        prompt, chosen, rejected = implicit_prompt(record, where)
    else:
        prompt = read_prompt(record[prompt_key], prompt_key, where)
        chosen = read_reply(record["chosen"], "chosen", where)
        rejected = read_reply(record["rejected"], "rejected", where)
    if chosen.strip() == rejected.strip():
        raise field_error(where, "rejected", "is the same as 'chosen': a pair must prefer one reply over a different one")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, source=where)


def read_prompt(value: object, name: str, where: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise field_error(where, name, "expected a non-empty string or a list of messages; got ''")
        return [{"role": "user", "content": value}]
    messages = [t.message for t in read_turns(value, name, "role", "content", ROLES, where)]
    if messages[-1]["role"] != "user":
        raise field_error(where, f"{name}[{len(messages) - 1}].role", f"expected the prompt to end with a user turn; got {messages[-1]['role']!r}")
    return messages


def read_reply(value: object, name: str, where: str) -> str:
    """A reply: a string, an assistant message, or a list holding one assistant message."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role") != "assistant":
            raise field_error(where, f"{name}.role", f"expected 'assistant'; got {describe(value.get('role', MISSING))}")
        value = value.get("content", MISSING)
    if not isinstance(value, str) or not value.strip():
        raise field_error(where, name, f"expected a non-empty reply; got {describe(value)}")
    return value


def implicit_prompt(record: dict, where: str) -> tuple[list[dict], str, str]:
    """Both sides are whole conversations: the shared turns are the prompt."""
    sides = {}
    for key in ("chosen", "rejected"):
        if not isinstance(record[key], list):
            raise field_error(where, "prompt", "missing: give 'prompt', or 'chosen' and 'rejected' as whole conversations")
        sides[key] = [t.message for t in read_turns(record[key], key, "role", "content", ROLES, where)]
    chosen, rejected = sides["chosen"], sides["rejected"]
    if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
        raise field_error(where, "rejected", "must share every turn with 'chosen' except the last assistant reply")
    for key, turns in sides.items():
        if turns[-1]["role"] != "assistant":
            raise field_error(where, f"{key}[{len(turns) - 1}].role", "expected the last turn to be the assistant's reply")
    return read_prompt(chosen[:-1], "chosen", where), chosen[-1]["content"], rejected[-1]["content"]
