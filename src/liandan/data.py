"""Read training data files and normalise every format into one internal shape.

Files are ``.jsonl``, ``.json`` (a list of records, or ``{"data": [...]}``), ``.csv`` or
``.parquet``; a Hub id (``owner/name``) is read with the optional ``datasets`` package. Each file's
format is detected from its first record's keys (or forced with ``format=``):

==================  =================================================================
``messages``        ``{"messages": [{"role", "content", "train"?, "tool_calls"?}, ...], "tools"?}``
                    (OpenAI; a ``tool`` turn may give ``"tool_call_id"`` and ``"name"``)
``sharegpt``        ``{"conversations": [{"from", "value"}, ...], "system"?, "tools"?}``; ``from``
                    may also be ``function_call`` (value: a call ``{"name", "arguments"}`` or a
                    list of them) and ``observation`` (a tool's result), as in LLaMA-Factory
``alpaca``          ``{"instruction", "input"?, "output", "system"?}``
``prompt_completion`` ``{"prompt": str | messages, "completion": str | messages}``
``text``            ``{"text"}`` (raw text for pre-training)
==================  =================================================================

Every record becomes an `Example`: a conversation of ``{"role", "content"}`` dicts (plus
``"train": False`` on turns that must not be trained on) or a raw text, with its source.

Tool calling: an assistant turn may carry ``"tool_calls": [{"type": "function", "function":
{"name", "arguments"}, "id"?}]`` with ``arguments`` always a dict (OpenAI's JSON string is
parsed) and ``content`` ``""`` when the turn only calls; a ``tool`` turn holds one result, with
``"tool_call_id"`` and ``"name"`` where known; `Example.tools` holds the record's ``tools``
(a list, or a JSON string of one as LLaMA-Factory writes it) as ``{"type": "function",
"function": {"name", "description"?, "parameters"?}}``.

    from liandan.data import read_examples, split_examples
    result = read_examples("examples/chat.jsonl")              # purpose="sft"
    result.examples[0].source                                  # 'examples/chat.jsonl:1'
    train, eval = split_examples(result.examples, eval_fraction=0.1, seed=0)

Every problem is reported as ``FILE:LINE: field 'x': expected ...; got ...`` (``FILE:record N``
for JSON and Parquet, ``FILE:row N`` for CSV). With ``skip_invalid=True`` bad records are dropped
and listed in `DataResult.skipped` instead; `summarize_skipped` turns them into one line.
Reading the files is `liandan.records`' part; tools, calls and results, `liandan.tool_records`'.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LiandanError
from .records import MISSING, RecordError, Turn, describe, field_error, read_records, read_text, string_field
from .tool_records import call_content, check_tool_use, read_tool_calls, read_tools, sharegpt_calls, tool_result

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
CONVERSATION_FORMATS = FORMATS[:-1]
PURPOSES = ("sft", "text")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "tool": "tool"}
SHAREGPT_TOOL_TAGS = {"function_call": "assistant", "observation": "tool"}
"""LLaMA-Factory's sharegpt names for a turn of tool calls and for a tool's result."""
EXPECTED_KEYS = (
    "expected 'messages' (messages), 'conversations' (sharegpt), 'instruction' and 'output' (alpaca), "
    "'prompt' and 'completion' (prompt_completion) or 'text' (text) (or force one with format=)"
)
ROLES = ("system", "user", "assistant", "tool")
"""The roles a conversation may hold, in data files and in prompt files."""


@dataclass(kw_only=True)
class Example:
    """One training record in liandan's internal shape: exactly one of ``messages`` and ``text``."""

    messages: list[dict] | None = None
    """The conversation: ``{"role", "content"}`` dicts, plus ``"train": False`` where the data said so,
    ``"tool_calls"`` on assistant turns that call tools, ``"tool_call_id"``/``"name"`` on tool results."""
    text: str | None = None
    """Raw text, for pre-training."""
    tools: list[dict] | None = None
    """The tools the conversation may call, ``{"type": "function", "function": {"name", ...}}``; None when
    the record lists none."""
    source: str
    """Where it came from (``FILE:LINE``, ``FILE:record N`` or ``FILE:row N``), for errors and reports."""


