"""The OpenAI API's wire format, as `liandan.serve` speaks it: typed requests, errors in OpenAI's
shape, and server-sent event chunks.

    from liandan.openai_api import ChatRequest, ApiError
    request = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
    raise ApiError(400, "'stop': stop strings must not be empty", param="stop")

Requests are strict ("0.5" is not a temperature, 1.5 is not a max_tokens); OpenAI parameters that
liandan does not implement are refused when set (`UNSUPPORTED`) rather than silently ignored.
`TokenLogprob` is one token's log-probability as the worker finds it; `completion_logprobs` and
`chat_logprobs` write a choice's tokens in the two shapes OpenAI answers ``logprobs`` with.
`ServeLimits` bounds what one request may ask for, and `parse_limits` reads it from ``--limit
KEY=VALUE`` options; the API key and the Host, Origin and body-size checks are in `liandan.serve_http`.

Tool calling: a chat request's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` are checked
here (`ChatRequest.offered_tools`), assistant ``tool_calls`` and ``tool`` results are read into the
shape the chat template takes (`ChatRequest.conversation`), and `CallReader` turns a generated reply
into OpenAI's ``tool_calls`` (`CallStream`: the same, streamed as deltas).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import LiandanError


# OpenAI parameters liandan does not implement: refused when set, rather than silently ignored.
# "top_logprobs", "echo" and the tool fields belong to one endpoint each (chat, completions); the
# other refuses them.
UNSUPPORTED = (
    "top_logprobs", "echo", "suffix", "best_of", "logit_bias", "frequency_penalty", "presence_penalty", "tools",
    "tool_choice", "parallel_tool_calls", "functions", "function_call", "response_format",
)  # fmt: skip
UNSET = (None, False, 0, "", [], {}, "none", "auto", {"type": "text"})
REPLACED = {"functions": "'tools'", "function_call": "'tool_choice'"}
"""OpenAI's deprecated fields, and what replaced them (what the refusal points to)."""


# ---------------------------------------------------------------------------------------------
# Requests: typed and strict, so "0.5" is not a temperature and 1.5 is not a max_tokens.


class _StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields are checked against UNSUPPORTED

    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[StrictFloat, Field(ge=0, le=2)] | None = None
    top_p: Annotated[StrictFloat, Field(ge=0, le=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1)] | None = None  # capped by ServeLimits.max_n
    stop: StrictStr | list[StrictStr] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), lt=2**64)] | None = None
    stream: StrictBool | None = None
    stream_options: _StreamOptions | None = None


class _TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"
"""OpenAI's rule for function names (which also keeps special-token text out of forced call text)."""


class _Function(BaseModel):
    name: Annotated[StrictStr, Field(pattern=TOOL_NAME)]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    """A JSON Schema object, rendered as it is: the model reads it, nothing enforces it."""
    strict: StrictBool | None = None

    @field_validator("strict")
    @classmethod
    def _no_strict(cls, value: bool | None) -> bool | None:
        if value:  # OpenAI's promise that the arguments match the schema; liandan samples freely
            raise PydanticCustomError("strict", "liandan serve does not constrain arguments to the schema; leave out "
                                      "'strict' or set it to false")  # fmt: skip
        return value


class _Tool(BaseModel):
    type: Literal["function"]
    function: _Function


class _FunctionName(BaseModel):
    name: StrictStr


class _NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: _FunctionName


class _CalledFunction(BaseModel):
    name: Annotated[StrictStr, Field(min_length=1)]
    arguments: StrictStr

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise PydanticCustomError("arguments", "expected a JSON object written as a string, as the API returns it; "
                                      "this is not valid JSON: {reason}", {"reason": exc.msg}) from None  # fmt: skip
        if not isinstance(parsed, dict):
            raise PydanticCustomError("arguments", "expected a JSON object written as a string, as the API returns it")
        return value


class _ToolCall(BaseModel):
    id: Annotated[StrictStr, Field(min_length=1)]
    type: Literal["function"]
    function: _CalledFunction

    def as_dict(self) -> dict:
        """The call as chat templates take it: arguments as an object (they write them with ``tojson``)."""
        function = {"name": self.function.name, "arguments": json.loads(self.function.arguments)}
        return {"id": self.id, "type": "function", "function": function}


