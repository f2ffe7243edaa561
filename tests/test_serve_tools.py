"""Tool calling through liandan serve (issue 20, part 3), spoken to with the official OpenAI client:
``tools`` and ``tool_choice`` rendered by the model's template, the model's calls read back into
``tool_calls`` (plain and streamed), and the ``tool`` results of the next request rendered.

A random model writes no calls by itself, so most tests script what the model writes: its
``generate`` is replaced by one that feeds a given reply, token by token, through the server's own
stopping criteria (the worker, the detokenizer, stop handling and streaming all run as they do).
The prompts it was given are kept, so the tests see what the template rendered.
"""

from __future__ import annotations

import json

import openai
import pytest
import torch
from openai import OpenAI

from conftest import CHATML, build_model_dir
from liandan.chat import encode_generation_prompt
from liandan.errors import LiandanError
from liandan.models import load_model
from liandan.openai_api import ChatRequest, TokenLogprob
from liandan.serve import create_app, serve
from liandan.serve_tools import CallReader, CallStream
from liandan.tools import CallFormat, call_format, tools_problem, with_tools_template
from test_serve import running

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "Weather in Oslo?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
BAD_NAME = {"type": "function", "function": {"name": "get weather"}}
NO_NAME = {"type": "function", "function": {"description": "x"}}
CALLED = {"role": "assistant", "content": None,
          "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}  # fmt: skip


@pytest.fixture(scope="module")
def tools_model_dir(tmp_path_factory):
    """The tiny ChatML model as a run trained with ``tools_template: chatml`` saves it: liandan's
    ChatML tools template in its tokenizer. 1024 positions, as the tool definitions are long in a
    400-token vocabulary."""
    path = build_model_dir(tmp_path_factory.mktemp("tools-model"), CHATML, "<|im_end|>")
    _, tokenizer = load_model(str(path), device="cpu", dtype="float32")
    assert with_tools_template(tokenizer, "chatml") is not None
    tokenizer.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    return path


@pytest.fixture(scope="module")
def tooled(tools_model_dir):
    model, tokenizer = load_model(str(tools_model_dir), device="cpu", dtype="float32")
    with running(create_app(model, tokenizer, model_name="tooled")) as url:
        yield OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60), model, tokenizer


@pytest.fixture(scope="module")
def plain(chat_model_dir):
    """The tiny chat model with its plain ChatML template, which renders no tools."""
    model, tokenizer = load_model(str(chat_model_dir), device="cpu", dtype="float32")
    with running(create_app(model, tokenizer, model_name="plain")) as url:
        yield OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


def script(monkeypatch, model, tokenizer, *replies: str) -> list[str]:
    """Make ``model.generate`` write ``replies`` (one per request, then the stop token), token by
    token through the server's stopping criteria. Returns the prompts it is given, as text."""
    prompts, waiting = [], list(replies)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def generate(input_ids, stopping_criteria, max_new_tokens, **options):
        prompts.append(tokenizer.decode(input_ids[0]))
        ids = tokenizer(waiting.pop(0), add_special_tokens=False)["input_ids"] + [stop]
        sequences = input_ids
        for token in ids[:max_new_tokens]:
            sequences = torch.cat([sequences, torch.full_like(sequences[:, :1], token)], dim=1)  # (n, T + 1)
            if all(criterion(sequences, None).all() for criterion in stopping_criteria):
                break
        return sequences

    monkeypatch.setattr(model, "generate", generate)
    return prompts


def ask(client, messages=ASK, **options):
    return client.chat.completions.create(model="tooled", messages=messages, temperature=0, **options)


def streamed(client, messages=ASK, **options) -> tuple[list[str], dict[int, dict], list[str]]:
    """A streamed chat: its content deltas, its tool calls put together from their deltas by index,
    and its finish reasons."""
    contents, calls, reasons = [], {}, []
    for chunk in ask(client, messages, stream=True, **options):
        for choice in chunk.choices:
            if choice.delta.content:
                contents.append(choice.delta.content)
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    return contents, calls, reasons


# ---------------------------------------------------------------------------------------------
# Calls read back


def test_a_call_comes_back_as_tool_calls_with_the_text_before_it(tooled, monkeypatch):
    client, model, tokenizer = tooled
    prompts = script(monkeypatch, model, tokenizer, "Let me check.\n" + CALL)
    reply = ask(client, tools=[WEATHER, TIME])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) > len("call_")
    assert call.function.name == "get_weather"
    assert isinstance(call.function.arguments, str) and json.loads(call.function.arguments) == {"city": "Oslo"}
    # The tools were offered in the prompt, as the template writes them.
    assert "# Tools" in prompts[0] and json.dumps(WEATHER) in prompts[0] and json.dumps(TIME) in prompts[0]
    assert prompts[0].endswith("<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n")


