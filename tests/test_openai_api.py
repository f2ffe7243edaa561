"""liandan.openai_api on its own, no server: request models, OpenAI-shaped errors and the streamed
chunks; with them, the API-key middleware and the Host, Origin and body-size guard of
`liandan.serve_http`. tests/test_serve.py checks the same through a running server and the
official client; here each piece gets literal expectations."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from liandan.openai_api import (
    PROMPT_SHAPES,
    ApiError,
    ChatRequest,
    CompletionRequest,
    ServeLimits,
    TokenLogprob,
    chat_chunk,
    chat_logprobs,
    completion_chunk,
    completion_logprobs,
    error_response,
    field_path,
    sse,
    validation_error,
)
from liandan.serve_http import GuardRequests, RequireApiKey, allowed_hosts

HELLO = [{"role": "user", "content": "Hi"}]
UNSET_SAMPLING = {"max_tokens": None, "temperature": None, "top_p": None, "n": None, "stop": None, "seed": None,
                  "stream": None, "stream_options": None}  # fmt: skip


def chat(**fields) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "messages": HELLO, **fields})


def refused(model, body) -> RequestValidationError:
    """The RequestValidationError FastAPI raises for ``body`` (a single body model: locations under "body")."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in caught.value.errors(include_url=False)])


def answer(response) -> tuple[int, dict]:
    return response.status_code, json.loads(response.body)


def openai_error(message, param=None, code=None, type="invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------
# Requests


def test_a_minimal_chat_request_has_every_option_unset():
    request = chat()
    assert request.model_dump() == {"model": "m", **UNSET_SAMPLING,
                                    "messages": [{"role": "user", "content": "Hi", "tool_calls": None, "tool_call_id": None}],
                                    "max_completion_tokens": None, "logprobs": None, "top_logprobs": None,
                                    "tools": None, "tool_choice": None, "parallel_tool_calls": None}  # fmt: skip
    assert request.model_extra == {}


def test_chat_request_fields_parse_to_their_types():
    request = chat(max_tokens=5, temperature=1, top_p=0, n=128, stop=["\n", "END"], seed=-(2**63), stream=True,
                   stream_options={}, max_completion_tokens=7)  # fmt: skip
    assert request.temperature == 1.0 and isinstance(request.temperature, float)  # JSON 1 is a fine temperature
    assert (request.max_tokens, request.top_p, request.n, request.stop) == (5, 0.0, 128, ["\n", "END"])
    assert (request.seed, request.stream, request.max_completion_tokens) == (-(2**63), True, 7)
    assert request.stream_options.include_usage is False  # OpenAI's default when the object is sent empty
    assert chat(stop="###", seed=2**64 - 1, temperature=2.0, top_p=1.0).stop == "###"


def test_unknown_openai_fields_are_kept_for_the_server_to_refuse():
    request = chat(echo=True, user="alice")  # echo is the completions endpoint's
    assert request.model_extra == {"echo": True, "user": "alice"}


def test_messages_become_template_dicts():
    request = chat(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None},
        {"role": "system", "content": []},
    ])  # fmt: skip
    assert [m.as_dict() for m in request.messages] == [
        {"role": "system", "content": "Be brief."},  # OpenAI's newer name for the system role
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": ""},
        {"role": "system", "content": ""},
    ]


def test_completion_request_takes_one_prompt_or_several():
    single = CompletionRequest.model_validate({"model": "m", "prompt": "Once"})
    assert single.model_dump() == {"model": "m", **UNSET_SAMPLING, "prompt": "Once", "logprobs": None, "echo": None}
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]}).prompt == ["a", "b"]