class _Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[_TextPart] | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_call_id: StrictStr | None = None

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self) -> _Message:
        if self.tool_calls is not None and self.role != "assistant":
            raise PydanticCustomError("tool_calls", "'tool_calls' belong to assistant messages, not to {role} messages",
                                      {"role": self.role})  # fmt: skip
        if self.role == "tool" and (not self.tool_call_id or self.content is None):
            raise PydanticCustomError("tool", "a tool message needs 'tool_call_id' (the id of the call it answers) and "
                                      "'content' (the result)")  # fmt: skip
        if self.tool_call_id is not None and self.role != "tool":
            raise PydanticCustomError("tool_call_id", "'tool_call_id' belongs to tool messages, not to {role} messages",
                                      {"role": self.role})  # fmt: skip
        return self

    def as_dict(self) -> dict[str, Any]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        # Templates are trained on "system"; OpenAI's newer name for it is "developer".
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            message["tool_calls"] = [call.as_dict() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatRequest(SamplingRequest):
    messages: Annotated[list[_Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0)] | None = None  # capped by ServeLimits.max_logprobs
    tools: list[_Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | _NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    """False: a reply's first call only."""

    def conversation(self) -> list[dict]:
        """The messages as the chat template takes them: each call's arguments as an object, and
        each tool result with the name of the function whose call it answers (some templates write it)."""
        called: dict[str, str] = {}
        messages = []
        for i, message in enumerate(self.messages):
            as_dict = message.as_dict()
            called.update((call.id, call.function.name) for call in message.tool_calls or ())
            if message.role == "tool":
                if message.tool_call_id not in called:
                    raise ApiError(400, f"'messages.{i}.tool_call_id': {message.tool_call_id!r} answers no call of an "
                                   "earlier assistant message", param="messages")  # fmt: skip
                as_dict["name"] = called[message.tool_call_id]
            messages.append(as_dict)
        return messages

    def offered_tools(self) -> list[dict] | None:
        """The tool definitions to render (None when none are offered: no ``tools``, or
        ``tool_choice: "none"``), once ``tool_choice`` is checked against them."""
        names = [tool.function.name for tool in self.tools or ()]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ApiError(400, f"'tools': each function needs its own name; {twice[0]!r} is defined twice", param="tools")
        choice = self.tool_choice
        if not names and choice not in (None, "none", "auto"):
            raise ApiError(400, "'tool_choice': needs 'tools', the functions the model may call", param="tool_choice")
        if isinstance(choice, _NamedToolChoice) and choice.function.name not in names:
            raise ApiError(400, f"'tool_choice': function {choice.function.name!r} is not among 'tools' ({', '.join(names)})",
                           param="tool_choice")  # fmt: skip
        if not names or choice == "none":
            return None
        return [{"type": "function", "function": tool.function.model_dump(exclude_none=True, exclude={"strict"})}
                for tool in self.tools]  # fmt: skip

    def forced_call(self) -> str | None:
        """The function a reply must call: "" for any (``"required"``), its name, or None (free)."""
        if isinstance(self.tool_choice, _NamedToolChoice):
            return self.tool_choice.function.name
        return "" if self.tool_choice == "required" else None


TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
PROMPT_SHAPES = "a string, a list of strings, a list of token ids (whole numbers from 0) or a list of lists of token ids"


def _prompt_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "a string"
    if type(value) is int and value >= 0:
        return "a token id"
    if isinstance(value, list) and value and all(type(v) is int and v >= 0 for v in value):
        return "a list of token ids"
    return None


def _one_prompt_error(value: Any, handler: Callable) -> Any:
    """One message for ``prompt`` naming its four shapes and the first item that breaks them
    (pydantic would list every way each alternative failed)."""
    if not isinstance(value, str):
        if not isinstance(value, list) or not value:
            raise PydanticCustomError("prompt", f"expected {PROMPT_SHAPES}")
        kind = _prompt_kind(value[0])
        for i, item in enumerate(value):
            if kind is None or _prompt_kind(item) != kind:
                why = "fits none of them" if kind is None else f"is not {kind}, as item 0 is"
                raise PydanticCustomError("prompt", f"expected {PROMPT_SHAPES}; item {i} ({json.dumps(item)[:40]}) {why}")
    return handler(value)


class CompletionRequest(SamplingRequest):
    # lm-evaluation-harness sends token ids when it has the model's tokenizer.
    prompt: Annotated[StrictStr | list[StrictStr] | TokenIds | list[TokenIds], WrapValidator(_one_prompt_error)]
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None  # 0 only with echo: score the prompt
    logprobs: Annotated[StrictInt, Field(ge=0)] | None = None  # capped by ServeLimits.max_logprobs
    echo: StrictBool | None = None


def top_logprobs(request: ChatRequest | CompletionRequest, limits: ServeLimits) -> int | None:
    """How many of the likeliest tokens to list beside each token (completions' ``logprobs``, chat's
    ``top_logprobs``); None: no log-probabilities. Chat's ``top_logprobs`` needs ``logprobs: true``."""
    if isinstance(request, ChatRequest):
        if request.top_logprobs is not None and not request.logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        name, count = "top_logprobs", (request.top_logprobs or 0) if request.logprobs else None
    else:
        name, count = "logprobs", request.logprobs
    if count is not None and count > limits.max_logprobs:
        raise ApiError(400, f"'{name}': at most {limits.max_logprobs} on this server (got {count})", param=name)
    return count


@dataclass(frozen=True)
class ServeLimits:
    """What one request, and one client, may ask of `liandan.serve`, so that no client can tie up the
    model, the memory, the queue or the connections. Each request limit answers in OpenAI's error
    shape, naming the limit; the connection limits are uvicorn's own settings. On the command line:
    ``liandan serve --limit max_n=4 --limit max_queued=128``."""

    max_n: int = 8
    """Choices per prompt (``n``); more is a 400."""
    max_tokens: int = 4096
    """Tokens one choice may generate (``max_tokens``); more is a 400. A chat request that leaves
    ``max_tokens`` out gets the rest of the context, but never more than this."""
    max_prompts: int = 16
    """Prompts in one ``/v1/completions`` request; more is a 400."""
    max_stops: int = 4
    """Stop strings per request (OpenAI's own limit); more is a 400."""
    max_stop_chars: int = 256
    """Characters in one stop string; longer is a 400."""
    max_body_bytes: int = 2 * 1024 * 1024
    """Bytes in a request body; larger is a 413, answered before the body is read."""
    max_queued: int = 64
    """Jobs (one per prompt) waiting for or held by the model; a request that would queue more is
    a 429 with ``Retry-After``."""
    retry_after_s: int = 2
    """The ``Retry-After`` a 429 carries."""
    max_connections: int | None = None
    """Open connections, idle ones included; a request while more are open is a 503 from uvicorn.
    None: 4 x ``max_queued`` (room for streams and clients waiting on a 429's ``Retry-After``)."""
    keep_alive_s: int = 5
    """Seconds an idle connection stays open after its last response."""
    max_header_bytes: int = 16 * 1024
    """Bytes of a request's line and headers held while they are unfinished; a client that sends
    more without ending its headers gets a 400 from the HTTP parser (h11)."""
    header_timeout_s: int = 10
    """Seconds a connection may take to send a request's line and headers, from when it opens or
    its last response ends; then it is closed, so clients that connect and trickle (or send
    nothing) cannot hold the connection cap."""
    max_logprobs: int = 20
    """Most likely tokens listed for each token (completions' ``logprobs``, chat's ``top_logprobs``;
    OpenAI allows 5 and 20, vLLM 20); more is a 400."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if (value is not None or name != "max_connections") and (type(value) is not int or value < 1):
                raise ValueError(f"ServeLimits.{name} must be a whole number of at least 1 (got {value!r})")

    @property
    def connections(self) -> int:
        return self.max_connections or 4 * self.max_queued


def parse_limits(items: Sequence[str] | None) -> ServeLimits:
    """``--limit KEY=VALUE`` options (``["max_n=4", "max_queued=128"]``) as `ServeLimits`; a bad
    one is a `LiandanError` naming it and what was expected."""
    keys = [f.name for f in dataclasses.fields(ServeLimits)]
    values: dict[str, int] = {}
    for item in items or ():
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals:
            raise LiandanError(f"--limit {item}: expected KEY=VALUE, e.g. max_n=4; the limits are {', '.join(keys)}")
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            guess = f" (did you mean '{close[0]}'?)" if close else ""
            raise LiandanError(f"--limit {item}: unknown limit '{key}'{guess}; the limits are {', '.join(keys)}")
        if not (value.isascii() and value.isdigit()) or int(value) < 1:
            raise LiandanError(f"--limit {item}: {key} must be a whole number of at least 1 (got '{value}')")
        values[key] = int(value)
    return ServeLimits(**values)


# ---------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class ApiError(Exception):
    """A request the server refuses, answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_error(exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 as OpenAI's 400: one message naming the field, what came and what was expected."""
    errors = exc.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return error_response(400, f"the request body is not valid JSON: {detail} (at character {first['loc'][-1]})")
    path = field_path(first["loc"])
    if isinstance(first.get("input"), bytes):  # a body FastAPI did not read as JSON
        return error_response(400, "the request body must be JSON, sent with 'Content-Type: application/json'")
    if not path:
        return error_response(400, f"the request body must be a JSON object: {first['msg']}")
    # A field that takes a string or a list fails once per alternative; say them all.
    by_path: dict[str, list[str]] = {}
    for error in errors:
        where = field_path(error["loc"])
        if (where == path or where.startswith(path + ".")) and error["msg"] not in by_path.get(where, []):
            by_path.setdefault(where, []).append(error["msg"])
    got = first.get("input")
    shown = f" (got {json.dumps(got)[:60]})" if isinstance(got, (str, int, float, bool)) or got is None else ""
    message = "; or ".join(f"'{where}': {', or: '.join(msgs)}" for where, msgs in by_path.items())
    return error_response(400, message + shown, param=path.split(".")[0])


def field_path(loc: tuple) -> str:
    """``("body", "messages", 0, "str")`` -> ``"messages.0"``: pydantic's union branch tags dropped."""
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and (p in ("str", "int", "float", "bool") or "[" in p))]
    return ".".join(parts)


# ---------------------------------------------------------------------------------------------
# Server-sent events


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def chat_chunk(index: int, text: str | None, finish_reason: str | None, tokens: list[TokenLogprob] | None = None,
               start: int = 0) -> dict:  # fmt: skip
    delta = {} if text is None else {"content": text}
    logprobs = None if tokens is None else chat_logprobs(tokens)
    return {"choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def completion_chunk(index: int, text: str | None, finish_reason: str | None, tokens: list[TokenLogprob] | None = None,
                     start: int = 0) -> dict:  # fmt: skip
    """``start``: where the chunk's first token begins in the choice's whole text (``text_offset``)."""
    logprobs = None if tokens is None else completion_logprobs(tokens, start)
    return {"choices": [{"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}]}


# ---------------------------------------------------------------------------------------------
# Log-probabilities


@dataclass
class TokenLogprob:
    """One token of a choice: the text it adds, its log-probability under the model (the
    log-softmax of the raw logits, before temperature or top-p) and the most likely tokens at its
    place, most likely first. A token that ends inside a character adds "" and the one that
    completes the character adds all of it, so the tokens of a choice join to its text."""

    token: str
    logprob: float | None
    """None for the first token of an echoed prompt, which nothing before it predicts."""
    top: list[tuple[str, float]] | None


LOWEST_LOGPROB = -9999.0
"""What -inf becomes (as vLLM writes it): JSON has no infinity."""


def _finite(logprob: float) -> float:
    return max(logprob, LOWEST_LOGPROB)


def completion_logprobs(tokens: list[TokenLogprob], start: int = 0) -> dict:
    """The legacy completions shape: parallel lists, and ``top_logprobs`` as ``{token: logprob}``
    that always holds the chosen token too (so it may have one more than asked, as OpenAI says)."""
    offsets, top_logprobs = [], []
    for token in tokens:
        offsets.append(start)
        start += len(token.token)
        if token.top is None:
            top_logprobs.append(None)
            continue
        top: dict[str, float] = {}
        for text, logprob in [*token.top, (token.token, token.logprob)]:
            top.setdefault(text, logprob)  # two tokens may read the same ("" inside a character): keep the likelier
        top_logprobs.append({t: _finite(p) for t, p in sorted(top.items(), key=lambda item: -item[1])})
    return {"tokens": [t.token for t in tokens],
            "token_logprobs": [None if t.logprob is None else _finite(t.logprob) for t in tokens],
            "top_logprobs": top_logprobs, "text_offset": offsets}  # fmt: skip


def chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    """The chat shape: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``."""

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8"))}

    content = [{**entry(t.token, t.logprob), "top_logprobs": [entry(*alt) for alt in t.top or []]} for t in tokens]
    return {"content": content, "refusal": None}
