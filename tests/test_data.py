import csv
import json
import sys
import types

import pyarrow
import pyarrow.parquet
import pytest

from conftest import write_jsonl

from liandan.data import DataResult, Example, read_examples, split_examples, summarize_skipped
from liandan.errors import LiandanError


def write_json(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def write_csv(path, records):
    # List-valued fields go into a cell as JSON, which is how such columns appear in real CSV files.
    header = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, header)
        writer.writeheader()
        for r in records:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return path


def write_parquet(path, records):
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)
    return path


WRITERS = {
    "jsonl": (write_jsonl, ":{n}"),
    "json": (write_json, ":record {n}"),
    "csv": (write_csv, ":row {n}"),
    "parquet": (write_parquet, ":record {n}"),
}

# format -> (records, normalised messages or texts of each record)
CASES = {
    "messages": (
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!", "train": False},
                    {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4", "train": True},
                ],
                "id": 7,
            },
        ],
        [
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!", "train": False},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        ],
    ),
    "sharegpt": (
        [
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello!"},
                    {"from": "user", "value": "Weather?"},
                    {"from": "assistant", "value": "Let me look."},
                    {"from": "tool", "value": "sunny"},
                    {"from": "gpt", "value": "Sunny."},
                ]
            }
        ],
        [
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "Let me look."},
                {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "Sunny."},
            ]
        ],
    ),
    "alpaca": (
        [
            {"instruction": "Translate to English.", "input": "你好", "output": "Hello", "system": "Be exact."},
            {"instruction": "Say hi.", "input": "", "output": "Hi"},
        ],
        [
            [
                {"role": "system", "content": "Be exact."},
                {"role": "user", "content": "Translate to English.\n\n你好"},
                {"role": "assistant", "content": "Hello"},
            ],
            [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi"}],
        ],
    ),
    "prompt_completion": (
        [{"prompt": "2+2=", "completion": "4"}],
        [[{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]],
    ),
    "text": ([{"text": "Once upon a time."}, {"text": "第二段。"}], ["Once upon a time.", "第二段。"]),
}


@pytest.mark.parametrize("file_type", list(WRITERS))
@pytest.mark.parametrize("fmt", list(CASES))
def test_each_format_in_each_file_type_is_detected_and_normalised(tmp_path, fmt, file_type):
    write, where = WRITERS[file_type]
    records, expected = CASES[fmt]
    path = write(tmp_path / f"data.{file_type}", records)
    purpose = "text" if fmt == "text" else "sft"
    result = read_examples(path, purpose=purpose)
    assert result.format == fmt and result.files == [str(path)] and result.skipped == []
    if fmt == "text":
        assert [e.text for e in result.examples] == expected
        assert all(e.messages is None for e in result.examples)
    else:
        assert [e.messages for e in result.examples] == expected
        assert all(e.text is None for e in result.examples)
    assert [e.source for e in result.examples] == [str(path) + where.format(n=n) for n in range(1, len(expected) + 1)]


def test_json_object_with_data_list_and_prompt_as_messages(tmp_path):
    prompt = [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Q"}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [{"prompt": prompt, "completion": "A"}]}), encoding="utf-8")
    result = read_examples(path)
    assert result.format == "prompt_completion"
    assert result.examples == [
        Example(messages=[*prompt, {"role": "assistant", "content": "A"}], source=f"{path}:record 1")
    ]


def test_conversational_completion_list_as_in_trl(tmp_path):
    record = {
        "prompt": [{"role": "user", "content": "Q"}],
        "completion": [{"role": "assistant", "content": "A", "train": False}, {"role": "assistant", "content": "B"}],
    }
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    assert read_examples(path).examples[0].messages == [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A", "train": False},
        {"role": "assistant", "content": "B"},
    ]


def test_sharegpt_top_level_system(tmp_path):
    record = {"system": "Sys", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    assert read_examples(path).examples[0].messages[0] == {"role": "system", "content": "Sys"}


def test_detection_order_and_forcing_a_format(tmp_path):
    record = {"prompt": "P", "completion": "C", "text": "T"}
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    assert read_examples(path).format == "prompt_completion"
    forced = read_examples(path, format="text", purpose="text")
    assert forced.format == "text" and forced.examples == [Example(text="T", source=f"{path}:1")]
    # "messages" wins over a "text" field that rides along.
    both = write_jsonl(tmp_path / "both.jsonl", [{"text": "T", **CASES["messages"][0][0]}])
    assert read_examples(both).format == "messages"


def test_forced_format_missing_its_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "T"}])
    with pytest.raises(LiandanError) as info:
        read_examples(path, format="messages")
    assert str(info.value) == (
        f"{path}:1: field 'messages': expected a non-empty list of {{role, content}} objects; "
        "got nothing (the field is missing)"
    )


