"""Tool-calling records (issue 20): OpenAI ``tool_calls``/``tools`` and LLaMA-Factory's sharegpt
``function_call``/``observation`` read into one shape, and every misfit named by file, line and field."""

import csv
import json

import pyarrow
import pyarrow.parquet
import pytest
from conftest import write_jsonl

from liandan.data import read_examples, summarize_skipped
from liandan.errors import LiandanError

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
U = {"role": "user", "content": "Weather in Oslo?"}
A = {"role": "assistant", "content": "Sunny, 21 degrees."}


def call(name="get_weather", arguments='{"city": "Oslo"}', id=None):
    """A call as OpenAI writes it: arguments as a JSON string."""
    return {"type": "function", "function": {"name": name, "arguments": arguments}} | ({"id": id} if id else {})


def calling(*calls, content=None):
    return {"role": "assistant", "content": content, "tool_calls": list(calls)}


def result(content="sunny, 21", **keys):
    return {"role": "tool", "content": content, **keys}


def read_one(tmp_path, record):
    return read_examples(write_jsonl(tmp_path / "d.jsonl", [record])).examples[0]


def test_openai_record_reads_string_arguments_as_a_dict_and_fills_in_the_result_name(tmp_path):
    record = {"messages": [U, calling(call(id="call_1")), result(tool_call_id="call_1"), A], "tools": [WEATHER]}
    example = read_one(tmp_path, record)
    assert example.messages == [
        U,
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}, "id": "call_1"}
        ]},
        {"role": "tool", "content": "sunny, 21", "tool_call_id": "call_1", "name": "get_weather"},
        A,
    ]  # fmt: skip
    assert example.tools == [WEATHER]


def test_object_arguments_and_text_beside_the_call_are_kept(tmp_path):
    arguments = {"city": "Oslo", "days": [1, 2], "unit": None}
    record = {"messages": [U, calling(call(arguments=arguments), content="Let me check."), result(), A]}
    example = read_one(tmp_path, record)
    assert example.messages[1] == {
        "role": "assistant", "content": "Let me check.",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": arguments}}],
    }  # fmt: skip
    # No tool_call_id, but the turn made one call: the result answers it, so its name is known.
    assert example.messages[2] == {"role": "tool", "content": "sunny, 21", "name": "get_weather"}
    assert example.tools is None


@pytest.mark.parametrize("content", ["absent", None, "", " "])
def test_conversation_may_end_with_a_turn_that_only_calls(tmp_path, content):
    last = calling(call())
    if content == "absent":
        del last["content"]
    else:
        last["content"] = content
    example = read_one(tmp_path, {"messages": [U, last], "tools": [WEATHER]})
    assert example.messages[-1]["content"] == ""
    assert example.messages[-1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}


def test_parallel_calls_with_ids_are_answered_in_any_order(tmp_path):
    calls = calling(call(id="a"), call("get_time", "{}", id="b"))
    record = {"messages": [U, calls, result("12:00", tool_call_id="b"), result(tool_call_id="a"), A], "tools": [WEATHER, TIME]}
    messages = read_one(tmp_path, record).messages
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["a", "b"]
    assert messages[1]["tool_calls"][1]["function"]["arguments"] == {}
    assert messages[2] == {"role": "tool", "content": "12:00", "tool_call_id": "b", "name": "get_time"}
    assert messages[3] == {"role": "tool", "content": "sunny, 21", "tool_call_id": "a", "name": "get_weather"}


def test_parallel_calls_without_ids_leave_the_result_name_unguessed(tmp_path):
    record = {"messages": [U, calling(call(), call("get_time", "{}")), result(), result("12:00", name="get_time"), A]}
    messages = read_one(tmp_path, record).messages
    assert messages[2] == {"role": "tool", "content": "sunny, 21"}
    assert messages[3] == {"role": "tool", "content": "12:00", "name": "get_time"}


def test_tool_result_given_as_a_json_value_is_kept_as_json_text(tmp_path):
    record = {"messages": [U, calling(call()), result({"temp": 21, "sky": "klart"}), A]}
    assert read_one(tmp_path, record).messages[2]["content"] == '{"temp": 21, "sky": "klart"}'
    record = {"messages": [U, calling(call()), result(21), A]}
    assert read_one(tmp_path, record).messages[2]["content"] == "21"


def test_bare_tools_are_wrapped(tmp_path):
    bare = {"name": "get_weather", "description": "Weather in a city.", "parameters": WEATHER["function"]["parameters"]}
    record = {"messages": [U, A], "tools": [bare, {"name": "get_time"}]}
    assert read_one(tmp_path, record).tools == [WEATHER, {"type": "function", "function": {"name": "get_time"}}]


