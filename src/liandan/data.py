"""Read training data files and normalise every format into one internal shape.

Files are ``.jsonl``, ``.json`` (a list of records, or ``{"data": [...]}``), ``.csv`` or
``.parquet``; a Hub id (``owner/name``) is read with the optional ``datasets`` package. Each file's
format is detected from its first record's keys (or forced with ``format=``):

==================  =================================================================
``messages``        ``{"messages": [{"role", "content", "train"?}, ...]}`` (OpenAI)
``sharegpt``        ``{"conversations": [{"from", "value"}, ...], "system"?}``
``alpaca``          ``{"instruction", "input"?, "output", "system"?}``
``prompt_completion`` ``{"prompt": str | messages, "completion": str | messages}``
``text``            ``{"text"}`` (raw text for pre-training)
==================  =================================================================

Every record becomes an `Example`: a conversation of ``{"role", "content"}`` dicts (plus
``"train": False`` on turns that must not be trained on) or a raw text, with its source.

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
from .prompts import ROLES

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""A Hugging Face Hub id (owner/name), for data sets and models alike."""

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
CONVERSATION_FORMATS = FORMATS[:-1]
PURPOSES = ("sft", "text")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "tool": "tool"}
EXPECTED_KEYS = (
    "expected 'messages' (messages), 'conversations' (sharegpt), 'instruction' and 'output' (alpaca), "
    "'prompt' and 'completion' (prompt_completion) or 'text' (text) (or force one with format=)"
)
MISSING = object()


@dataclass(kw_only=True)
class Example:
    """One training record in liandan's internal shape: exactly one of ``messages`` and ``text``."""

    messages: list[dict] | None = None
    """The conversation: ``{"role", "content"}`` dicts, plus ``"train": False`` where the data said so."""
    text: str | None = None
    """Raw text, for pre-training."""
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


def normalise(record: dict, fmt: str, where: str) -> Example:
    if fmt == "text":
        return Example(text=string_field(record, "text", where), source=where)
    if fmt == "messages":
        turns = read_turns(record.get("messages", MISSING), "messages", "role", "content", dict(zip(ROLES, ROLES)), where)
    elif fmt == "sharegpt":
        turns = read_turns(record.get("conversations", MISSING), "conversations", "from", "value", SHAREGPT_ROLES, where)
        if record.get("system") is not None:
            turns.insert(0, plain_turn("system", string_field(record, "system", where), "system"))
    elif fmt == "alpaca":
        turns = alpaca_turns(record, where)
    else:
        turns = prompt_completion_turns(record, where)
    check_conversation(turns, where)
    return Example(messages=[t.message for t in turns], source=where)


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
            turns += read_turns(value, key, "role", "content", dict(zip(ROLES, ROLES)), where)
        else:
            turns.append(plain_turn(role, string_field(record, key, where), key))
    return turns


def plain_turn(role: str, content: str, field_name: str) -> _Turn:
    return _Turn({"role": role, "content": content}, field_name, role)


def read_turns(value: object, name: str, role_key: str, content_key: str, roles: dict, where: str) -> list[_Turn]:
    """Validate a list of message objects; ``roles`` maps the record's role names to ours."""
    if not isinstance(value, list) or not value:
        raise field_error(where, name, f"expected a non-empty list of {{{role_key}, {content_key}}} objects; got {describe(value)}")
    turns = []
    for i, item in enumerate(value):
        prefix = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise field_error(where, prefix, f"expected an object with '{role_key}' and '{content_key}'; got {describe(item)}")
        raw_role = item.get(role_key, MISSING)
        if not isinstance(raw_role, str) or raw_role not in roles:
            raise field_error(where, f"{prefix}.{role_key}", f"expected one of {', '.join(roles)}; got {describe(raw_role)}")
        message = {"role": roles[raw_role], "content": string_field(item, content_key, where, prefix=f"{prefix}.")}
        train = item.get("train")
        if train is not None and not isinstance(train, bool):
            raise field_error(where, f"{prefix}.train", f"expected true or false; got {describe(train)}")
        train = read_weight(item, train, message["role"], prefix, where)
        if train is False:
            message["train"] = False
        turns.append(_Turn(message, f"{prefix}.{role_key}", raw_role))
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
    """A user turn before the first assistant turn, an assistant turn last, and something to train on."""
    roles = [t.message["role"] for t in turns]
    if "assistant" in roles:
        first = turns[roles.index("assistant")]
        if "user" not in roles[: roles.index("assistant")]:
            raise field_error(where, first.role_field, f"expected a user turn before the first assistant turn; got {first.raw_role!r}")
    last = turns[-1]
    if last.message["role"] != "assistant":
        raise field_error(where, last.role_field, f"expected the conversation to end with an assistant turn; got {last.raw_role!r}")
    if all(t.message.get("train") is False for t in turns if t.message["role"] == "assistant"):
        train_field = last.role_field.rsplit(".", 1)[0] + ".train"
        raise field_error(where, train_field, "expected at least one assistant turn to train on; got train: false on all of them")


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