def test_files_of_different_formats(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", CASES["alpaca"][0])
    m = write_jsonl(tmp_path / "m.jsonl", CASES["messages"][0])
    result = read_examples([a, str(m)])
    assert result.format == "alpaca+messages"
    assert result.files == [str(a), str(m)]
    assert [e.source for e in result.examples] == [f"{a}:1", f"{a}:2", f"{m}:1"]


GOOD = {
    "messages": {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
    "alpaca": {"instruction": "I", "output": "O"},
    "prompt_completion": {"prompt": "P", "completion": "C"},
    "text": {"text": "T"},
}
U, A = {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}


@pytest.mark.parametrize(
    "fmt, bad, expected",
    [
        (
            "messages",
            {"messages": [U, A, {"role": "bot", "content": "x"}]},
            "field 'messages[2].role': expected one of system, user, assistant, tool; got 'bot'",
        ),
        ("messages", {"messages": [U, {"content": "A"}]}, "field 'messages[1].role': expected one of system, user, assistant, tool; got nothing"),
        ("messages", {"messages": [U, {"role": "assistant", "content": ""}]}, "field 'messages[1].content': expected a non-empty string; got ''"),
        ("messages", {"messages": [{"role": "system", "content": " "}, U, A]}, "field 'messages[0].content': expected a non-empty string; got ' '"),
        ("messages", {"messages": [U, {"role": "assistant", "content": 4}]}, "field 'messages[1].content': expected a non-empty string; got 4"),
        ("messages", {"messages": [U, {"role": "assistant", "content": "A", "train": "no"}]}, "field 'messages[1].train': expected true or false; got 'no'"),
        ("messages", {"messages": [{"role": "system", "content": "S"}, A, U, A]}, "field 'messages[1].role': expected a user turn before the first assistant turn; got 'assistant'"),
        ("messages", {"messages": [U, A, U]}, "field 'messages[2].role': expected the conversation to end with an assistant turn; got 'user'"),
        ("messages", {"messages": [U, {**A, "train": False}]}, "field 'messages[1].train': expected at least one assistant turn to train on"),
        ("messages", {"messages": []}, "field 'messages': expected a non-empty list of {role, content} objects; got a list"),
        ("messages", {"messages": "hi"}, "field 'messages': expected a non-empty list of {role, content} objects; got 'hi'"),
        ("messages", {"messages": [U, "A"]}, "field 'messages[1]': expected an object with 'role' and 'content'; got 'A'"),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]},
            "field 'conversations[1].from': expected one of system, human, user, gpt, assistant, tool; got 'bot'",
        ),
        ("sharegpt", {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt"}]}, "field 'conversations[1].value': expected a non-empty string; got nothing"),
        ("sharegpt", {"conversations": [{"from": "gpt", "value": "A"}]}, "field 'conversations[0].from': expected a user turn before the first assistant turn; got 'gpt'"),
        ("alpaca", {"instruction": "I", "input": "x"}, "field 'output': expected a non-empty string; got nothing (the field is missing)"),
        ("alpaca", {"instruction": "", "output": "O"}, "field 'instruction': expected a non-empty string; got ''"),
        ("alpaca", {"instruction": "I", "input": 3, "output": "O"}, "field 'input': expected a string; got 3"),
        ("alpaca", {"instruction": "I", "output": "O", "system": ""}, "field 'system': expected a non-empty string; got ''"),
        ("prompt_completion", {"prompt": "P", "completion": ""}, "field 'completion': expected a non-empty string; got ''"),
        ("prompt_completion", {"prompt": [{"role": "robot", "content": "P"}], "completion": "C"}, "field 'prompt[0].role': expected one of system, user, assistant, tool; got 'robot'"),
        ("prompt_completion", {"prompt": "P", "completion": [{"role": "user", "content": "C"}]}, "field 'completion[0].role': expected the conversation to end with an assistant turn; got 'user'"),
        ("text", {"text": ""}, "field 'text': expected a non-empty string; got ''"),
        ("text", {"text": ["a"]}, "field 'text': expected a non-empty string; got a list"),
        ("text", ["a"], "expected a JSON object; got a list"),
    ],
)
def test_bad_record_names_file_line_and_field(tmp_path, fmt, bad, expected):
    path = tmp_path / "bad.jsonl"
    # A good record, a blank line, then the bad one: the error must point at line 3.
    path.write_text(json.dumps(GOOD[fmt]) + "\n\n" + json.dumps(bad) + "\n", encoding="utf-8")
    purpose = "text" if fmt == "text" else "sft"
    with pytest.raises(LiandanError) as info:
        read_examples(path, purpose=purpose)
    assert str(info.value).startswith(f"{path}:3: {expected}")


def test_invalid_json_line_and_unicode_line_separators(tmp_path):
    # U+2028 inside a JSON string is valid JSON and must not shift the line count.
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + '\n{"text": "x"\n', encoding="utf-8")
    with pytest.raises(LiandanError) as info:
        read_examples(path, purpose="text")
    assert str(info.value) == f"{path}:2: not valid JSON: Expecting ',' delimiter (column 13)"


