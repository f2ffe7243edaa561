"""Checks that score one model output: what task sets, probes and `bake` measure with.

    from liandan.checks import parse_checks, run_checks
    checks = parse_checks({"regex": r"^\\W*arr\\b", "json": True}, where="test.jsonl:3")
    run_checks(checks, "Arr! Rome, matey.")        # {'regex': True, 'json': False}

A record of a task set carries its checks in a ``checks`` object; a command can add the same
checks to every record (``--schema FILE``, ``--check KEY=VALUE``). Text comparisons ignore case.
Every problem names the file, the line and the field, and is found before any model is loaded.

A ``tool_call`` check reads the calls the model wrote, parsed in its chat template's own format
(`liandan.tools.parse_reply`, done by the caller that holds the model's tokenizer), against the
record's reference turn and its ``tools``:

    checks = parse_checks({"tool_call": "exact"}, where="test.jsonl:9", reference_calls=calls, tools=tools)
    run_checks(checks, text, reply=parse_reply(text, call_format(tokenizer)))   # {'tool_call': True}

A ``predicate`` runs Python code named by the task file, so it is refused unless code is allowed
(``--allow-code``: `allowing_code`, or ``parse_checks(..., allow_code=True)``), and its module is
imported without the current directory on ``sys.path``: a task file cannot pick up a stray
``*.py`` lying beside it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import LiandanError
from .tools import Reply, call_matches

CHECKS = {
    "exact": "the whole answer equals this text (case, surrounding space and final punctuation ignored)",
    "contains": "every one of these strings appears in the answer",
    "contains_any": "at least one of these strings appears",
    "not_contains": "none of these strings appears",
    "regex": "this Python regular expression matches (re.search, case ignored unless (?-i:...))",
    "json": "the answer is valid JSON (a ``` fence around it is allowed)",
    "schema": "the answer is JSON that conforms to this JSON Schema (an object, or a file path)",
    "reference": "compare with the record's reference answer: exact, contains or json (parsed equal)",
    "predicate": "module:function, called as function(answer, record) -> bool",
    "tool_call": "the calls the model writes: exact (the reference turn's calls, or none when it makes none) or schema "
    "(each names a tool of the record and its arguments follow that tool's parameters)",
}
REFERENCE_MODES = ("exact", "contains", "json")
TOOL_CALL_MODES = ("exact", "schema")
REPLY_CHECKS = ("tool_call",)
"""Checks that read the `Reply` parsed from the answer rather than its text."""
_ALLOW_CODE: ContextVar[bool] = ContextVar("allow_code", default=False)


@contextmanager
def allowing_code(allowed: bool = True) -> Iterator[None]:
    """Within this block, checks parsed without an explicit ``allow_code`` may run predicates."""
    token = _ALLOW_CODE.set(allowed)
    try:
        yield
    finally:
        _ALLOW_CODE.reset(token)


def code_allowed() -> bool:
    """Whether code named by data or settings may run here (see `allowing_code`)."""
    return _ALLOW_CODE.get()


@dataclass
class Checks:
    """Parsed, validated checks of one record: each name maps to a test of the answer (its text,
    or for `REPLY_CHECKS` the `Reply` read from it) and the reference answer."""

    tests: dict[str, Callable[[Any, str | None], bool]] = field(default_factory=dict)
    where: str = ""

    def __bool__(self) -> bool:
        return bool(self.tests)


def parse_checks(spec: object, *, where: str, base_dir: Path | None = None, reference: str | None = None,
                 record: dict | None = None, allow_code: bool | None = None, reference_calls: list[dict] | None = None,
                 tools: tuple[dict, ...] | list[dict] | None = None) -> Checks:  # fmt: skip
    """Validate ``spec`` (the ``checks`` object of a record) and compile each check.

    ``base_dir`` resolves a schema given as a relative path; ``reference`` is the record's
    reference answer (needed by the ``reference`` check); ``record`` is passed to predicates;
    ``allow_code`` permits predicates (None: as set by `allowing_code`, off by default);
    ``reference_calls`` (the reference turn's ``tool_calls``, None when it makes none) and
    ``tools`` (the record's function definitions) are what ``tool_call`` compares with.
    """
    allow_code = _ALLOW_CODE.get() if allow_code is None else allow_code
    if not isinstance(spec, dict):
        raise LiandanError(f"{where}: field 'checks': expected an object such as {{\"contains\": [\"Paris\"]}}")
    checks = Checks(where=where)
    for name, value in spec.items():
        if name not in CHECKS:
            raise LiandanError(f"{where}: field 'checks.{name}': unknown check; expected one of {', '.join(CHECKS)}")
        here = f"{where}: field 'checks.{name}'"
        if name == "tool_call":
            checks.tests[name] = _tool_call_check(value, here, base_dir or Path("."), reference_calls, tools)
            continue
        checks.tests[name] = _compile(name, value, here, base_dir or Path("."), reference, record or {}, allow_code)
    return checks


def run_checks(checks: Checks, answer: str, reference: str | None = None, reply: Reply | None = None) -> dict[str, bool]:
    """Each check's verdict on ``answer``; `REPLY_CHECKS` judge ``reply``, the answer parsed with
    the model's call format. A predicate that raises is an error, not a fail."""
    verdicts = {}
    for name, test in checks.tests.items():
        if name in REPLY_CHECKS:
            if reply is None:
                raise LiandanError(f"{checks.where}: field 'checks.{name}': reads the calls of a reply parsed with the "
                                   "model's chat template, which only `liandan eval` does; score this record there")  # fmt: skip
            verdicts[name] = bool(test(reply, reference))
        else:
            verdicts[name] = bool(test(answer, reference))
    return verdicts


def _compile(name: str, value: Any, here: str, base_dir: Path, reference: str | None, record: dict, allow_code: bool):
    if name == "exact":
        target = normalize(_string(value, here))
        return lambda answer, _ref: normalize(answer) == target
    if name in ("contains", "contains_any", "not_contains"):
        needles = [s.lower() for s in _strings(value, here)]
        if name == "contains":
            return lambda answer, _ref: all(n in answer.lower() for n in needles)
        if name == "contains_any":
            return lambda answer, _ref: any(n in answer.lower() for n in needles)
        return lambda answer, _ref: not any(n in answer.lower() for n in needles)
    if name == "regex":
        try:
            pattern = re.compile(_string(value, here), re.IGNORECASE)
        except re.error as exc:
            raise LiandanError(f"{here}: not a valid regular expression: {exc}") from None
        return lambda answer, _ref: pattern.search(answer) is not None
    if name == "json":
        if value is not True:
            raise LiandanError(f"{here}: expected true (got {value!r})")
        return lambda answer, _ref: parse_json(answer) is not INVALID_JSON
    if name == "schema":
        validator = load_schema(value, here, base_dir)
        return lambda answer, _ref: (doc := parse_json(answer)) is not INVALID_JSON and validator.is_valid(doc)
    if name == "reference":
        return _reference_check(value, here, reference)
    return _predicate(value, here, record, allow_code)


def _reference_check(mode: Any, here: str, reference: str | None):
    if mode not in REFERENCE_MODES:
        raise LiandanError(f"{here}: expected one of {', '.join(REFERENCE_MODES)} (got {mode!r})")
    if reference is None:
        raise LiandanError(f"{here}: needs a reference answer, and this record has none "
                           "(give 'reference', or end 'messages' with the assistant's answer)")  # fmt: skip
    if mode == "exact":
        return lambda answer, ref: normalize(answer) == normalize(ref)
    if mode == "contains":
        return lambda answer, ref: normalize(ref) in normalize(answer)
    expected = parse_json(reference)
    if expected is INVALID_JSON:
        raise LiandanError(f"{here}: 'json' compares parsed JSON, but the reference is not valid JSON")
    return lambda answer, _ref: (doc := parse_json(answer)) is not INVALID_JSON and doc == expected


def _tool_call_check(mode: Any, here: str, base_dir: Path, expected: list[dict] | None, tools: Any):
    """``exact``: the same calls as the reference turn, in order (`call_matches`: name equal,
    arguments equal as JSON values). ``schema``: as many calls as the reference, to the same
    functions in order, each with arguments that its tool's ``parameters`` schema accepts. Either
    way a reference without calls wants none, and a call begun but unreadable fails."""
    if mode not in TOOL_CALL_MODES:
        raise LiandanError(f"{here}: expected one of {', '.join(TOOL_CALL_MODES)} (got {mode!r})")
    expected = list(expected or [])
    if not tools and not expected:
        raise LiandanError(f"{here}: compares the model's calls with the record's, and this record has no 'tools' and "
                           "no reference turn with 'tool_calls'")  # fmt: skip
    if mode == "exact":
        return lambda reply, _ref: reply.problem is None and len(reply.calls) == len(expected) and all(
            call_matches(call, want) for call, want in zip(reply.calls, expected))  # fmt: skip
    if not tools:
        raise LiandanError(f"{here}: 'schema' checks each call against the record's tools, and this record has no 'tools'")
    validators = {}
    for k, tool in enumerate(tools):
        function = tool["function"]
        where = f"{here}: tools[{k}].function.parameters"
        validators[function["name"]] = load_schema(function.get("parameters") or {}, where, base_dir)
    unknown = [c["function"]["name"] for c in expected if c["function"]["name"] not in validators]
    if unknown:
        raise LiandanError(f"{here}: the reference calls {unknown[0]!r}, which is not one of the record's tools "
                           f"({', '.join(validators)})")  # fmt: skip

    def test(reply: Reply, _ref: str | None) -> bool:
        names = [c["function"]["name"] for c in reply.calls]
        if reply.problem is not None or names != [c["function"]["name"] for c in expected]:
            return False
        return all(validators[c["function"]["name"]].is_valid(c["function"]["arguments"]) for c in reply.calls)

    return test


def _predicate(value: Any, here: str, record: dict, allow_code: bool):
    spec = _string(value, here)
    function = import_user_function(spec, here, allow_code, "predicate", "the task file")

    def test(answer: str, _ref: str | None) -> bool:
        try:
            return bool(function(answer, record))
        except Exception as exc:  # a user's predicate failing is the user's error to see
            raise LiandanError(f"{here}: {spec} raised {type(exc).__name__}: {exc}") from None

    return test


def import_user_function(spec: str, here: str, allow_code: bool, kind: str, named_by: str) -> Callable:
    """The function ``module:function`` names, imported only when code is allowed, and never from
    the current directory. ``kind`` and ``named_by`` word the refusal ("the predicate ... named by
    the task file")."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise LiandanError(f"{here}: expected 'module:function' (got {spec!r})")
    hint = "(the current directory is not searched: install the module or put its directory on PYTHONPATH)"
    with _without_working_directory():
        # find_spec of the top-level name locates the module without running any of its code.
        if _find(module_name.partition(".")[0]) is None:
            raise LiandanError(f"{here}: cannot import {spec!r}: no module named {module_name.partition('.')[0]!r} {hint}")
        if not allow_code:
            raise LiandanError(f"{here}: the {kind} {spec!r} would run Python code named by {named_by}; "
                               "pass --allow-code if you trust it (it runs with your permissions)")  # fmt: skip
        try:
            function = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as exc:
            raise LiandanError(f"{here}: cannot import {spec!r}: {exc} {hint}") from None
    if not callable(function):
        raise LiandanError(f"{here}: {spec!r} is not a function")
    return function


def _find(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


@contextmanager
def _without_working_directory() -> Iterator[None]:
    """``sys.path`` without the current directory ('' or '.' or its path, as ``python -m`` adds)."""
    saved, cwd = sys.path[:], os.getcwd()
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != cwd]
    try:
        yield
    finally:
        sys.path[:] = saved


def load_schema(value: Any, here: str, base_dir: Path):
    """A JSON Schema validator from an inline object or a file path; a bad schema is an error."""
    import jsonschema

    if isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() else base_dir / value
        if not path.is_file():
            raise LiandanError(f"{here}: schema file '{path}' does not exist")
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LiandanError(f"{here}: schema file '{path}' is not valid JSON: {exc}") from None
        here = f"{here} ({path})"
    if not isinstance(value, dict):
        raise LiandanError(f"{here}: expected a JSON Schema object or a path to one")
    cls = jsonschema.validators.validator_for(value)
    try:
        cls.check_schema(value)
    except jsonschema.SchemaError as exc:
        raise LiandanError(f"{here}: not a valid JSON Schema: {exc.message}") from None
    return cls(value)


INVALID_JSON = object()
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n(.*?)\n?```$", re.DOTALL)


def parse_json(text: str) -> Any:
    """The JSON document in ``text`` (optionally inside one ``` fence), or ``INVALID_JSON``."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return INVALID_JSON


def normalize(text: str) -> str:
    """Lower case, inner whitespace collapsed, surrounding space and final punctuation removed."""
    return " ".join(text.split()).strip().rstrip(".!?。！？").strip().lower()


def _string(value: Any, here: str) -> str:
    if not isinstance(value, str) or not value:
        raise LiandanError(f"{here}: expected a non-empty string (got {value!r})")
    return value


def _strings(value: Any, here: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise LiandanError(f"{here}: expected a non-empty string or list of strings (got {value!r})")
    return values


YAML_VALUED = ("json", "contains", "contains_any", "not_contains")
"""Checks whose --check value is read as YAML (true, a list of strings); the others take it as text."""


def parse_check_options(items: list[str]) -> dict:
    """``--check KEY=VALUE`` pairs; for `YAML_VALUED` checks the value is read as YAML (true,
    lists) when it parses."""
    checks = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LiandanError(f"--check {item!r}: expected KEY=VALUE, e.g. 'regex=^Arr' or json=true")
        if key.strip() not in YAML_VALUED:  # a regex such as [aeiou] is text, not a YAML list
            checks[key.strip()] = value
            continue
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        checks[key.strip()] = parsed if isinstance(parsed, (bool, list)) else value
    return checks