def test_a_reply_that_only_calls_has_null_content_and_parallel_calls_are_kept_unless_refused(tooled, monkeypatch):
    client, model, tokenizer = tooled
    two = CALL + '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    script(monkeypatch, model, tokenizer, two, two)
    message = ask(client, tools=[WEATHER, TIME]).choices[0].message
    assert message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {})]  # fmt: skip
    assert len({c.id for c in message.tool_calls}) == 2
    message = ask(client, tools=[WEATHER, TIME], parallel_tool_calls=False).choices[0].message
    assert [c.function.name for c in message.tool_calls] == ["get_weather"]


def test_a_call_that_cannot_be_read_is_returned_as_text(tooled, monkeypatch):
    client, model, tokenizer = tooled
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
    script(monkeypatch, model, tokenizer, broken, CALL)
    choice = ask(client, tools=[WEATHER]).choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (broken, None, "stop")
    choice = ask(client, tools=[WEATHER], max_tokens=12).choices[0]  # cut by max_tokens inside the call
    assert CALL.startswith(choice.message.content) and choice.message.content != CALL
    assert (choice.message.tool_calls, choice.finish_reason) == (None, "length")


def test_without_tools_a_call_shaped_reply_stays_text(tooled, monkeypatch):
    """No ``tools`` (or ``tool_choice: "none"``): nothing is offered and nothing is read as a call."""
    client, model, tokenizer = tooled
    prompts = script(monkeypatch, model, tokenizer, CALL, CALL)
    for options in ({}, {"tools": [WEATHER], "tool_choice": "none"}):
        choice = ask(client, **options).choices[0]
        assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (CALL, None, "stop")
    for prompt in prompts:
        assert "# Tools" not in prompt and "get_weather" not in prompt


# ---------------------------------------------------------------------------------------------
# Streaming


def test_a_streamed_call_comes_as_tool_call_deltas(tooled, monkeypatch):
    client, model, tokenizer = tooled
    script(monkeypatch, model, tokenizer, "Let me check.\n" + CALL, "Let me check.\n" + CALL)
    contents, calls, reasons = streamed(client, tools=[WEATHER])
    assert "".join(contents) == "Let me check." and len(contents) > 1  # streamed as it came, the call held back
    assert reasons == ["tool_calls"]
    (call,) = calls.values()
    assert call["id"].startswith("call_") and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Oslo"}
    # The same as unstreamed, and the client's own stream helper puts it together too.
    with client.chat.completions.stream(model="tooled", messages=ASK, tools=[WEATHER], temperature=0) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and final.message.content == "Let me check."
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == [("get_weather", call["arguments"])]


@pytest.mark.parametrize("text", ["Use a <b> tag.", "Use a <tool", "Fine.\n\n", "{not a call}"])
def test_streamed_text_held_back_as_a_possible_call_is_sent_when_it_is_none(tooled, monkeypatch, text):
    client, model, tokenizer = tooled
    script(monkeypatch, model, tokenizer, text, text)
    contents, calls, reasons = streamed(client, tools=[WEATHER])
    assert ("".join(contents), calls, reasons) == (text, {}, ["stop"])
    assert ask(client, tools=[WEATHER]).choices[0].message.content == text


def test_streamed_log_probabilities_with_tools_cover_the_text_held_back(tooled):
    """Unscripted, so the worker scores each token: the streamed chunks' tokens join to the
    streamed content, which is the unstreamed reply (the random model writes no call)."""
    client = tooled[0]
    options = {"tools": [WEATHER], "max_tokens": 12, "logprobs": True, "top_logprobs": 2}
    whole = ask(client, **options).choices[0]
    assert whole.message.tool_calls is None and whole.finish_reason == "length"
    text, tokens = "", []
    for chunk in ask(client, stream=True, **options):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            tokens += choice.logprobs.content if choice.logprobs else []
    assert text == whole.message.content == "".join(t.token for t in tokens)
    assert [t.logprob for t in tokens] == pytest.approx([t.logprob for t in whole.logprobs.content])


# ---------------------------------------------------------------------------------------------
# tool_choice: forcing a call