def test_stops_at_the_first_bad_record(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD["alpaca"], {"instruction": "I"}, {"instruction": 1, "output": "O"}])
    with pytest.raises(LiandanError, match=r"d\.jsonl:2: field 'output'"):
        read_examples(path)


@pytest.mark.parametrize(
    "file_type, where",
    [("json", ":record 2"), ("csv", ":row 2"), ("parquet", ":record 2")],
)
def test_bad_record_location_in_other_file_types(tmp_path, file_type, where):
    write, _ = WRITERS[file_type]
    path = write(tmp_path / f"d.{file_type}", [{"instruction": "I", "output": "O"}, {"instruction": "I", "output": ""}])
    with pytest.raises(LiandanError) as info:
        read_examples(path)
    assert str(info.value) == f"{path}{where}: field 'output': expected a non-empty string; got ''"


def test_skip_invalid_keeps_going_and_counts_reasons(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [
        json.dumps(GOOD["messages"]),
        json.dumps({"messages": [U, {"role": "bot", "content": "x"}]}),
        "{broken",
        json.dumps({"messages": [U, A, {"role": "robot", "content": "x"}]}),
        json.dumps({"messages": [U, {"role": "assistant", "content": ""}]}),
        json.dumps({"messages": [{"role": "user", "content": "Q2"}, A]}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = read_examples(path, skip_invalid=True)
    assert [e.source for e in result.examples] == [f"{path}:1", f"{path}:6"]
    assert result.skipped == [
        (f"{path}:2", "field 'messages[1].role': expected one of system, user, assistant, tool; got 'bot'"),
        (f"{path}:3", "not valid JSON: Expecting property name enclosed in double quotes (column 2)"),
        (f"{path}:4", "field 'messages[2].role': expected one of system, user, assistant, tool; got 'robot'"),
        (f"{path}:5", "field 'messages[1].content': expected a non-empty string; got ''"),
    ]
    assert summarize_skipped(result.skipped) == (
        "skipped 4 records: field 'messages[].role': expected one of system, user, assistant, tool (2); "
        "field 'messages[].content': expected a non-empty string (1); not valid JSON (1)"
    )


def test_skip_invalid_detects_format_from_first_recognisable_record(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"foo": 1}, GOOD["alpaca"]])
    result = read_examples(path, skip_invalid=True)
    assert result.format == "alpaca" and len(result.examples) == 1
    assert summarize_skipped(result.skipped) == "skipped 1 record: keys match no known data format (1)"


def test_skip_invalid_with_nothing_valid_left(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "I"}, {"instruction": "I", "output": " "}])
    with pytest.raises(LiandanError) as info:
        read_examples(path, skip_invalid=True)
    assert str(info.value) == (
        f"no valid records in {path}; skipped 2 records: field 'output': expected a non-empty string (2); "
        f"first: {path}:1: field 'output': expected a non-empty string; got nothing (the field is missing)"
    )


