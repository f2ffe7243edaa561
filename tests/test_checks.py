import json

import pytest

from liandan.checks import allowing_code, normalize, parse_checks, parse_json, run_checks
from liandan.errors import LiandanError

SCHEMA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}, "additionalProperties": False}


def verdicts(spec, answer, reference=None, **kw):
    return run_checks(parse_checks(spec, where="t.jsonl:1", reference=reference, **kw), answer, reference)


@pytest.mark.parametrize(
    "spec, answer, expected",
    [
        ({"exact": "Yes"}, "  yes. ", {"exact": True}),
        ({"exact": "Yes"}, "Yes, it is.", {"exact": False}),
        ({"contains": ["paris", "France"]}, "Paris is in FRANCE", {"contains": True}),
        ({"contains": ["paris", "Spain"]}, "Paris is in France", {"contains": False}),
        ({"contains_any": ["8", "eight"]}, "Eight legs", {"contains_any": True}),
        ({"not_contains": ["sorry"]}, "Sorry, no", {"not_contains": False}),
        ({"regex": r"^\W*arr\b"}, "Arr! Ahoy", {"regex": True}),
        ({"regex": r"^\W*arr\b"}, "Well, arr", {"regex": False}),
        ({"regex": r"(?-i:\bCAT\b)"}, "cat", {"regex": False}),
        ({"json": True}, '```json\n{"a": 1}\n```', {"json": True}),
        ({"json": True}, 'Here: {"a": 1}', {"json": False}),
        ({"schema": SCHEMA}, '{"name": "x"}', {"schema": True}),
        ({"schema": SCHEMA}, '{"name": 3}', {"schema": False}),
        ({"schema": SCHEMA, "contains": "x"}, "not json x", {"schema": False, "contains": True}),
    ],
)
def test_each_check(spec, answer, expected):
    assert verdicts(spec, answer) == expected


def test_reference_checks():
    assert verdicts({"reference": "exact"}, "Paris.", reference="paris") == {"reference": True}
    assert verdicts({"reference": "contains"}, "It is Paris, France", reference="Paris") == {"reference": True}
    ref = '{"a": 1, "b": [2]}'
    assert verdicts({"reference": "json"}, '{"b": [2], "a": 1}', reference=ref) == {"reference": True}
    assert verdicts({"reference": "json"}, '{"b": [2], "a": 2}', reference=ref) == {"reference": False}


def test_schema_from_a_file_relative_to_the_set(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(SCHEMA))
    assert verdicts({"schema": "s.json"}, '{"name": "a"}', base_dir=tmp_path) == {"schema": True}


def test_predicate_gets_answer_and_record(tmp_path, monkeypatch):
    (tmp_path / "mychecks.py").write_text("def short(answer, record):\n    return len(answer) <= record['limit']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with allowing_code():
        assert verdicts({"predicate": "mychecks:short"}, "abc", record={"limit": 3}) == {"predicate": True}
        assert verdicts({"predicate": "mychecks:short"}, "abcd", record={"limit": 3}) == {"predicate": False}


def test_predicates_need_allow_code_and_never_come_from_the_working_directory(tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    spec = {"predicate": "os:system"}
    with pytest.raises(LiandanError, match=r"t.jsonl:2: field 'checks.predicate': the predicate 'os:system' would run .*--allow-code"):
        parse_checks(spec, where="t.jsonl:2", record={"x": f"touch {marker}"})
    # A module beside the task file (the working directory) is not imported, even with code allowed.
    (tmp_path / "planted.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef check(answer, record):\n    return True\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend("")
    with pytest.raises(LiandanError, match="cannot import 'planted:check'.*current directory is not searched"):
        parse_checks({"predicate": "planted:check"}, where="t.jsonl:3", allow_code=True)
    assert not marker.exists() and "" in __import__("sys").path  # sys.path is left as it was


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"contain": "x"}, "t.jsonl:1: field 'checks.contain': unknown check; expected one of exact, contains"),
        ({"regex": "("}, "t.jsonl:1: field 'checks.regex': not a valid regular expression"),
        ({"contains": []}, "t.jsonl:1: field 'checks.contains': expected a non-empty string or list"),
        ({"json": "yes"}, "t.jsonl:1: field 'checks.json': expected true"),
        ({"schema": {"type": "nonsense"}}, "t.jsonl:1: field 'checks.schema': not a valid JSON Schema"),
        ({"schema": "missing.json"}, "schema file 'missing.json' does not exist"),
        ({"reference": "exact"}, "t.jsonl:1: field 'checks.reference': needs a reference answer"),
        ({"reference": "fuzzy"}, "expected one of exact, contains, json"),
        ({"predicate": "nomodule_here:f"}, "t.jsonl:1: field 'checks.predicate': cannot import 'nomodule_here:f'"),
        ({"predicate": "json"}, "expected 'module:function'"),
        ("contains", "t.jsonl:1: field 'checks': expected an object"),
    ],
)
def test_bad_checks_name_file_line_and_field(spec, message):
    with pytest.raises(LiandanError, match=None) as error:
        parse_checks(spec, where="t.jsonl:1")
    assert message in str(error.value)


def test_schema_file_that_does_not_parse(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LiandanError, match=r"t.jsonl:1: field 'checks.schema' .*bad.json.* is not valid JSON|schema file .*bad.json' is not valid JSON"):
        parse_checks({"schema": "bad.json"}, where="t.jsonl:1", base_dir=tmp_path)


def test_reference_json_mode_needs_a_json_reference():
    with pytest.raises(LiandanError, match="the reference is not valid JSON"):
        parse_checks({"reference": "json"}, where="t.jsonl:1", reference="Paris")


def test_a_predicate_that_raises_is_an_error_naming_it(tmp_path, monkeypatch):
    (tmp_path / "boom.py").write_text("def check(answer, record):\n    raise ValueError('bad answer')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    checks = parse_checks({"predicate": "boom:check"}, where="t.jsonl:4", allow_code=True)
    with pytest.raises(LiandanError, match=r"t.jsonl:4: field 'checks.predicate': boom:check raised ValueError: bad answer"):
        run_checks(checks, "x")


def test_normalize_and_parse_json():
    assert normalize("  The  Answer! ") == "the answer"
    assert parse_json("```\n[1, 2]\n```") == [1, 2]


def test_check_options_keep_a_regex_as_text():
    """'regex=[aeiou]' is a character class, not the YAML list ['aeiou']; lists stay lists where a check takes one."""
    from liandan.checks import parse_check_options

    assert parse_check_options(["regex=[aeiou]", "exact=[1]", "contains=[a, b]", "json=true"]) == {
        "regex": "[aeiou]", "exact": "[1]", "contains": ["a", "b"], "json": True}