def test_tools_as_a_json_string_as_llama_factory_writes_them(tmp_path):
    record = {"messages": [U, A], "tools": json.dumps([WEATHER["function"]])}
    assert read_one(tmp_path, record).tools == [WEATHER]
    # "" and "[]" are how such data says a record has no tools.
    assert read_one(tmp_path, {"messages": [U, A], "tools": ""}).tools is None
    assert read_one(tmp_path, {"messages": [U, A], "tools": "[]"}).tools is None


def test_tools_without_any_call_are_fine(tmp_path):
    hello = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    example = read_one(tmp_path, {"messages": hello, "tools": [WEATHER]})
    assert example.tools == [WEATHER] and all("tool_calls" not in m for m in example.messages)


def test_train_and_weight_on_call_turns(tmp_path):
    first = calling(call()) | {"weight": 0}
    record = {"messages": [U, first, result(), {**A, "train": True}]}
    messages = read_one(tmp_path, record).messages
    assert messages[1]["train"] is False and "train" not in messages[3]
    last = calling(call()) | {"train": False}
    with pytest.raises(LiandanError, match=r"field 'messages\[1\]\.train': expected at least one assistant turn to train on"):
        read_one(tmp_path, {"messages": [U, last]})


def test_sharegpt_function_call_and_observation(tmp_path):
    record = {
        "conversations": [
            {"from": "human", "value": "Weather in Oslo?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "gpt", "value": "Sunny, 21 degrees."},
        ],
        "system": "You can call tools.",
        "tools": json.dumps([WEATHER["function"]]),
    }
    example = read_one(tmp_path, record)
    assert example.messages == [
        {"role": "system", "content": "You can call tools."},
        U,
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
        ]},
        {"role": "tool", "content": '{"temp": 21}', "name": "get_weather"},
        A,
    ]  # fmt: skip
    assert example.tools == [WEATHER]


def test_sharegpt_parallel_function_calls(tmp_path):
    calls = [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}, {"name": "get_time", "arguments": {}}]
    record = {"conversations": [
        {"from": "human", "value": "Weather and time?"},
        {"from": "function_call", "value": json.dumps(calls)},
        {"from": "observation", "value": "sunny; 12:00"},
        {"from": "gpt", "value": "Sunny, and it is noon."},
    ]}  # fmt: skip
    messages = read_one(tmp_path, record).messages
    assert messages[1]["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        {"type": "function", "function": {"name": "get_time", "arguments": {}}},
    ]
    assert messages[2] == {"role": "tool", "content": "sunny; 12:00"}  # two calls: the name is not guessed


def test_calls_written_as_text_are_read_as_before(tmp_path):
    # Hermes-style data writes the call in the assistant's text; its tool turns are not matched to calls.
    hermes = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    record = {"messages": [U, {"role": "assistant", "content": hermes}, result(name="get_weather"), A], "tools": [WEATHER]}
    assert read_one(tmp_path, record).messages[2] == {"role": "tool", "content": "sunny, 21", "name": "get_weather"}


def test_csv_and_parquet_columns(tmp_path):
    # CSV: list cells are JSON, and an empty tools cell means none.
    messages = [U, calling(call(id="c1")), result(tool_call_id="c1"), A]
    path = tmp_path / "d.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["messages", "tools"], [json.dumps(messages), json.dumps([WEATHER])], [json.dumps([U, A]), ""]])
    examples = read_examples(path).examples
    assert examples[0].tools == [WEATHER] and examples[0].messages[2]["name"] == "get_weather"
    assert examples[1].tools is None
    # Parquet fills the keys one message has and another lacks with nulls; they read as absent.
    path = tmp_path / "d.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{"messages": messages}]), path)
    read = read_examples(path).examples[0].messages
    assert read[0] == U and read[3] == A
    assert read[1]["tool_calls"] == [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}, "id": "c1"}]
    assert read[1]["content"] == ""
    assert read[2] == {"role": "tool", "content": "sunny, 21", "tool_call_id": "c1", "name": "get_weather"}