def test_summarize_nothing_skipped():
    assert summarize_skipped([]) == "skipped no records"


def test_unknown_format_names_file_keys_and_what_is_expected(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q", "answer": "A"}])
    with pytest.raises(LiandanError) as info:
        read_examples(path)
    assert str(info.value) == (
        f"{path}:1: keys match no known data format: found ['answer', 'question']; expected 'messages' (messages), "
        "'conversations' (sharegpt), 'instruction' and 'output' (alpaca), 'prompt' and 'completion' (prompt_completion) "
        "or 'text' (text) (or force one with format=)"
    )
    with pytest.raises(LiandanError, match=r"^.*d\.jsonl: no record matches a known data format; the first: .*d\.jsonl:1: keys"):
        read_examples(path, skip_invalid=True)


@pytest.mark.parametrize("name, content", [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "text\n"), ("blank.json", "")])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LiandanError) as info:
        read_examples(path, skip_invalid=True)
    assert str(info.value) == f"{path}: has no records"


def test_empty_parquet_file(tmp_path):
    path = tmp_path / "e.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": pyarrow.array([], pyarrow.string())}), path)
    with pytest.raises(LiandanError, match=r"e\.parquet: has no records$"):
        read_examples(path, purpose="text")


def test_purpose_must_match_the_format(tmp_path):
    text = write_jsonl(tmp_path / "t.jsonl", [GOOD["text"]])
    chat = write_jsonl(tmp_path / "c.jsonl", [GOOD["messages"]])
    with pytest.raises(LiandanError) as info:
        read_examples(text, skip_invalid=True)
    assert str(info.value) == (
        f"{text}: format 'text' (detected from {text}:1) is raw text for pre-training; "
        "purpose 'sft' needs a conversation format: messages, sharegpt, alpaca, prompt_completion"
    )
    with pytest.raises(LiandanError, match=r"c\.jsonl: format 'messages' .* purpose 'text' needs records with a 'text' field"):
        read_examples(chat, purpose="text")
    with pytest.raises(LiandanError, match=r"^format 'text' is raw text for pre-training"):
        read_examples(chat, format="text")


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"format": "chatml"}, "format 'chatml': expected one of messages, sharegpt, alpaca, prompt_completion, text"),
        ({"purpose": "dpo"}, "purpose 'dpo': expected one of sft, text"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD["messages"]])
    with pytest.raises(LiandanError) as info:
        read_examples(path, **kwargs)
    assert str(info.value) == expected


def test_bad_paths(tmp_path):
    with pytest.raises(LiandanError, match=r"^no data files given$"):
        read_examples([])
    with pytest.raises(LiandanError, match=r"^data file 'data/train\.jsonl' does not exist$"):
        read_examples("data/train.jsonl")
    txt = tmp_path / "d.txt"
    txt.write_text("hello\n", encoding="utf-8")
    with pytest.raises(LiandanError, match=r"d\.txt': expected a \.jsonl, \.json, \.csv, \.parquet file; got '\.txt'$"):
        read_examples(txt)
    with pytest.raises(LiandanError, match=r"is a directory"):
        read_examples(tmp_path)
    bad_json = tmp_path / "b.json"
    bad_json.write_text('{"data": [', encoding="utf-8")
    with pytest.raises(LiandanError, match=r"b\.json: not valid JSON: Expecting value \(line 1 column 11\)$"):
        read_examples(bad_json, skip_invalid=True)
    record = tmp_path / "r.json"
    record.write_text('{"text": "one record"}', encoding="utf-8")
    with pytest.raises(LiandanError, match=r"r\.json: expected a list of records or an object with a 'data' list; got an object with keys \['text'\]$"):
        read_examples(record, purpose="text")