def test_required_and_named_tool_choice_put_the_start_of_a_call_after_the_prompt(tooled, monkeypatch):
    client, model, tokenizer = tooled
    rest = '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    prompts = script(monkeypatch, model, tokenizer, rest, "{}}\n</tool_call>", "{}}\n</tool_call>")
    message = ask(client, tools=[WEATHER, TIME], tool_choice="required").choices[0].message
    assert prompts[-1].endswith("<|im_start|>assistant\n<tool_call>\n")
    assert message.content is None and message.tool_calls[0].function.name == "get_weather"
    named = {"type": "function", "function": {"name": "get_time"}}
    choice = ask(client, tools=[WEATHER, TIME], tool_choice=named).choices[0]
    assert prompts[-1].endswith('<|im_start|>assistant\n<tool_call>\n{"name": "get_time", "arguments": ')
    assert (choice.finish_reason, choice.message.tool_calls[0].function.name) == ("tool_calls", "get_time")
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {}
    contents, calls, reasons = streamed(client, tools=[WEATHER, TIME], tool_choice=named)
    assert (contents, [c["name"] for c in calls.values()], reasons) == ([], ["get_time"], ["tool_calls"])


def test_a_forced_call_with_the_real_model_is_in_its_prompt_and_its_text(tooled):
    """Unscripted: the random model continues after the forced text; what it writes is no call."""
    client, _, tokenizer = tooled
    reply = ask(client, tools=[WEATHER], tool_choice="required", max_tokens=3)
    prompt = encode_generation_prompt(tokenizer, ASK, tools=[WEATHER])
    forced = tokenizer("<tool_call>\n", add_special_tokens=False)["input_ids"]
    assert reply.usage.prompt_tokens == len(prompt) + len(forced) and reply.usage.completion_tokens == 3
    choice = reply.choices[0]
    assert choice.message.content.startswith("<tool_call>\n") and choice.finish_reason == "length"


# ---------------------------------------------------------------------------------------------
# The round trip: call, result, answer


def test_round_trip_call_result_answer(tooled, monkeypatch):
    client, model, tokenizer = tooled
    prompts = script(monkeypatch, model, tokenizer, CALL, "It is sunny in Oslo.")
    first = ask(client, tools=[WEATHER]).choices[0].message
    call = first.tool_calls[0]
    messages = [*ASK, first, {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21"}]  # the client's own message object
    final = ask(client, messages, tools=[WEATHER]).choices[0]
    assert (final.message.content, final.message.tool_calls, final.finish_reason) == ("It is sunny in Oslo.", None, "stop")
    # The call went back in as the template writes calls (arguments as an object), then the result.
    assert prompts[1].endswith(
        "<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n" + CALL + "<|im_end|>\n"
        "<|im_start|>tool\nsunny, 21<|im_end|>\n<|im_start|>assistant\n"
    )


def test_the_conversation_goes_to_the_template_with_object_arguments_and_result_names():
    request = ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "developer", "content": "Be brief."}, *ASK, CALLED,
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]}]})  # fmt: skip
    assert request.conversation() == [
        {"role": "system", "content": "Be brief."}, *ASK,
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1", "name": "get_weather"},
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Refusals


def refused(client, **options) -> openai.BadRequestError:
    deprecated = {name: options.pop(name) for name in ("functions", "function_call") if name in options}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{"model": "tooled", "messages": ASK, **options}, extra_body=deprecated)
    assert caught.value.status_code == 400 and caught.value.type == "invalid_request_error"
    return caught.value


@pytest.mark.parametrize(
    ("options", "param", "says"),
    [({"tools": [NO_NAME]}, "tools", "'tools.0.function.name': Field required"),
     ({"tools": [{"type": "retrieval"}]}, "tools", "'tools.0.type'"),
     ({"tools": [BAD_NAME]}, "tools", "'tools.0.function.name': String should match pattern"),
     ({"tools": [WEATHER, WEATHER]}, "tools", "'get_weather' is defined twice"),
     ({"tools": [{"type": "function", "function": {"name": "f", "strict": True}}]}, "tools", "does not constrain"),
     ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice",
      "function 'get_time' is not among 'tools' (get_weather)"),
     ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
     ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice", "'tool_choice'"),
     ({"functions": [WEATHER["function"]]}, "functions", "send 'tools' instead"),
     ({"function_call": {"name": "get_weather"}}, "function_call", "send 'tool_choice' instead"),
     ({"messages": [*ASK, {"role": "tool", "content": "sunny"}]}, "messages", "needs 'tool_call_id'"),
     ({"messages": [*ASK, CALLED, {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}]}, "messages",
      "'messages.2.tool_call_id': 'call_2' answers no call"),
     ({"messages": [*ASK, {**CALLED, "tool_calls": [{**CALLED["tool_calls"][0], "function": {"name": "get_weather",
       "arguments": "{city: Oslo}"}}]}]}, "messages", "'messages.1.tool_calls.0.function.arguments': expected a JSON object"),
     ({"messages": [{**ASK[0], "tool_calls": CALLED["tool_calls"]}]}, "messages", "belong to assistant messages")],
)  # fmt: skip
def test_bad_tool_requests_are_400_naming_the_field(tooled, options, param, says):
    error = refused(tooled[0], **options)
    assert error.param == param and says in error.message


