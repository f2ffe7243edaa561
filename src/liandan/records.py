"""Records of data files: reading them as ``(source, record)`` pairs, and naming their fields in errors.

Every file format liandan reads (JSONL, JSON, CSV, Parquet, a Hub data set) comes out of
`read_records` as pairs of a source (``FILE:LINE``, ``FILE:record N``, ``FILE:row N``) and a
record; a record that cannot be parsed comes out as its `RecordError`, so that one bad line can
be skipped. `field_error` and `describe` write the one-line messages every reader of records
shares: ``FILE:LINE: field 'x': expected ...; got ...``.

    from liandan.records import read_records
    for where, record in read_records("examples/pirate.jsonl"):
        print(where, sorted(record))                           # examples/pirate.jsonl:1 ['messages']
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LiandanError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""A Hugging Face Hub id (owner/name), for data sets and models alike."""

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MISSING = object()
"""A field the record does not have (`describe` says so), as opposed to one that is null."""



class RecordError(LiandanError):
    """One bad record: skippable with ``skip_invalid``, unlike errors about a whole file."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


@dataclass
class Turn:
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