def test_csv_row_with_wrong_number_of_fields_and_bom(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\nI,O\nI,O,extra\n", encoding="utf-8-sig")
    result = read_examples(path, skip_invalid=True)
    assert result.format == "alpaca" and len(result.examples) == 1
    assert result.skipped == [(f"{path}:row 2", "expected 2 fields as in the header; got 3")]


def test_hub_id_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(LiandanError) as info:
        read_examples("owner/name")
    assert str(info.value).startswith("'owner/name' is not a local file; to read it as a Hugging Face Hub dataset install the 'datasets' package")


def test_hub_id_with_datasets_package(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [{"instruction": "I", "input": None, "output": "O"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    result = read_examples("owner/name")
    assert calls == [("owner/name", "train")]
    assert result.examples == [
        Example(messages=[{"role": "user", "content": "I"}, {"role": "assistant", "content": "O"}], source="owner/name:record 1")
    ]


def test_hub_load_failure_is_one_line(monkeypatch):
    def load_dataset(name, split):
        raise ConnectionError("no network\nlong traceback text")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(LiandanError, match=r"^could not load the Hub dataset 'owner/name': no network$"):
        read_examples("owner/name")


def examples(n):
    return [Example(text=str(i), source=f"f:{i}") for i in range(n)]


def test_split_is_deterministic_and_keeps_order():
    train, eval_ = split_examples(examples(10), eval_fraction=0.3, seed=0)
    assert [e.text for e in eval_] == ["1", "7", "8"]
    assert [e.text for e in train] == ["0", "2", "3", "4", "5", "6", "9"]
    again = split_examples(examples(10), eval_fraction=0.3, seed=0)
    assert again == (train, eval_)
    assert [e.text for e in split_examples(examples(10), eval_fraction=0.3, seed=1)[1]] == ["6", "8", "9"]


def test_split_sizes():
    assert split_examples(examples(4), eval_fraction=0, seed=0) == (examples(4), [])
    # A small positive fraction still gives one eval example rather than a silently empty eval set.
    assert len(split_examples(examples(10), eval_fraction=0.01, seed=0)[1]) == 1
    assert len(split_examples(examples(10), eval_fraction=0.25, seed=0)[1]) == 3  # 2.5 rounds up


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan"), True])
def test_split_rejects_fractions_outside_zero_one(fraction):
    with pytest.raises(LiandanError, match=r"^eval_fraction: expected a number in \[0, 1\); got"):
        split_examples(examples(10), eval_fraction=fraction, seed=0)


def test_split_that_leaves_no_training_examples():
    with pytest.raises(LiandanError, match=r"^eval_fraction 0.5 of 1 example\(s\) leaves no training examples"):
        split_examples(examples(1), eval_fraction=0.5, seed=0)
    with pytest.raises(LiandanError, match=r"leaves no training examples"):
        split_examples([], eval_fraction=0, seed=0)


def test_result_type(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD["text"]])
    result = read_examples(path, purpose="text")
    assert isinstance(result, DataResult)
    assert result == DataResult(examples=[Example(text="T", source=f"{path}:1")], format="text", files=[str(path)])


def test_openai_weight_zero_is_train_false(tmp_path):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey.", "weight": 0},
             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye.", "weight": 1}]  # fmt: skip
    path = write_jsonl(tmp_path / "weights.jsonl", [{"messages": turns}])
    messages = read_examples(path).examples[0].messages
    assert messages[1] == {"role": "assistant", "content": "Hey.", "train": False}
    assert messages[3] == {"role": "assistant", "content": "Bye."}