@dataclass
class DataResult:
    """What `read_examples` read."""

    examples: list[Example]
    format: str
    """The detected or forced format; names joined with ``+`` when files differ (``alpaca+messages``)."""
    files: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """``(source, reason)`` of each record dropped by ``skip_invalid``."""




def read_examples(
    paths: str | Path | list[str | Path],
    *,
    format: str | None = None,
    purpose: str = "sft",
    skip_invalid: bool = False,
) -> DataResult:
    """Read data files into `Example`s, validating every record; raises `LiandanError` at the first
    bad one unless ``skip_invalid``. ``purpose`` is ``sft`` (conversations that end with an assistant
    turn) or ``text`` (raw text)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise LiandanError("no data files given")
    if purpose not in PURPOSES:
        raise LiandanError(f"purpose {purpose!r}: expected one of {', '.join(PURPOSES)}")
    if format is not None:
        if format not in FORMATS:
            raise LiandanError(f"format {format!r}: expected one of {', '.join(FORMATS)}")
        check_purpose(format, purpose, f"format {format!r}")
    examples, formats, skipped = [], [], []
    for path in paths:
        file_examples, file_format = read_file(str(path), format, purpose, skip_invalid, skipped)
        examples += file_examples
        if file_format is not None and file_format not in formats:
            formats.append(file_format)
    files = [str(p) for p in paths]
    if not examples:
        first_where, first_reason = skipped[0]
        raise LiandanError(
            f"no valid records in {', '.join(files)}; {summarize_skipped(skipped)}; first: {first_where}: {first_reason}"
        )
    return DataResult(examples=examples, format="+".join(formats), files=files, skipped=skipped)


def check_purpose(fmt: str, purpose: str, what: str) -> None:
    if purpose == "sft" and fmt == "text":
        raise LiandanError(
            f"{what} is raw text for pre-training; purpose 'sft' needs a conversation format: {', '.join(CONVERSATION_FORMATS)}"
        )
    if purpose == "text" and fmt != "text":
        raise LiandanError(f"{what} is a conversation format; purpose 'text' needs records with a 'text' field")


def read_file(
    path: str, fmt: str | None, purpose: str, skip_invalid: bool, skipped: list[tuple[str, str]]
) -> tuple[list[Example], str | None]:
    """Read one file (or Hub dataset); bad records are raised, or appended to ``skipped``."""
    examples, unknown, count = [], None, 0
    for where, record in read_records(path):
        count += 1
        try:
            record = as_object(where, record)
            if fmt is None:
                fmt = detect_format(record)
                if fmt is None:
                    error = RecordError(where, f"keys match no known data format: found {sorted(record)}; {EXPECTED_KEYS}")
                    unknown = unknown or error
                    raise error
                check_purpose(fmt, purpose, f"{path}: format {fmt!r} (detected from {where})")
            examples.append(normalise(record, fmt, where))
        except RecordError as exc:
            if not skip_invalid:
                raise
            skipped.append((exc.where, exc.reason))
    if count == 0:
        raise LiandanError(f"{path}: has no records")
    if fmt is None and unknown is not None:  # only with skip_invalid: no record had the keys of a format
        raise LiandanError(f"{path}: no record matches a known data format; the first: {unknown}")
    return examples, fmt  # fmt is None when every record was skipped before one was recognised


def as_object(where: str, record: object) -> dict:
    """The record if it is a JSON object; a record that failed to parse, or is not an object,
    raises its `RecordError`."""
    if isinstance(record, RecordError):
        raise record
    if not isinstance(record, dict):
        raise RecordError(where, f"expected a JSON object; got {describe(record)}")
    return record


def detect_format(record: dict) -> str | None:
    """The format a record's keys name, or None; the first match in this order wins."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


# ---------------------------------------------------------------------------------------------
# Normalising and validating one record




