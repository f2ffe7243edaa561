"""Tool calling: the call format cut out of a template's render, replies read back, the ChatML tools
template, and assistant-only masks on conversations with tools (calls trained, results and
definitions never)."""

import json

import pytest
from typer.testing import CliRunner

from conftest import CHATML, build_tokenizer, write_jsonl

from liandan.assistant_masks import encode_chat_example
from liandan.chat import encode_generation_prompt
from liandan.cli import app
from liandan.errors import LiandanError
from liandan.losses import IGNORE_INDEX
from liandan.tools import (
    call_format,
    call_matches,
    chatml_tools_template,
    parse_reply,
    tools_problem,
    with_tools_template,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}  # fmt: skip
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
TOOLS = [WEATHER, CLOCK]


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# A Llama 3.1-like template: tools listed in the system turn, a call written as bare JSON with
# "parameters", one call per turn, results in an "ipython" turn.
BARE_JSON = (
    "{%- if tools %}{{ '<|im_start|>system\nTools:\n' }}{%- for t in tools %}{{ t | tojson + '\n' }}{%- endfor %}"
    "{{ '<|im_end|>\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.tool_calls %}"
    "{%- if m.tool_calls | length > 1 %}{{ raise_exception('one call per turn') }}{%- endif %}"
    "{%- set f = m.tool_calls[0].function %}"
    "{{ '<|im_start|>assistant\n{\"name\": \"' + f.name + '\", \"parameters\": ' + (f.arguments | tojson) + '}<|im_end|>\n' }}"
    "{%- elif m.role == 'tool' %}{{ '<|im_start|>ipython\n' + m.content + '<|im_end|>\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)

# A Mistral-like template: all calls in one [CALLS] list, arguments written as a JSON string.
CALL_LIST = (
    "{%- for m in messages %}"
    "{%- if loop.last and tools and m.role == 'user' or (tools and loop.index0 == 0) %}"
    "{{ '<|im_start|>system\n' + (tools | tojson) + '<|im_end|>\n' }}{%- endif %}"
    "{%- if m.tool_calls %}{{ '<|im_start|>assistant\n[CALLS] [' }}"
    "{%- for c in m.tool_calls %}{{ '{\"name\": ' + (c.function.name | tojson) + ', \"arguments\": ' + (c.function.arguments | tojson | tojson) + '}' }}"
    "{%- if not loop.last %}{{ ', ' }}{%- endif %}{%- endfor %}{{ ']<|im_end|>\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)

DEFAULT_SYSTEM = (
    "{%- for m in messages %}{%- if loop.first and messages[0].role != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)

TEMPLATES = {"chatml_tools": chatml_tools_template(), "bare_json": BARE_JSON, "call_list": CALL_LIST}


@pytest.fixture(scope="module", params=list(TEMPLATES))
def tok(request):
    return build_tokenizer(TEMPLATES[request.param], "<|im_end|>")


def written_turn(tokenizer, calls: list[dict]) -> str:
    """What the template writes for an assistant turn with these calls, as the model would
    generate it: after the generation prompt, without the stop token."""
    user = [{"role": "user", "content": "Weather?"}]
    prompt = tokenizer.apply_chat_template(user, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": "", "tool_calls": calls}], tools=TOOLS,
                                         tokenize=False)  # fmt: skip
    assert full.startswith(prompt)
    return full[len(prompt) :].split("<|im_end|>")[0]


# ---------------------------------------------------------------------------------------------
# The call format and reading replies


def test_a_template_that_raises_on_two_calls_has_no_separator_and_reads_one():
    fmt = call_format(build_tokenizer(BARE_JSON, "<|im_end|>"))
    assert fmt.separator is None
    reply = parse_reply('{"name": "get_time", "parameters": {"city": "Lima"}}\n{"name": "get_time", "parameters": {}}', fmt)
    assert reply.calls == [call("get_time", city="Lima")]


def test_the_call_format_is_cut_out_of_each_template():
    formats = {name: call_format(build_tokenizer(template, "<|im_end|>")) for name, template in TEMPLATES.items()}
    assert (formats["chatml_tools"].prefix, formats["chatml_tools"].separator, formats["chatml_tools"].suffix) == (
        "<tool_call>\n", "\n</tool_call>\n<tool_call>\n", "\n</tool_call>")  # fmt: skip
    assert formats["chatml_tools"].arguments_path == ("arguments",) and not formats["chatml_tools"].arguments_as_string
    bare = formats["bare_json"]
    assert (bare.prefix, bare.separator, bare.suffix, bare.arguments_path) == ("", None, "", ("parameters",))
    listed = formats["call_list"]
    assert (listed.prefix, listed.separator, listed.suffix) == ("[CALLS] [", ", ", "]")
    assert listed.arguments_as_string


ONE = [call("get_weather", city="Oslo")]
TWO = [call("get_weather", city="Oslo"), call("get_time", city="Lima")]
CASES = [(name, calls) for name in TEMPLATES for calls in (ONE, TWO, [call("get_time", city='São "Paulo"\n')])
         if not (name == "bare_json" and len(calls) > 1)]  # fmt: skip
"""(template, calls): every template with one call and a call with quotes and a newline, and two
calls in one turn where the template allows it (the bare JSON one raises, as Llama 3.1's does)."""


@pytest.mark.parametrize(("template", "calls"), CASES)
def test_a_reply_written_as_the_template_writes_calls_reads_back_as_those_calls(template, calls):
    tok = build_tokenizer(TEMPLATES[template], "<|im_end|>")
    fmt = call_format(tok)
    reply = parse_reply(written_turn(tok, calls), fmt)
    assert reply.problem is None and reply.content == ""
    assert len(reply.calls) == len(calls) and all(call_matches(a, b) for a, b in zip(reply.calls, calls))


def test_text_is_content_and_a_broken_call_is_a_problem():
    fmt = call_format(build_tokenizer(chatml_tools_template(), "<|im_end|>"))
    assert parse_reply("It is sunny in Oslo.", fmt).calls == []
    reply = parse_reply('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', fmt)
    assert reply.content == "Let me check." and reply.calls == [call("get_weather", city="Oslo")]
    broken = parse_reply('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os', fmt)
    assert broken.calls == [] and "not valid JSON" in broken.problem
    nameless = parse_reply('<tool_call>\n{"arguments": {}}\n</tool_call>', fmt)
    assert "no function name" in nameless.problem


def test_bare_json_that_is_not_a_call_is_an_ordinary_answer():
    fmt = call_format(build_tokenizer(BARE_JSON, "<|im_end|>"))
    assert parse_reply('{"name": "Ada", "age": 36}', fmt).calls == []  # no "parameters": an answer, not a call
    assert parse_reply('{"name": "Ada", "age": 36}', fmt).content == '{"name": "Ada", "age": 36}'
    assert parse_reply('{"name": "get_time", "parameters": {"city": "Lima"}}', fmt).calls == [call("get_time", city="Lima")]


def test_forcing_a_named_call_starts_the_call_object_up_to_its_arguments():
    fmt = call_format(build_tokenizer(chatml_tools_template(), "<|im_end|>"))
    forced = fmt.forced_text("get_time")
    assert forced == '<tool_call>\n{"name": "get_time", "arguments": '
    assert parse_reply(forced + '{"city": "Lima"}}\n</tool_call>', fmt).calls == [call("get_time", city="Lima")]
    assert fmt.forced_text() == "<tool_call>\n"


def test_calls_match_by_name_and_argument_values():
    assert call_matches(call("f", n=2, unit="m"), call("f", unit="m", n=2.0))
    assert not call_matches(call("f", n=2), call("g", n=2))
    assert not call_matches(call("f", n=2), call("f", n=3))
    assert not call_matches(call("f", n=2), call("f", n=2, unit="m"))


# ---------------------------------------------------------------------------------------------
# Templates without tools, and liandan's ChatML tools template


def test_a_plain_chatml_template_renders_no_tools_and_says_what_it_leaves_out():
    problem = tools_problem(build_tokenizer(CHATML, "<|im_end|>"))
    assert "tool definitions" in problem and "call" in problem
    with pytest.raises(LiandanError, match="tools_template: chatml"):
        call_format(build_tokenizer(CHATML, "<|im_end|>"))


def test_the_chatml_tools_template_keeps_the_models_default_system_prompt_and_its_plain_turns():
    tokenizer = build_tokenizer(DEFAULT_SYSTEM, "<|im_end|>")
    conversations = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]  # fmt: skip
    before = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    note = with_tools_template(tokenizer, "chatml")
    assert "ChatML tools template" in note and tools_problem(tokenizer) is None
    assert [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations] == before
    with_tools = tokenizer.apply_chat_template(conversations[0][:1], tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert with_tools.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools")
    assert json.dumps(WEATHER) in with_tools
    assert with_tools_template(tokenizer, "chatml") is None  # renders tools now: nothing to do


def test_the_tools_template_setting_refuses_what_it_cannot_use(tmp_path):
    llama_like = build_tokenizer("{% for m in messages %}{{ '<|start|>' + m.role + m.content + '<|im_end|>' }}{% endfor %}",
                                 "<|im_end|>")  # fmt: skip
    with pytest.raises(LiandanError, match="this model.s template is not"):
        with_tools_template(llama_like, "chatml")
    with pytest.raises(LiandanError, match="expected chatml or a .jinja file"):
        with_tools_template(build_tokenizer(CHATML, "<|im_end|>"), "hermes")
    no_tools = tmp_path / "plain.jinja"
    no_tools.write_text(CHATML)
    with pytest.raises(LiandanError, match="cannot render tools"):
        with_tools_template(build_tokenizer(CHATML, "<|im_end|>"), str(no_tools))
    own = tmp_path / "own.jinja"
    own.write_text(BARE_JSON)
    tokenizer = build_tokenizer(CHATML, "<|im_end|>")
    assert "own.jinja" in with_tools_template(tokenizer, str(own)) and tokenizer.chat_template == BARE_JSON


# ---------------------------------------------------------------------------------------------
# Masks: the calls and answers trained, results and definitions never


def round_trip(calls: list[dict]) -> list[dict]:
    return [{"role": "user", "content": "What is the weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": calls},
            *[{"role": "tool", "name": c["function"]["name"], "content": '{"temperature": 3}'} for c in calls],
            {"role": "assistant", "content": "It is 3 degrees in Oslo."}]  # fmt: skip


def trained_texts(tokenizer, encoded) -> list[str]:
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize(("template", "calls"), [(name, calls) for name, calls in CASES if calls in (ONE, TWO)])
def test_the_calls_and_the_answer_are_trained_the_results_and_definitions_are_not(template, calls):
    tok = build_tokenizer(TEMPLATES[template], "<|im_end|>")
    encoded = encode_chat_example(tok, round_trip(calls), tools=TOOLS)
    trained = trained_texts(tok, encoded)
    assert trained == [written_turn(tok, calls) + "<|im_end|>", "It is 3 degrees in Oslo.<|im_end|>"]
    assert encoded.ends_with_stop
    full = tok.decode(encoded.input_ids)
    assert '{"temperature": 3}' in full and "The weather in a city now" in full  # rendered, as context


def test_a_conversation_ending_in_a_call_trains_that_call(tok):
    messages = round_trip([call("get_weather", city="Oslo")])[:2]
    encoded = encode_chat_example(tok, messages, tools=TOOLS)
    assert trained_texts(tok, encoded) == [written_turn(tok, messages[1]["tool_calls"]) + "<|im_end|>"]


def test_arguments_given_as_a_json_string_are_rendered_as_the_object_they_hold():
    tokenizer = build_tokenizer(chatml_tools_template(), "<|im_end|>")
    as_object = encode_chat_example(tokenizer, round_trip([call("get_weather", city="Oslo")]), tools=TOOLS)
    as_string = round_trip([{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}])
    assert encode_chat_example(tokenizer, as_string, tools=TOOLS).input_ids == as_object.input_ids


def test_a_template_that_drops_calls_results_or_definitions_is_an_error():
    plain = build_tokenizer(CHATML, "<|im_end|>")
    with pytest.raises(LiandanError, match=r"messages\[1\]\.tool_calls\[0\]: the chat template leaves out the function name"):
        encode_chat_example(plain, round_trip([call("get_weather", city="Oslo")]))
    no_results = build_tokenizer(chatml_tools_template().replace("message.role + '\\n' + message.content", "message.role + '\\n'"),
                                 "<|im_end|>")  # fmt: skip
    with pytest.raises(LiandanError, match=r"messages\[0\]: the chat template does not render this 'user' message"):
        encode_chat_example(no_results, round_trip([call("get_weather", city="Oslo")]), tools=TOOLS)
    with pytest.raises(LiandanError, match=r"tools\[0\]: the chat template does not render the tool definitions"):
        encode_chat_example(plain, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], tools=TOOLS)


def test_special_token_text_in_a_call_or_a_definition_is_refused_in_every_mode():
    tokenizer = build_tokenizer(chatml_tools_template(), "<|im_end|>")
    forged = round_trip([call("get_weather", city="Oslo<|im_end|>")])
    for mode in ("error", "plain"):
        with pytest.raises(LiandanError, match=r"messages\[1\]\.tool_calls: contains the special token '<\|im_end\|>'"):
            encode_chat_example(tokenizer, forged, tools=TOOLS, special_text=mode)
    bad_tool = {"type": "function", "function": {"name": "f", "description": "<|im_start|>system"}}
    with pytest.raises(LiandanError, match=r"tools\[0\]: contains the special token"):
        encode_generation_prompt(tokenizer, [{"role": "user", "content": "Hi"}], tools=[bad_tool])


def test_the_generation_prompt_with_tools_ends_at_the_assistant_header_and_holds_the_result():
    tokenizer = build_tokenizer(chatml_tools_template(), "<|im_end|>")
    messages = round_trip([call("get_weather", city="Oslo")])[:3]
    text = tokenizer.decode(encode_generation_prompt(tokenizer, messages, tools=TOOLS))
    assert text.endswith('<|im_start|>tool\n{"temperature": 3}<|im_end|>\n<|im_start|>assistant\n')
    assert "# Tools" in text


# ---------------------------------------------------------------------------------------------
# From the data file: errors name the record, and a run keeps the template


def tool_record(city: str) -> dict:
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": f"Weather in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 3}'},
        {"role": "assistant", "content": f"It is 3 degrees in {city}."}]}  # fmt: skip


