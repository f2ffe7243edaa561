"""The OpenAI API's wire format, as `liandan.serve` speaks it: typed requests, errors in OpenAI's
shape, the API-key check, and server-sent event chunks.

    from liandan.openai_api import ChatRequest, ApiError
    request = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
    raise ApiError(400, "'stop': stop strings must not be empty", param="stop")

Requests are strict ("0.5" is not a temperature, 1.5 is not a max_tokens); OpenAI parameters that
liandan does not implement are refused when set (`UNSUPPORTED`) rather than silently ignored.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

# OpenAI parameters liandan does not implement: refused when set, rather than silently ignored.
UNSUPPORTED = (
    "logprobs", "top_logprobs", "echo", "suffix", "best_of", "logit_bias", "frequency_penalty",
    "presence_penalty", "tools", "tool_choice", "functions", "function_call", "response_format",
)  # fmt: skip
UNSET = (None, False, 0, "", [], {}, "none", "auto", {"type": "text"})


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
    n: Annotated[StrictInt, Field(ge=1, le=128)] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), lt=2**64)] | None = None
    stream: StrictBool | None = None
    stream_options: _StreamOptions | None = None


class _TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class _Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[_TextPart] | None = None

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        # Templates are trained on "system"; OpenAI's newer name for it is "developer".
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(SamplingRequest):
    messages: Annotated[list[_Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None


class CompletionRequest(SamplingRequest):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1)]


# ---------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class ApiError(Exception):
    """A request the server refuses, answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   type: str = "invalid_request_error") -> JSONResponse:  # fmt: skip
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


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


class RequireApiKey:
    """ASGI middleware: every ``/v1`` request needs ``Authorization: Bearer KEY``. It runs before the
    body is read, so a caller without the key learns nothing about what it sent."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if not auth:
                response = error_response(401, "missing API key: send the header 'Authorization: Bearer KEY'")
                return await response(scope, receive, send)
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                response = error_response(401, "incorrect API key", code="invalid_api_key")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------
# Server-sent events


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def chat_chunk(index: int, text: str | None, finish_reason: str | None) -> dict:
    delta = {} if text is None else {"content": text}
    return {"choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def completion_chunk(index: int, text: str | None, finish_reason: str | None) -> dict:
    return {"choices": [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]}