def test_tools_on_completions_are_refused(tooled):
    with pytest.raises(openai.BadRequestError) as caught:
        tooled[0].completions.create(model="tooled", prompt="Hi", extra_body={"tools": [WEATHER]})
    assert caught.value.param == "tools" and caught.value.code == "unsupported_parameter"


def test_a_model_whose_template_renders_no_tools_is_400_with_the_reason_and_the_fix(plain):
    for options, param in (({"tools": [WEATHER]}, "tools"),
                           ({"messages": [*ASK, CALLED, {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]}, "messages")):  # fmt: skip
        error = refused(plain, **{"model": "plain", **options})
        assert error.param == param and error.code == "tools_unsupported"
        assert "leaves out the tool definitions and the assistant's call" in error.message
        assert "--tools-template chatml" in error.message
    # Tools not offered: the plain template answers as before.
    assert plain.chat.completions.create(model="plain", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=1)


# ---------------------------------------------------------------------------------------------
# --tools-template


def test_serve_with_a_tools_template_serves_tools_and_says_so(chat_model_dir, monkeypatch, capsys):
    started = []

    class Captured:
        def __init__(self, app, **config):
            started.append(app)

        def run(self):
            pass

    monkeypatch.setattr("liandan.serve.uvicorn_server", Captured)
    serve(str(chat_model_dir), device="cpu", tools_template="chatml")
    tokenizer = started[0].state.server.tokenizer
    assert tools_problem(tokenizer) is None and call_format(tokenizer).prefix == "<tool_call>\n"
    assert "now uses liandan's ChatML tools template" in capsys.readouterr().out
    with pytest.raises(LiandanError, match="--tools-template 'xml': expected chatml or a .jinja file"):
        serve("no/such/model", tools_template="xml")  # checked before the model is looked for


# ---------------------------------------------------------------------------------------------
# The streaming hold-back, piece by piece

HERMES = CallFormat(prefix="<tool_call>\n", separator="\n</tool_call>\n<tool_call>\n", suffix="\n</tool_call>", name_path=("name",),
                    arguments_path=("arguments",), arguments_as_string=False, opening='{"name": \x00, "arguments": ')  # fmt: skip
BARE = CallFormat(prefix="", separator=None, suffix="", name_path=("name",), arguments_path=("parameters",),
                  arguments_as_string=False, opening='{"name": \x00, "parameters": ')  # fmt: skip


def feed(stream: CallStream, pieces: list[str]) -> list[str]:
    return [stream.feed(piece, None)[0] for piece in pieces]


def test_content_goes_out_until_a_call_may_begin():
    stream = CallStream(CallReader(HERMES), 0)
    pieces = ["Hi", " there", " <", "b>", "\n", "<tool", "_call>\n", '{"name": "f", "arguments": {}}', "\n</tool_call>"]
    assert feed(stream, pieces) == ["Hi", " there", "", " <b>", "", "", "", "", ""]
    chunks = stream.finish("stop")
    assert [c["choices"][0]["delta"] for c in chunks[:-1]] == [
        {"tool_calls": [{"index": 0, "id": chunks[0]["choices"][0]["delta"]["tool_calls"][0]["id"], "type": "function",
                         "function": {"name": "f", "arguments": "{}"}}]}]  # fmt: skip
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_bare_json_format_holds_a_reply_that_begins_with_a_brace():
    assert feed(CallStream(CallReader(BARE), 0), [" ", "Hello", " {x}"]) == ["", " Hello", " {x}"]
    stream = CallStream(CallReader(BARE), 0)
    assert feed(stream, ["\n", '{"name": "f", ', '"parameters": {"a": 1}}']) == ["", "", ""]
    chunks = stream.finish("stop")
    assert chunks[0]["choices"][0]["delta"]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    # "required" with no prefix to force: the call object is begun instead.
    assert CallReader.for_request(BARE, "", None).forced == '{"name": '
    assert CallReader.for_request(BARE, "f", False) == CallReader(BARE, '{"name": "f", "parameters": ', parallel=False)


def test_held_tokens_go_out_with_the_text_they_wrote():
    stream = CallStream(CallReader(HERMES), 0)
    text, tokens = stream.feed("Hi <", [TokenLogprob("Hi", -0.5, []), TokenLogprob(" <", -1.0, [])])
    assert (text, [t.token for t in tokens]) == ("Hi", ["Hi"])
    text, tokens = stream.feed("i>", [TokenLogprob("i>", -2.0, [])])
    assert (text, [t.token for t in tokens]) == (" <i>", [" <", "i>"])