def normalise(record: dict, fmt: str, where: str) -> Example:
    if fmt == "text":
        return Example(text=string_field(record, "text", where), source=where)
    if fmt == "messages":
        roles = dict(zip(ROLES, ROLES))
        turns = read_turns(record.get("messages", MISSING), "messages", "role", "content", roles, where, tools=True)
    elif fmt == "sharegpt":
        roles = SHAREGPT_ROLES | SHAREGPT_TOOL_TAGS
        turns = read_turns(record.get("conversations", MISSING), "conversations", "from", "value", roles, where, tools=True)
        if record.get("system") is not None:
            turns.insert(0, plain_turn("system", string_field(record, "system", where), "system"))
    elif fmt == "alpaca":
        turns = alpaca_turns(record, where)
    else:
        turns = prompt_completion_turns(record, where)
    check_conversation(turns, where)
    tools = read_tools(record.get("tools"), where)
    check_tool_use(turns, tools, where)
    return Example(messages=[t.message for t in turns], tools=tools, source=where)


def alpaca_turns(record: dict, where: str) -> list[Turn]:
    user = string_field(record, "instruction", where)
    extra = record.get("input")
    if extra is not None:
        if not isinstance(extra, str):
            raise field_error(where, "input", f"expected a string; got {describe(extra)}")
        if extra.strip():
            user += "\n\n" + extra
    turns = [plain_turn("user", user, "instruction"), plain_turn("assistant", string_field(record, "output", where), "output")]
    if record.get("system") is not None:
        turns.insert(0, plain_turn("system", string_field(record, "system", where), "system"))
    return turns


def prompt_completion_turns(record: dict, where: str) -> list[Turn]:
    turns = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = record.get(key, MISSING)
        if isinstance(value, list):  # conversational prompt-completion, as in TRL
            turns += read_turns(value, key, "role", "content", dict(zip(ROLES, ROLES)), where, tools=True)
        else:
            turns.append(plain_turn(role, string_field(record, key, where), key))
    return turns


def plain_turn(role: str, content: str, field_name: str) -> Turn:
    return Turn({"role": role, "content": content}, field_name, role)


def read_turns(
    value: object, name: str, role_key: str, content_key: str, roles: dict, where: str, *, tools: bool = False
) -> list[Turn]:
    """Validate a list of message objects; ``roles`` maps the record's role names to ours. With
    ``tools``, assistant turns may call tools and tool turns may say which call they answer (how
    calls and results fit together is `check_tool_use`'s part, once the whole record is read)."""
    if not isinstance(value, list) or not value:
        raise field_error(where, name, f"expected a non-empty list of {{{role_key}, {content_key}}} objects; got {describe(value)}")
    turns = []
    for i, item in enumerate(value):
        prefix = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise field_error(where, prefix, f"expected an object with '{role_key}' and '{content_key}'; got {describe(item)}")
        raw_role = item.get(role_key, MISSING)
        if not isinstance(raw_role, str) or raw_role not in roles:
            tags = [r for r in roles if r in SHAREGPT_TOOL_TAGS]
            listed = ", ".join(r for r in roles if r not in SHAREGPT_TOOL_TAGS)
            also = f" (or {' and '.join(tags)}, for tool calls and their results)" if tags else ""
            raise field_error(where, f"{prefix}.{role_key}", f"expected one of {listed}; got {describe(raw_role)}{also}")
        role, call_names = roles[raw_role], []
        if tools and raw_role == "function_call":
            calls, call_names = sharegpt_calls(item.get(content_key, MISSING), f"{prefix}.{content_key}", where)
            message = {"role": role, "content": "", "tool_calls": calls}
        elif tools and role == "assistant" and item.get("tool_calls") is not None:
            calls, call_names = read_tool_calls(item["tool_calls"], f"{prefix}.tool_calls", where)
            content = call_content(item.get(content_key), f"{prefix}.{content_key}", where)
            message = {"role": role, "content": content, "tool_calls": calls}
        elif tools and role == "tool":
            message = tool_result(item, content_key, prefix, where)
        else:
            message = {"role": role, "content": string_field(item, content_key, where, prefix=f"{prefix}.")}
        train = item.get("train")
        if train is not None and not isinstance(train, bool):
            raise field_error(where, f"{prefix}.train", f"expected true or false; got {describe(train)}")
        train = read_weight(item, train, message["role"], prefix, where)
        if train is False:
            message["train"] = False
        turns.append(Turn(message, f"{prefix}.{role_key}", raw_role, call_names))
    return turns