def test_completion_request_takes_token_ids_and_scoring_options():
    """As lm-evaluation-harness sends a log-likelihood request when it has the model's tokenizer."""
    request = CompletionRequest.model_validate(
        {"model": "m", "prompt": [[5, 6, 7], [8]], "max_tokens": 0, "logprobs": 1, "echo": True})  # fmt: skip
    assert (request.prompt, request.max_tokens, request.logprobs, request.echo) == ([[5, 6, 7], [8]], 0, 1, True)
    assert CompletionRequest.model_validate({"model": "m", "prompt": [0, 2]}).prompt == [0, 2]


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt"), ({"prompt": [1, -2]}, "prompt"),
     ({"prompt": [[1], "a"]}, "prompt"), ({"prompt": [1.5]}, "prompt"), ({"logprobs": -1}, "logprobs"),
     ({"logprobs": True}, "logprobs"), ({"echo": "yes"}, "echo"), ({"max_tokens": -1}, "max_tokens")],
)  # fmt: skip
def test_bad_token_ids_and_scoring_options_name_their_param(fields, param):
    status, body = answer(validation_error(refused(CompletionRequest, {"model": "m", "prompt": "x", **fields})))
    assert status == 400 and body["error"]["param"] == param


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"temperature": "0.5"}, "temperature"), ({"temperature": True}, "temperature"), ({"temperature": 2.01}, "temperature"),
     ({"temperature": -0.1}, "temperature"), ({"top_p": 1.01}, "top_p"), ({"top_p": -0.5}, "top_p"),
     ({"max_tokens": 1.5}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
     ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"n": 0}, "n"), ({"logprobs": 1}, "logprobs"),
     ({"top_logprobs": -1}, "top_logprobs"), ({"top_logprobs": 1.0}, "top_logprobs"),
     ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"seed": "7"}, "seed"), ({"stream": 1}, "stream"),
     ({"stop": ["a", 1]}, "stop"), ({"stream_options": {"include_usage": "yes"}}, "stream_options"),
     ({"model": None}, "model"), ({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
     ({"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]}, "messages")],
)  # fmt: skip
def test_wrong_types_and_out_of_range_values_name_their_param(fields, param):
    status, body = answer(validation_error(refused(ChatRequest, {"model": "m", "messages": HELLO, **fields})))
    assert status == 400
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] is None and body["error"]["message"].startswith(f"'{param}")


# ---------------------------------------------------------------------------------------------
# Validation errors as OpenAI errors: the whole message, literally


def test_a_wrong_type_names_the_field_what_came_and_what_was_expected():
    error = refused(ChatRequest, {"model": "m", "messages": HELLO, "temperature": "0.5"})
    assert answer(validation_error(error)) == (400, openai_error(
        "'temperature': Input should be a valid number (got \"0.5\")", param="temperature"))  # fmt: skip


def test_a_field_that_takes_a_string_or_a_list_says_both():
    error = refused(ChatRequest, {"model": "m", "messages": HELLO, "stop": 5})
    assert answer(validation_error(error)) == (400, openai_error(
        "'stop': Input should be a valid string, or: Input should be a valid list (got 5)", param="stop"))  # fmt: skip
    error = refused(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": 7}]})
    assert answer(validation_error(error))[1] == openai_error(
        "'messages.0.content': Input should be a valid string, or: Input should be a valid list (got 7)", param="messages")  # fmt: skip


def test_a_field_is_not_mixed_up_with_another_that_starts_with_its_name():
    error = refused(ChatRequest, {"model": "m", "messages": HELLO, "stream": "yes", "stream_options": {"include_usage": "no"}})
    assert answer(validation_error(error)) == (400, openai_error(
        "'stream': Input should be a valid boolean (got \"yes\")", param="stream"))  # fmt: skip


def test_a_list_error_points_at_the_item():
    error = refused(CompletionRequest, {"model": "m", "prompt": ["a", 2]})
    assert answer(validation_error(error))[1] == openai_error(
        f"'prompt': expected {PROMPT_SHAPES}; item 1 (2) is not a string, as item 0 is", param="prompt")  # fmt: skip
    error = refused(CompletionRequest, {"model": "m", "prompt": [[1, 2], [3, -4]]})
    message = answer(validation_error(error))[1]["error"]["message"]
    assert message.endswith("item 1 ([3, -4]) is not a list of token ids, as item 0 is")
    error = refused(CompletionRequest, {"model": "m", "prompt": [1.5]})
    assert answer(validation_error(error))[1]["error"]["message"].endswith("item 0 (1.5) fits none of them")


def test_a_missing_field_and_an_out_of_range_value():
    error = refused(ChatRequest, {"messages": HELLO})
    assert answer(validation_error(error))[1] == openai_error("'model': Field required", param="model")
    error = refused(ChatRequest, {"model": "m", "messages": HELLO, "n": 0})
    assert answer(validation_error(error))[1] == openai_error(
        "'n': Input should be greater than or equal to 1 (got 0)", param="n")  # fmt: skip


def test_a_long_value_is_cut_in_the_message():
    error = refused(ChatRequest, {"model": "m", "messages": HELLO, "temperature": "x" * 100})
    message = answer(validation_error(error))[1]["error"]["message"]
    assert message == "'temperature': Input should be a valid number (got \"" + "x" * 59 + ")"


def test_bodies_that_are_not_a_json_object():
    not_json = RequestValidationError([{"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error",
                                        "input": {}, "ctx": {"error": "Expecting property name enclosed in double quotes"}}])  # fmt: skip
    assert answer(validation_error(not_json)) == (400, openai_error(
        "the request body is not valid JSON: Expecting property name enclosed in double quotes (at character 1)"))  # fmt: skip
    array = refused(ChatRequest, [1, 2])
    assert answer(validation_error(array)) == (400, openai_error(
        "the request body must be a JSON object: Input should be a valid dictionary or instance of ChatRequest"))  # fmt: skip
    text_plain = refused(ChatRequest, b'{"model": "m"}')  # FastAPI passes a non-JSON content type's bytes through
    assert answer(validation_error(text_plain)) == (400, openai_error(
        "the request body must be JSON, sent with 'Content-Type: application/json'"))  # fmt: skip


def test_field_path_drops_union_branch_tags():
    assert field_path(("body", "messages", 0, "str")) == "messages.0"
    assert field_path(("body", "messages", 0, "content", "list[_TextPart]", 1, "text")) == "messages.0.content.1.text"
    assert field_path(("body", "temperature", "float")) == "temperature"
    assert field_path(("body", "n", "int")) == "n" and field_path(("body", "stream", "bool")) == "stream"
    assert field_path(("body",)) == ""


def test_error_response_and_api_error_carry_openai_fields():
    assert answer(error_response(404, "no such model", param="model", code="model_not_found")) == (
        404, openai_error("no such model", param="model", code="model_not_found"))  # fmt: skip
    assert answer(error_response(500, "boom", type="server_error")) == (500, openai_error("boom", type="server_error"))
    error = ApiError(400, "'stop': stop strings must not be empty", param="stop")
    assert str(error) == "'stop': stop strings must not be empty"
    assert (error.status, error.message, error.param, error.code, error.type) == (
        400, "'stop': stop strings must not be empty", "stop", None, "invalid_request_error")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The API key, as ASGI calls the middleware


def call(middleware, path: str, authorization: bytes | None = None) -> tuple[int, dict | str]:
    """One HTTP request through ``middleware``; returns (status, JSON body or "app" if it was let through)."""
    headers = [(b"host", b"localhost")] + ([(b"authorization", authorization)] if authorization is not None else [])
    scope = {"type": "http", "method": "GET", "path": path, "headers": headers, "query_string": b""}
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    if sent == [{"type": "app"}]:
        return 200, "app"
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], json.loads(body)


def key_checked() -> RequireApiKey:
    async def app(scope, receive, send):
        await send({"type": "app"})

    return RequireApiKey(app, "s3cret")


def test_the_right_key_lets_a_request_through_in_either_case_of_bearer():
    assert call(key_checked(), "/v1/models", b"Bearer s3cret") == (200, "app")
    assert call(key_checked(), "/v1/chat/completions", b"bearer s3cret") == (200, "app")


def test_missing_and_wrong_keys_are_401_in_openai_shape():
    missing = (401, openai_error("missing API key: send the header 'Authorization: Bearer KEY'"))
    assert call(key_checked(), "/v1/models") == missing
    assert call(key_checked(), "/v1/models", b"") == missing
    wrong = (401, openai_error("incorrect API key", code="invalid_api_key"))
    assert call(key_checked(), "/v1/models", b"Bearer s3cre") == wrong
    assert call(key_checked(), "/v1/models", b"Bearer s3cret-and-more") == wrong
    assert call(key_checked(), "/v1/models", b"Basic s3cret") == wrong  # the right key, the wrong scheme
    assert call(key_checked(), "/v1/models", b"s3cret") == wrong


def test_paths_outside_v1_need_the_key_too():
    """/docs and /openapi.json (when served at all) describe the server: they are behind the key."""
    assert call(key_checked(), "/docs")[0] == 401
    assert call(key_checked(), "/openapi.json", b"Bearer wrong")[0] == 401
    assert call(key_checked(), "/docs", b"Bearer s3cret") == (200, "app")


# ---------------------------------------------------------------------------------------------
# Host, Origin and body size, as ASGI calls the guard


def guarded(headers: dict[str, str], body: list[bytes] | None = None, hosts=("localhost", "127.0.0.1", "::1"),
            origins=(), method: str = "POST") -> tuple[int, dict | bytes]:  # fmt: skip
    """One request through `GuardRequests` (1000-byte limit); returns (status, JSON error) or
    (200, the body the app read) when it was let through. ``body`` arrives in these chunks."""
    scope = {"type": "http", "method": method, "path": "/v1/completions", "scheme": "http", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}  # fmt: skip
    chunks = list(body or [b""])
    sent: list[dict] = []

    async def receive():
        if chunks:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        read, message = b"", {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            read += message.get("body", b"")
        sent.append({"type": "app", "body": read})

    asyncio.run(GuardRequests(app, hosts, 1000, origins)(scope, receive, send))
    if sent[0]["type"] == "app":
        return 200, sent[0]["body"]
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_the_guard_answers_only_to_its_host_names():
    assert guarded({"Host": "127.0.0.1:8000"}) == (200, b"")
    assert guarded({"Host": "localhost"}) == (200, b"")
    assert guarded({"Host": "[::1]:8000"}) == (200, b"")
    status, body = guarded({"Host": "evil.example:8000"})  # a DNS-rebinding page calls the server by its own name
    assert status == 400 and body["error"]["code"] == "invalid_host" and "evil.example" in body["error"]["message"]
    assert guarded({})[0] == 400  # no Host at all
    assert guarded({"Host": "evil.example"}, hosts=None) == (200, b"")  # bound to 0.0.0.0: any name


def test_allowed_hosts_widen_with_the_bind_address():
    assert allowed_hosts("127.0.0.1") == ("localhost", "127.0.0.1", "::1")
    assert allowed_hosts("192.168.1.5") == ("localhost", "127.0.0.1", "::1", "192.168.1.5")
    assert allowed_hosts("127.0.0.1", ("My-Box.lan",)) == ("localhost", "127.0.0.1", "::1", "my-box.lan")
    assert allowed_hosts("0.0.0.0") is None and allowed_hosts("::") is None and allowed_hosts("127.0.0.1", ("*",)) is None


def test_the_guard_refuses_cross_site_browser_requests():
    host = {"Host": "127.0.0.1:8000"}
    assert guarded({**host, "Origin": "http://127.0.0.1:8000"}) == (200, b"")  # the server's own page
    for origin in ("https://evil.example", "http://127.0.0.1:9999", "null"):
        status, body = guarded({**host, "Origin": origin})
        assert status == 403 and body["error"]["code"] == "cross_origin_refused", origin
    assert guarded({**host, "Sec-Fetch-Site": "cross-site"})[0] == 403  # a browser that sent no Origin
    assert guarded({**host, "Origin": "http://localhost:3000"}, origins=("http://localhost:3000",)) == (200, b"")


def test_the_guard_refuses_large_bodies_before_reading_them():
    host = {"Host": "localhost"}
    assert guarded({**host, "Content-Length": "1000"}, [b"x" * 1000]) == (200, b"x" * 1000)
    status, body = guarded({**host, "Content-Length": "1001"}, [b"x" * 1001])
    assert status == 413 and body["error"]["code"] == "request_too_large" and "1000 bytes" in body["error"]["message"]
    assert guarded({**host, "Content-Length": "10000000000"})[0] == 413
    assert guarded({**host, "Content-Length": "-5"})[0] == 413
    # Chunked (no Content-Length): counted while it arrives, then handed on whole.
    assert guarded(host, [b"x" * 600, b"x" * 401])[0] == 413
    assert guarded(host, [b"x" * 600, b"y" * 400]) == (200, b"x" * 600 + b"y" * 400)


def test_serve_limits_must_be_positive():
    assert ServeLimits().max_n == 8
    with pytest.raises(ValueError, match="max_n"):
        ServeLimits(max_n=0)


# ---------------------------------------------------------------------------------------------
# Server-sent events


def test_sse_frames_json_and_the_done_marker():
    assert sse({"a": 1, "b": [None, "x"]}) == 'data: {"a": 1, "b": [null, "x"]}\n\n'
    assert sse("[DONE]") == "data: [DONE]\n\n"


def test_chat_chunks_as_openai_streams_them():
    assert chat_chunk(0, "Hel", None) == {
        "choices": [{"index": 0, "delta": {"content": "Hel"}, "logprobs": None, "finish_reason": None}]}  # fmt: skip
    assert chat_chunk(2, None, "stop") == {
        "choices": [{"index": 2, "delta": {}, "logprobs": None, "finish_reason": "stop"}]}  # fmt: skip
    assert chat_chunk(1, "", None)["choices"][0]["delta"] == {"content": ""}  # empty text is still a delta


def test_completion_chunks_as_openai_streams_them():
    assert completion_chunk(0, "Once", None) == {
        "choices": [{"index": 0, "text": "Once", "logprobs": None, "finish_reason": None}]}  # fmt: skip
    assert completion_chunk(3, None, "length") == {
        "choices": [{"index": 3, "text": "", "logprobs": None, "finish_reason": "length"}]}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Log-probabilities in OpenAI's two shapes

# "héllo": "h", then "é" in two tokens (the first ends inside the character, so adds ""), then "llo".
TOKENS = [TokenLogprob("h", None, None), TokenLogprob("", -0.5, [("x", -0.25), ("", -0.5)]),
          TokenLogprob("é", -1.0, [("é", -1.0)]), TokenLogprob("llo", -2.0, [("lo", -1.5), ("la", -float("inf"))])]  # fmt: skip


def test_completion_logprobs_are_parallel_lists_with_the_chosen_token_among_the_top():
    assert completion_logprobs(TOKENS) == {
        "tokens": ["h", "", "é", "llo"],
        "token_logprobs": [None, -0.5, -1.0, -2.0],
        "top_logprobs": [None, {"x": -0.25, "": -0.5}, {"é": -1.0}, {"lo": -1.5, "llo": -2.0, "la": -9999.0}],
        "text_offset": [0, 1, 1, 2],
    }  # fmt: skip
    assert completion_logprobs(TOKENS[2:], start=7)["text_offset"] == [7, 8]  # a streamed chunk, 7 characters in
    assert json.loads(json.dumps(completion_logprobs(TOKENS), allow_nan=False))  # -inf is written as -9999.0
    # Two alternatives that read the same: the likelier stays.
    assert completion_logprobs([TokenLogprob("a", -3.0, [("", -1.0), ("", -2.0)])])["top_logprobs"] == [
        {"": -1.0, "a": -3.0}]  # fmt: skip


def test_chat_logprobs_carry_bytes_and_exactly_the_top_asked_for():
    content = chat_logprobs(TOKENS[1:3])["content"]
    assert content == [
        {"token": "", "logprob": -0.5, "bytes": [],
         "top_logprobs": [{"token": "x", "logprob": -0.25, "bytes": [120]}, {"token": "", "logprob": -0.5, "bytes": []}]},
        {"token": "é", "logprob": -1.0, "bytes": [195, 169],
         "top_logprobs": [{"token": "é", "logprob": -1.0, "bytes": [195, 169]}]},
    ]  # fmt: skip
    assert chat_logprobs([])["refusal"] is None
    assert chat_chunk(0, "é", None, TOKENS[2:3])["choices"][0]["logprobs"] == chat_logprobs(TOKENS[2:3])
    assert completion_chunk(0, "llo", None, TOKENS[3:], 2)["choices"][0]["logprobs"]["text_offset"] == [2]