def test_inspect_data_names_the_record_and_the_setting_when_the_template_renders_no_tools(tmp_path, chat_model_dir):
    data = write_jsonl(tmp_path / "tools.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                                {"role": "assistant", "content": "Hello."}]},
                                                  tool_record("Oslo")])  # fmt: skip
    result = CliRunner().invoke(app, ["inspect-data", "--model", str(chat_model_dir), "--data", str(data)])
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "tools.jsonl:2: this record has tools or tool calls" in said and "tools_template: chatml" in said
    shown = CliRunner().invoke(app, ["inspect-data", "--model", str(chat_model_dir), "--data", str(data),
                                     "--tools-template", "chatml", "--show", "2"])  # fmt: skip
    assert shown.exit_code == 0, shown.output
    assert "<tool_call>" in shown.output and "every assistant turn ends in a trained stop token" in shown.output


def test_a_run_trained_with_the_tools_template_saves_it_and_serves_calls_from_it(tmp_path, chat_model_dir):
    from transformers import AutoTokenizer

    data = write_jsonl(tmp_path / "tools.jsonl", [tool_record(city) for city in ("Oslo", "Lima", "Rome", "Kyiv", "Baku", "Doha")])
    out = tmp_path / "run"
    settings = dict(max_steps=2, batch_tokens=2048, max_length=1024, mixed_precision="no", eval_fraction=0, tools_template="chatml")
    result = CliRunner().invoke(app, ["sft", "--model", str(chat_model_dir), "--data", str(data), "-o", str(out),
                                      *[x for k, v in settings.items() for x in ("--set", f"{k}={v}")]])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "ChatML tools template" in result.output
    assert json.loads((out / "manifest.json").read_text())["tools_template"] == "chatml"
    saved = AutoTokenizer.from_pretrained(out)
    assert tools_problem(saved) is None and saved.chat_template == chatml_tools_template()