def read_weight(item: dict, train: bool | None, role: str, prefix: str, where: str) -> bool | None:
    """OpenAI's ``"weight": 0`` on an assistant turn means the same as ``"train": false``."""
    if "weight" not in item:
        return train
    weight = item["weight"]
    if isinstance(weight, bool) or weight not in (0, 1):
        raise field_error(where, f"{prefix}.weight", f"expected 0 or 1; got {describe(weight)}")
    if role != "assistant":
        raise field_error(where, f"{prefix}.weight", f"only assistant turns are trained, so only they have a weight; got role {role!r}")
    if train is not None and train != bool(weight):
        raise field_error(where, f"{prefix}.weight", f"disagrees with 'train': {describe(train)}; give one of them")
    return bool(weight)


def check_conversation(turns: list[Turn], where: str) -> None:
    """A user turn before the first assistant turn, an assistant turn last (one that only calls tools
    counts), and something to train on."""
    roles = [t.message["role"] for t in turns]
    if "assistant" in roles:
        first = turns[roles.index("assistant")]
        if "user" not in roles[: roles.index("assistant")]:
            raise field_error(where, first.role_field, f"expected a user turn before the first assistant turn; got {first.raw_role!r}")
    last = turns[-1]
    if last.message["role"] != "assistant":
        raise field_error(where, last.role_field, f"expected the conversation to end with an assistant turn; got {last.raw_role!r}")
    if all(t.message.get("train") is False for t in turns if t.message["role"] == "assistant"):
        train_field = last.prefix + ".train"
        raise field_error(where, train_field, "expected at least one assistant turn to train on; got train: false on all of them")





# ---------------------------------------------------------------------------------------------
# Reporting skipped records and splitting


def summarize_skipped(skipped: list[tuple[str, str]]) -> str:
    """One line: how many records were skipped, counted by kind of problem (most common first).

    >>> summarize_skipped([("a.jsonl:1", "not valid JSON: Expecting value (column 1)")])
    'skipped 1 record: not valid JSON (1)'
    """
    if not skipped:
        return "skipped no records"
    counts = Counter(reason_category(reason) for _, reason in skipped)
    parts = [f"{category} ({n})" for category, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return f"skipped {len(skipped)} record{'s' if len(skipped) > 1 else ''}: {'; '.join(parts)}"


def reason_category(reason: str) -> str:
    """A reason without its particulars: indices become ``[]``; the value found and details go."""
    general = re.sub(r"\[\d+\]", "[]", reason).split("; got ")[0]
    if general.startswith("field '"):
        name, _, problem = general.partition("': ")
        return f"{name}': {problem.split(':')[0]}"
    return general.split(":")[0]


def split_examples(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split into (train, eval) by a seeded shuffle; each part keeps the original order.

    The eval set has ``round(len * eval_fraction)`` examples (at least one when the fraction is
    above 0), so the same seed and data always give the same split."""
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or not 0 <= eval_fraction < 1:
        raise LiandanError(f"eval_fraction: expected a number in [0, 1); got {eval_fraction!r}")
    n_eval = 0 if eval_fraction == 0 else max(1, math.floor(len(examples) * eval_fraction + 0.5))
    if n_eval >= len(examples):
        raise LiandanError(
            f"eval_fraction {eval_fraction} of {len(examples)} example(s) leaves no training examples; "
            "add data or lower eval_fraction"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    eval_indices = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in eval_indices]
    return train, [e for i, e in enumerate(examples) if i in eval_indices]


def read_texts(paths: list[str]) -> list[tuple[str, str]]:
    """(source, text) documents: a .txt file is one document; other files hold `text` records."""
    documents = []
    for path in paths:
        if Path(path).suffix.lower() == ".txt":
            if not Path(path).is_file():
                raise LiandanError(f"data file '{path}' does not exist")
            text = read_text(path)
            if not text.strip():
                raise LiandanError(f"{path}: has no text")
            documents.append((path, text))
        else:
            documents += [(e.source, e.text) for e in read_examples([path], purpose="text").examples]
    return documents
