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
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LiandanError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""A Hugging Face Hub id (owner/name), for data sets and models alike."""

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
CONVERSATION_FORMATS = FORMATS[:-1]
PURPOSES = ("sft", "text")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "tool": "tool"}
SHAREGPT_TOOL_TAGS = {"function_call": "assistant", "observation": "tool"}
"""LLaMA-Factory's sharegpt names for a turn of tool calls and for a tool's result."""
EXPECTED_KEYS = (
    "expected 'messages' (messages), 'conversations' (sharegpt), 'instruction' and 'output' (alpaca), "
    "'prompt' and 'completion' (prompt_completion) or 'text' (text) (or force one with format=)"
)
ROLES = ("system", "user", "assistant", "tool")
"""The roles a conversation may hold, in data files and in prompt files."""
MISSING = object()


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


class RecordError(LiandanError):
    """One bad record: skippable with ``skip_invalid``, unlike errors about a whole file."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


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
# Reading records from files: (source, record) pairs; a record that cannot be parsed is a RecordError


def read_records(path: str) -> Iterator[tuple[str, object]]:
    local = Path(path)
    suffix = local.suffix.lower()
    if not local.exists():
        if HUB_ID.match(path) and suffix not in SUFFIXES:
            return hub_records(path)
        raise LiandanError(f"data file '{path}' does not exist")
    if local.is_dir():
        raise LiandanError(f"data file '{path}' is a directory; expected a {', '.join(SUFFIXES)} file")
    readers = {".jsonl": jsonl_records, ".json": json_records, ".csv": csv_records, ".parquet": parquet_records}
    if suffix not in readers:
        raise LiandanError(f"data file '{path}': expected a {', '.join(SUFFIXES)} file; got '{suffix or local.name}'")
    return readers[suffix](path)


def read_text(path: str) -> str:
    """The file's text; a UTF-8 byte-order mark is dropped, anything not UTF-8 is a one-line error
    naming the line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        hint = "; it looks like UTF-16, save it as UTF-8" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise LiandanError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}){hint}") from None


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    record = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(key)
        record[key] = value
    return record


def parse_json(text: str, one_line: bool = False) -> object:
    """``json.loads`` that refuses what would silently mean something else: a key given twice in
    one object (JSON keeps the last one) and nesting too deep to read (a RecursionError).
    Raises ValueError with a one-line reason (its position as a column only, for ``one_line``
    text such as a JSONL line or a CSV cell)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise ValueError(f"duplicate key {str(exc)!r} in one object (JSON would keep only the last)") from None
    except RecursionError:
        raise ValueError("nested too deeply to read") from None
    except json.JSONDecodeError as exc:
        at = f"column {exc.colno}" if one_line else f"line {exc.lineno} column {exc.colno}"
        raise ValueError(f"not valid JSON: {exc.msg} ({at})") from None


def jsonl_records(path: str) -> Iterator[tuple[str, object]]:
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends, which would shift line numbers.
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, parse_json(line, one_line=True)
        except ValueError as exc:
            yield where, RecordError(where, str(exc))