GOOD = {"messages": [U, A]}
FC = {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'}
H, G = {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}
CALL_FIELD = "messages[1].tool_calls[0]"


@pytest.mark.parametrize(
    "bad, expected",
    [
        ({"messages": [U, {"role": "assistant", "tool_calls": "get_weather"}]},
         "field 'messages[1].tool_calls': expected a non-empty list of calls; got 'get_weather'"),
        ({"messages": [U, calling()]}, "field 'messages[1].tool_calls': expected a non-empty list of calls; got a list"),
        ({"messages": [U, calling("get_weather")]},
         f"field '{CALL_FIELD}': expected a call object with 'function' (or a bare one with 'name'); got 'get_weather'"),
        ({"messages": [U, calling({"type": "custom", "function": {"name": "f", "arguments": "{}"}})]},
         f"field '{CALL_FIELD}.type': expected 'function'; got 'custom'"),
        ({"messages": [U, calling({"type": "function", "function": {"arguments": "{}"}})]},
         f"field '{CALL_FIELD}.function.name': expected a non-empty string; got nothing (the field is missing)"),
        ({"messages": [U, calling({"type": "function", "function": "get_weather"})]},
         f"field '{CALL_FIELD}.function': expected an object with 'name'; got 'get_weather'"),
        ({"messages": [U, calling(call(arguments='{city: "Oslo"}'))]},
         (f"field '{CALL_FIELD}.function.arguments': expected a JSON object or a JSON string of one; got '{{city: \"Oslo\"}}': "
          "not valid JSON: Expecting property name enclosed in double quotes (line 1 column 2)")),
        ({"messages": [U, calling(call(arguments='["Oslo"]'))]},
         f"field '{CALL_FIELD}.function.arguments': expected a JSON object or a JSON string of one; got '[\"Oslo\"]', which holds a list"),
        ({"messages": [U, calling(call(arguments=["Oslo"]))]},
         f"field '{CALL_FIELD}.function.arguments': expected a JSON object or a JSON string of one; got a list"),
        ({"messages": [U, calling({"type": "function", "function": {"name": "get_weather"}})]},
         f"field '{CALL_FIELD}.function.arguments': expected a JSON object or a JSON string of one; got nothing (the field is missing)"),
        ({"messages": [U, calling(call(), content=["part"])]},
         "field 'messages[1].content': expected a string or null beside tool_calls; got a list"),
        ({"messages": [U, calling(call(id="a"), call(id="a"))]},
         "field 'messages[1].tool_calls[1].id': expected each call's id once; got 'a' again"),
        ({"messages": [U, calling(call("search")), result(), A], "tools": [WEATHER, TIME]},
         f"field '{CALL_FIELD}.function.name': expected one of the record's tools: get_weather, get_time; got 'search'"),
        ({"messages": [U, calling(call()), result(), U, result(), A]},
         ("field 'messages[4].role': expected a tool result to follow a turn of tool calls (with only tool results in between); "
          "got 'tool' after 'user'")),
        ({"messages": [result(tool_call_id="a"), U, A]},
         ("field 'messages[0].role': expected a tool result to follow a turn of tool calls (with only tool results in between); "
          "got 'tool' at the start")),
        ({"messages": [U, {"role": "assistant", "content": "Looking."}, result(tool_call_id="a"), A]},
         ("field 'messages[2].role': expected a tool result to follow a turn of tool calls (with only tool results in between); "
          "got 'tool' after 'assistant'")),
        ({"messages": [U, calling(call(id="a"), call("get_time", "{}", id="b")), result(tool_call_id="c"), A]},
         "field 'messages[2].tool_call_id': expected the id of a call in messages[1] (a, b); got 'c'"),
        ({"messages": [U, calling(call()), result(tool_call_id="a"), A]},
         "field 'messages[2].tool_call_id': expected the id of a call in messages[1] (none, its calls have no 'id'); got 'a'"),
        ({"messages": [U, calling(call(id="a"), call(id="b")), result(tool_call_id="a"), result(tool_call_id="a"), A]},
         "field 'messages[3].tool_call_id': expected each call answered once; got 'a' again"),
        ({"messages": [U, calling(call()), result(), result(), A]},
         "field 'messages[3].role': expected at most 1 tool result, one per call in messages[1]; got 2"),
        ({"messages": [U, calling(call(), call()), result(), result(), result(), A]},
         "field 'messages[4].role': expected at most 2 tool results, one per call in messages[1]; got 3"),
        ({"messages": [U, calling(call(id="a")), result(tool_call_id="a", name="get_time"), A]},
         "field 'messages[2].name': expected 'get_weather', the name of call 'a'; got 'get_time'"),
        ({"messages": [U, calling(call()), result(name="get_time"), A]},
         "field 'messages[2].name': expected 'get_weather', the name of the call in messages[1]; got 'get_time'"),
        ({"messages": [U, calling(call(), call("get_time", "{}")), result(name="search"), A]},
         "field 'messages[2].name': expected one of the functions called in messages[1]: get_weather, get_time; got 'search'"),
        ({"messages": [U, calling(call()), result(None), A]},
         "field 'messages[2].content': expected a non-empty string or a JSON value; got null"),
        ({"messages": [U, calling(call()), result([{"type": "text", "text": "sunny"}]), A]},
         "field 'messages[2].content': expected the result as a string; got a list of content parts (join their text into one string)"),
        ({"messages": [U, calling(call()), result(tool_call_id=7), A]},
         "field 'messages[2].tool_call_id': expected a non-empty string; got 7"),
        ({"messages": [U, calling(call()), result()]},
         "field 'messages[2].role': expected the conversation to end with an assistant turn; got 'tool'"),
        ({"messages": [U, A], "tools": {"name": "get_weather"}},
         "field 'tools': expected a list of tools or a JSON string of one; got an object"),
        ({"messages": [U, A], "tools": '[{"name": "get_weather"'},
         ("field 'tools': expected a list of tools or a JSON string of one; got '[{\"name\": \"get_weather\"': "
          "not valid JSON: Expecting ',' delimiter (line 1 column 24)")),
        ({"messages": [U, A], "tools": '{"name": "get_weather"}'},
         "field 'tools': expected a list of tools or a JSON string of one; got '{\"name\": \"get_weather\"}', which holds an object"),
        ({"messages": [U, A], "tools": ["get_weather"]},
         "field 'tools[0]': expected a tool object with 'function' (or a bare one with 'name'); got 'get_weather'"),
        ({"messages": [U, A], "tools": [{"type": "function", "function": {"description": "d"}}]},
         "field 'tools[0].function.name': expected a non-empty string; got nothing (the field is missing)"),
        ({"messages": [U, A], "tools": [WEATHER, {"description": "d"}]},
         "field 'tools[1].name': expected a non-empty string; got nothing (the field is missing)"),
        ({"messages": [U, A], "tools": [{"name": "f", "parameters": "{}"}]},
         "field 'tools[0].parameters': expected a JSON Schema object; got '{}'"),
        ({"messages": [U, A], "tools": [{"name": "f", "description": ["d"]}]},
         "field 'tools[0].description': expected a string; got a list"),
        ({"messages": [U, A], "tools": [WEATHER, {"name": "get_weather"}]},
         "field 'tools[1].name': expected each tool once; got 'get_weather' again (also tools[0])"),
        ({"messages": [U, A], "tools": [{"type": "retrieval", "function": {"name": "f"}}]},
         "field 'tools[0].type': expected 'function'; got 'retrieval'"),
        ({"conversations": [H, {"from": "function_call", "value": "get_weather(city='Oslo')"}]},
         ("field 'conversations[1].value': expected a call object with 'name' and 'arguments' or a list of them, as JSON; "
          "got \"get_weather(city='Oslo')\": not valid JSON: Expecting value (line 1 column 1)")),
        ({"conversations": [H, {"from": "function_call", "value": "[]"}]},
         "field 'conversations[1].value': expected a call object with 'name' and 'arguments' or a list of them, as JSON; got '[]'"),
        ({"conversations": [H, {"from": "function_call", "value": '[{"name": "f", "arguments": {}}, {"name": "g"}]'}]},
         "field 'conversations[1].value[1].arguments': expected a JSON object or a JSON string of one; got nothing (the field is missing)"),
        ({"conversations": [H, FC, {"from": "observation", "value": "sunny"}, {"from": "observation", "value": "again"}, G]},
         "field 'conversations[3].from': expected at most 1 tool result, one per call in conversations[1]; got 2"),
        ({"conversations": [H, FC, {"from": "observation", "value": "sunny"}, G, {"from": "observation", "value": "x"}, G]},
         ("field 'conversations[4].from': expected a tool result to follow a turn of tool calls (with only tool results in between); "
          "got 'observation' after 'gpt'")),
        ({"conversations": [H, FC, G], "tools": '[{"name": "get_time"}]'},
         "field 'conversations[1].value.name': expected one of the record's tools: get_time; got 'get_weather'"),
        ({"conversations": [H, {"from": "function", "value": "x"}]},
         ("field 'conversations[1].from': expected one of system, human, user, gpt, assistant, tool; got 'function' "
          "(or function_call and observation, for tool calls and their results)")),
    ],
)  # fmt: skip
def test_bad_tool_record_names_file_line_and_field(tmp_path, bad, expected):
    path = tmp_path / "bad.jsonl"
    # A good record, a blank line, then the bad one: the error must point at line 3.
    good = {"conversations": [H, G]} if "conversations" in bad else GOOD
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(LiandanError) as info:
        read_examples(path)
    assert str(info.value) == f"{path}:3: {expected}"


def test_bad_tool_records_are_skippable_and_counted(tmp_path):
    bad = {"messages": [U, calling(call(arguments="[1]")), result(), A]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, bad, bad])
    result_ = read_examples(path, skip_invalid=True)
    assert len(result_.examples) == 1
    assert summarize_skipped(result_.skipped) == (
        "skipped 2 records: field 'messages[].tool_calls[].function.arguments': expected a JSON object or a JSON string of one (2)"
    )