def json_records(path: str) -> Iterator[tuple[str, object]]:
    text = read_text(path)
    if not text.strip():
        return
    try:
        data = parse_json(text)
    except ValueError as exc:
        raise LiandanError(f"{path}:{failing_record(text)} {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        got = f"an object with keys {sorted(data)}" if isinstance(data, dict) else describe(data)
        raise LiandanError(f"{path}: expected a list of records or an object with a 'data' list; got {got}")
    for number, record in enumerate(data, 1):
        yield f"{path}:record {number}", record


def failing_record(text: str) -> str:
    """Where in a JSON list of records the first one that cannot be read starts, as
    ``record N (line L):``, so that a duplicate key or a too-deep record is found without a
    position of its own; "" when the text is not a list or every record reads."""
    decoder = json.JSONDecoder(object_pairs_hook=_unique_keys)
    at = len(text) - len(text.lstrip())
    if not text.startswith("[", at):
        return ""
    at += 1
    for number in range(1, len(text)):
        at = len(text) - len(text[at:].lstrip())
        if text.startswith("]", at) or at >= len(text):
            return ""
        try:
            _, at = decoder.raw_decode(text, at)
        except (_DuplicateKey, RecursionError, json.JSONDecodeError):
            return f"record {number} (line {text.count(chr(10), 0, at) + 1}):"
        at = len(text) - len(text[at:].lstrip())
        at += text.startswith(",", at)
    return ""


def csv_records(path: str) -> Iterator[tuple[str, object]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        try:
            reader = csv.DictReader(f)
            for number, row in enumerate(reader, 1):
                where = f"{path}:row {number}"
                yield where, csv_record(row, len(reader.fieldnames), where)
        except csv.Error as exc:
            raise LiandanError(f"{path}:row {reader.line_num}: not valid CSV: {exc}") from None
        except UnicodeDecodeError as exc:
            raise LiandanError(f"{path}: not UTF-8 text: {exc}") from None


def csv_record(row: dict, width: int, where: str) -> object:
    """One CSV row as a record. Cells are strings, so the two list fields are read as JSON, and an
    empty optional cell means the field is absent (CSV cannot leave a cell out)."""
    if None in row or None in row.values():
        got = width + len(row.get(None, [])) if None in row else sum(v is not None for v in row.values())
        return RecordError(where, f"expected {width} fields as in the header; got {got}")
    for key in ("messages", "conversations"):
        cell = row.get(key)
        if isinstance(cell, str) and cell.lstrip().startswith("["):
            try:
                row[key] = parse_json(cell, one_line=True)
            except ValueError as exc:
                return RecordError(where, f"field '{key}': {exc}")
    return {k: v for k, v in row.items() if not (k in ("input", "system") and v == "")}


def parquet_records(path: str) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise LiandanError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as exc:
        raise LiandanError(f"{path}: not a readable Parquet file: {exc}") from None
    for number, row in enumerate(rows, 1):
        yield f"{path}:record {number}", drop_nulls(row)


def hub_records(name: str) -> Iterator[tuple[str, object]]:
    try:
        import datasets
    except ImportError:
        raise LiandanError(
            f"'{name}' is not a local file; to read it as a Hugging Face Hub dataset install the 'datasets' "
            f"package (pip install datasets), or pass a local {', '.join(SUFFIXES)} file"
        ) from None
    try:
        rows = datasets.load_dataset(name, split="train")
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        first = str(exc).strip().splitlines()
        raise LiandanError(f"could not load the Hub dataset '{name}': {first[0] if first else type(exc).__name__}") from None
    for number, row in enumerate(rows, 1):
        yield f"{name}:record {number}", drop_nulls(row)


def drop_nulls(row: dict) -> dict:
    # Columnar data fills a field some rows lack with null; treat it as absent, as in JSON.
    return {k: v for k, v in row.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# Normalising and validating one record


@dataclass
class _Turn:
    """A message in the internal shape, plus the names it had in the record, for error messages."""

    message: dict
    role_field: str
    """The record's field that gave the role, e.g. ``conversations[2].from``."""
    raw_role: str
    call_names: list[str] = field(default_factory=list)
    """The record's field that gave each tool call's name, e.g. ``messages[2].tool_calls[0].function.name``."""

    @property
    def prefix(self) -> str:
        """The message's own field, e.g. ``messages[2]``."""
        return self.role_field.rsplit(".", 1)[0]


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


def alpaca_turns(record: dict, where: str) -> list[_Turn]:
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


def prompt_completion_turns(record: dict, where: str) -> list[_Turn]:
    turns = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = record.get(key, MISSING)
        if isinstance(value, list):  # conversational prompt-completion, as in TRL
            turns += read_turns(value, key, "role", "content", dict(zip(ROLES, ROLES)), where, tools=True)
        else:
            turns.append(plain_turn(role, string_field(record, key, where), key))
    return turns


def plain_turn(role: str, content: str, field_name: str) -> _Turn:
    return _Turn({"role": role, "content": content}, field_name, role)


def read_turns(
    value: object, name: str, role_key: str, content_key: str, roles: dict, where: str, *, tools: bool = False
) -> list[_Turn]:
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
        turns.append(_Turn(message, f"{prefix}.{role_key}", raw_role, call_names))
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


def check_conversation(turns: list[_Turn], where: str) -> None:
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
# Tool calling: the record's tools, an assistant turn's calls, a tool turn's result


def read_tools(value: object, where: str) -> list[dict] | None:
    """The record's ``tools`` as ``{"type": "function", "function": {...}}`` objects; a bare function
    object is wrapped so. A JSON string (LLaMA-Factory) is read; absent, empty or ``[]`` is None."""
    expected = "expected a list of tools or a JSON string of one"
    if isinstance(value, str):
        if not value.strip():  # CSV cells and LLaMA-Factory data say "no tools" so
            return None
        try:
            parsed = parse_json(value)
        except ValueError as exc:
            raise field_error(where, "tools", f"{expected}; got {describe(value)}: {exc}") from None
        if not isinstance(parsed, list):
            raise field_error(where, "tools", f"{expected}; got {describe(value)}, which holds {describe(parsed)}")
        value = parsed
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise field_error(where, "tools", f"{expected}; got {describe(value)}")
    tools, first = [], {}
    for i, item in enumerate(value):
        path = f"tools[{i}]"
        if not isinstance(item, dict):
            expected = "expected a tool object with 'function' (or a bare one with 'name')"
            raise field_error(where, path, f"{expected}; got {describe(item)}")
        function, function_path = function_of(item, path, where)
        name = string_field(function, "name", where, prefix=f"{function_path}.")
        if name in first:
            raise field_error(where, f"{function_path}.name", f"expected each tool once; got {name!r} again (also {first[name]})")
        first[name] = path
        description, parameters = function.get("description"), function.get("parameters")
        if description is not None and not isinstance(description, str):
            raise field_error(where, f"{function_path}.description", f"expected a string; got {describe(description)}")
        if parameters is not None and not isinstance(parameters, dict):
            raise field_error(where, f"{function_path}.parameters", f"expected a JSON Schema object; got {describe(parameters)}")
        kept = {k: v for k, v in function.items() if v is not None and not (function is item and k == "type")}
        tools.append({"type": "function", "function": kept})
    return tools


def function_of(item: dict, path: str, where: str) -> tuple[dict, str]:
    """The function object of a tool or a call, and its field: OpenAI wraps it as ``{"type":
    "function", "function": {...}}``, other data gives it bare."""
    kind = item.get("type")
    if kind is not None and kind != "function":
        raise field_error(where, f"{path}.type", f"expected 'function'; got {describe(kind)}")
    if "function" not in item:
        return item, path
    if not isinstance(item["function"], dict):
        raise field_error(where, f"{path}.function", f"expected an object with 'name'; got {describe(item['function'])}")
    return item["function"], f"{path}.function"


def read_tool_calls(value: object, path: str, where: str) -> tuple[list[dict], list[str]]:
    """An assistant turn's ``tool_calls``: the calls, and the field of each call's name."""
    if not isinstance(value, list) or not value:
        raise field_error(where, path, f"expected a non-empty list of calls; got {describe(value)}")
    return read_calls([(f"{path}[{j}]", item) for j, item in enumerate(value)], where)


def sharegpt_calls(value: object, path: str, where: str) -> tuple[list[dict], list[str]]:
    """A ``function_call`` turn's value: a call object, or a list of them (parallel calls), as JSON text."""
    expected = "expected a call object with 'name' and 'arguments' or a list of them, as JSON"
    parsed = value
    if isinstance(value, str):
        try:
            parsed = parse_json(value)
        except ValueError as exc:
            raise field_error(where, path, f"{expected}; got {describe(value)}: {exc}") from None
    if isinstance(parsed, dict):
        return read_calls([(path, parsed)], where)
    if isinstance(parsed, list) and parsed:
        return read_calls([(f"{path}[{j}]", item) for j, item in enumerate(parsed)], where)
    raise field_error(where, path, f"{expected}; got {describe(value)}")


def read_calls(items: list[tuple[str, object]], where: str) -> tuple[list[dict], list[str]]:
    """``(field, call)`` pairs as OpenAI's calls, ``arguments`` a dict; and the field of each call's name."""
    calls, names, ids = [], [], set()
    for path, item in items:
        if not isinstance(item, dict):
            expected = "expected a call object with 'function' (or a bare one with 'name')"
            raise field_error(where, path, f"{expected}; got {describe(item)}")
        function, function_path = function_of(item, path, where)
        name = string_field(function, "name", where, prefix=f"{function_path}.")
        arguments = read_arguments(function.get("arguments", MISSING), f"{function_path}.arguments", where)
        call = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if item.get("id") is not None:
            call["id"] = string_field(item, "id", where, prefix=f"{path}.")
            if call["id"] in ids:  # a result could not say which of the two it answers
                raise field_error(where, f"{path}.id", f"expected each call's id once; got {call['id']!r} again")
            ids.add(call["id"])
        calls.append(call)
        names.append(f"{function_path}.name")
    return calls, names


def read_arguments(value: object, path: str, where: str) -> dict:
    """A call's arguments as a dict: OpenAI writes them as a JSON string, other data as an object."""
    expected = "expected a JSON object or a JSON string of one"
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise field_error(where, path, f"{expected}; got {describe(value)}")
    try:
        parsed = parse_json(value)
    except ValueError as exc:
        raise field_error(where, path, f"{expected}; got {describe(value)}: {exc}") from None
    if not isinstance(parsed, dict):
        raise field_error(where, path, f"{expected}; got {describe(value)}, which holds {describe(parsed)}")
    return parsed


def call_content(value: object, path: str, where: str) -> str:
    """The text beside an assistant turn's calls: often null or left out, then ``""``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ""
    if not isinstance(value, str):
        raise field_error(where, path, f"expected a string or null beside tool_calls; got {describe(value)}")
    return value


def tool_result(item: dict, content_key: str, prefix: str, where: str) -> dict:
    """A tool turn. Its content is the result as text; a result given as a JSON value (an object, a
    list, a number, true or false) is kept as that value's JSON text, which is what a tool returns to
    a model. A list of OpenAI content parts is refused rather than trained as JSON."""
    value, path = item.get(content_key, MISSING), f"{prefix}.{content_key}"
    if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        problem = "expected the result as a string; got a list of content parts (join their text into one string)"
        raise field_error(where, path, problem)
    if isinstance(value, (dict, list, int, float)):  # bool is an int
        content = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, str) and value.strip():
        content = value
    else:
        raise field_error(where, path, f"expected a non-empty string or a JSON value; got {describe(value)}")
    message = {"role": "tool", "content": content}
    for key in ("tool_call_id", "name"):
        if item.get(key) is not None:
            message[key] = string_field(item, key, where, prefix=f"{prefix}.")
    return message


def check_tool_use(turns: list[_Turn], tools: list[dict] | None, where: str) -> None:
    """Calls name the record's tools (when it lists them), and each tool result answers a call of the
    turn of calls just before it (only other results in between), one result per call at most. A
    result's ``name``, when the record leaves it out, is filled in from the call it answers (by
    ``tool_call_id``, or the turn's only call): templates such as Llama 3.1's and Gemma's write it.

    In a record without structured calls, tool turns answer calls written in the assistant's text
    (Hermes' ``<tool_call>``, sharegpt's ``tool`` turns) and are read as before, unchecked."""
    known = [tool["function"]["name"] for tool in tools or []]
    structured = any("tool_calls" in turn.message for turn in turns)
    calls_turn, answered, previous = None, [], None
    for turn in turns:
        message = turn.message
        if "tool_calls" in message:
            for call, name_field in zip(message["tool_calls"], turn.call_names):
                name = call["function"]["name"]
                if tools and name not in known:
                    raise field_error(where, name_field, f"expected one of the record's tools: {', '.join(known)}; got {name!r}")
            calls_turn, answered = turn, []
        elif message["role"] != "tool":
            calls_turn = None
        elif structured or "tool_call_id" in message:
            if calls_turn is None:
                after = f"after {previous.raw_role!r}" if previous else "at the start"
                expected = "expected a tool result to follow a turn of tool calls (with only tool results in between)"
                raise field_error(where, turn.role_field, f"{expected}; got {turn.raw_role!r} {after}")
            answer_call(turn, calls_turn, answered, where)
        previous = turn


def answer_call(turn: _Turn, calls_turn: _Turn, answered: list, where: str) -> None:
    """Match one tool result to a call of ``calls_turn``; ``answered`` holds the results so far."""
    message, calls = turn.message, calls_turn.message["tool_calls"]
    if len(answered) == len(calls):
        n = len(calls)
        expected = f"expected at most {n} tool result{'s' if n > 1 else ''}, one per call in {calls_turn.prefix}"
        raise field_error(where, turn.role_field, f"{expected}; got {n + 1}")
    call = calls[0] if len(calls) == 1 else None
    if "tool_call_id" in message:
        ids = [c["id"] for c in calls if "id" in c]
        call_id = message["tool_call_id"]
        if call_id not in ids:
            known = ", ".join(ids) if ids else "none, its calls have no 'id'"
            expected = f"expected the id of a call in {calls_turn.prefix} ({known})"
            raise field_error(where, f"{turn.prefix}.tool_call_id", f"{expected}; got {call_id!r}")
        if call_id in answered:
            raise field_error(where, f"{turn.prefix}.tool_call_id", f"expected each call answered once; got {call_id!r} again")
        call = next(c for c in calls if c.get("id") == call_id)
    answered.append(message.get("tool_call_id"))
    names, name = [c["function"]["name"] for c in calls], message.get("name")
    if name is None:
        if call is not None:
            message["name"] = call["function"]["name"]
    elif call is not None and name != call["function"]["name"]:
        which = f"call {message['tool_call_id']!r}" if "tool_call_id" in message else f"the call in {calls_turn.prefix}"
        expected = f"expected {call['function']['name']!r}, the name of {which}"
        raise field_error(where, f"{turn.prefix}.name", f"{expected}; got {name!r}")
    elif name not in names:
        expected = f"expected one of the functions called in {calls_turn.prefix}: {', '.join(names)}"
        raise field_error(where, f"{turn.prefix}.name", f"{expected}; got {name!r}")


def string_field(record: dict, key: str, where: str, prefix: str = "") -> str:
    value = record.get(key, MISSING)
    if not isinstance(value, str) or not value.strip():
        raise field_error(where, prefix + key, f"expected a non-empty string; got {describe(value)}")
    return value


def field_error(where: str, name: str, problem: str) -> RecordError:
    return RecordError(where, f"field '{name}': {problem}")


def describe(value: object) -> str:
    """A value as it would read in the data file, short enough for one line."""
    if value is MISSING:
        return "nothing (the field is missing)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


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
