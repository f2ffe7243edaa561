"""An HTTP server with the OpenAI API shape, for one model: ``liandan serve MODEL``.

    liandan serve runs/my-sft --port 8000                      # in one terminal

    from openai import OpenAI                                   # in another, any OpenAI client
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="my-sft", messages=[{"role": "user", "content": "Hi"}], temperature=0)
    print(reply.choices[0].message.content, reply.choices[0].finish_reason)

From Python, `create_app` gives the FastAPI app without opening a socket,
`liandan.serve_http.uvicorn_server` the uvicorn server `serve` runs it with (its connection limits,
and the queue answered at shutdown), and `serve` loads a model with `liandan.models.load_model` and
runs the app:

    from liandan.serve import serve
    serve("runs/my-sft", port=8000, api_key="secret")

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (the model's own chat template and
stop tokens, as trained) and ``POST /v1/completions`` (raw text, no template); both stream as
server-sent events with ``"stream": true``. Honoured: ``temperature`` (default 1, as OpenAI; 0 is
greedy), ``top_p``, ``max_tokens``, ``stop``, ``seed``, ``n``; ``finish_reason`` is ``stop`` when
the model's stop token or a stop string ended a choice and ``length`` when ``max_tokens`` did.
Log-probabilities for evaluators (lm-evaluation-harness, as against OpenAI or vLLM): completions take
``logprobs: N``, ``echo`` (the prompt's tokens scored too; with ``max_tokens: 0``, only them) and
prompts as token ids; chat takes ``logprobs: true`` and ``top_logprobs: N``.
Tool calling: chat takes ``tools``, ``tool_choice`` (``"required"`` or a named function puts the
start of a call after the prompt) and ``parallel_tool_calls``; the model's calls, written as its chat
template writes them (`liandan.tools`), come back as ``tool_calls`` with ``finish_reason:
"tool_calls"``, streamed too, and the ``tool`` results of the next request are rendered by the same
template. A model whose template renders no tools is refused with the reason; a ChatML model can be
served with liandan's ChatML tools template (``serve(..., tools_template="chatml")``).
Text is decoded with special tokens kept, as ``liandan generate`` shows it; the stop token itself
is never part of it.

One worker thread owns the model and runs requests one at a time from a bounded queue: simple, and
each request gets exactly the output it would get alone. Rendering and tokenizing run in threads,
off the event loop; a client that leaves cancels its jobs, queued or running. Bad requests get a 4xx
answer in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``; a 500 says only
that it happened (the traceback goes to the server's log). The limits (`ServeLimits`) and the wire
format live in `liandan.openai_api`; the API key, the Host, Origin and body-size checks
(`GuardRequests`) and the uvicorn server in `liandan.serve_http`; stop strings in `liandan.generation`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from .chat import chat_stop_ids, encode_generation_prompt, has_chat_template
from .errors import LiandanError
from .models import check_models, context_length, load_model
from .openai_api import (
    REPLACED,
    UNSET,
    UNSUPPORTED,
    ApiError,
    ChatRequest,
    CompletionRequest,
    SamplingRequest,
    ServeLimits,
    chat_chunk,
    chat_logprobs,
    completion_chunk,
    completion_logprobs,
    sse,
    top_logprobs,
)
from .serve_http import (
    LOCAL_HOSTS,
    AnswerBugs,
    GuardRequests,
    RequireApiKey,
    add_error_handlers,
    allowed_hosts,
    uvicorn_server,
    web_origin,
)
from .serve_tools import CallReader, CallStream
from .serve_worker import Choice, Job, Worker
from .tools import BUILTIN_TEMPLATES, CallFormat, call_format, tools_problem, with_tools_template

log = logging.getLogger("liandan.serve")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for /v1/completions; chat completions default to the rest of the context."""
UNKNOWN_CONTEXT_MAX_TOKENS = 4096
"""Chat default for a model whose config does not say how long its context is."""


# ---------------------------------------------------------------------------------------------
# The app


@dataclass
class _Server:
    model: Any
    tokenizer: Any
    name: str
    max_prompt_tokens: int | None
    worker: Worker
    lock: threading.Lock
    context: int | None = None
    chat_stop_ids: list[int] = field(default_factory=list)
    """Stop tokens of chat completions; completions stop at the worker's (the model's own)."""
    limits: ServeLimits = field(default_factory=ServeLimits)
    vocab: int | None = None
    """Token ids a prompt may hold: those both the tokenizer and the model's embeddings know."""
    calls: CallFormat | str | None = None
    """How the model writes tool calls, or why it cannot (found at the first request that needs it)."""

    def check(self, request: SamplingRequest) -> None:
        for name, value in (request.model_extra or {}).items():
            if name in UNSUPPORTED and value not in UNSET:
                instead = f"; it is deprecated: send {REPLACED[name]} instead" if name in REPLACED else ""
                raise ApiError(400, f"'{name}' is not supported by liandan serve{instead}", param=name,
                               code="unsupported_parameter")  # fmt: skip
        if request.model != self.name:
            raise ApiError(404, f"model '{request.model}' is not served here; this server serves '{self.name}' "
                           "(see GET /v1/models)", param="model", code="model_not_found")  # fmt: skip
        stops, limits = self.stops(request), self.limits
        if any(s == "" for s in stops):
            raise ApiError(400, "'stop': stop strings must not be empty", param="stop")
        if len(stops) > limits.max_stops or any(len(s) > limits.max_stop_chars for s in stops):
            raise ApiError(400, f"'stop': at most {limits.max_stops} stop strings of at most {limits.max_stop_chars} "
                           "characters each", param="stop")  # fmt: skip
        if (request.n or 1) > limits.max_n:
            raise ApiError(400, f"'n': at most {limits.max_n} choices per prompt on this server (got {request.n})",
                           param="n")  # fmt: skip
        for name in ("max_tokens", "max_completion_tokens"):
            if (value := getattr(request, name, None)) is not None and value > limits.max_tokens:
                raise ApiError(400, f"'{name}': at most {limits.max_tokens} tokens per choice on this server "
                               f"(got {value})", param=name)  # fmt: skip

    @staticmethod
    def stops(request: SamplingRequest) -> list[str]:
        return [request.stop] if isinstance(request.stop, str) else list(request.stop or [])

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        with self.lock:
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def budget(self, prompt_ids: list[int], max_tokens: int | None, default: int | None, param: str) -> int:
        """``max_tokens`` for this prompt, after checking the prompt fits the model and the server."""
        n = len(prompt_ids)
        if n == 0:
            raise ApiError(400, f"'{param}' is empty: there is nothing to continue", param=param)
        if self.max_prompt_tokens is not None and n > self.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {n} tokens; this server accepts at most {self.max_prompt_tokens} "
                           "(--max-prompt-tokens)", param=param, code="context_length_exceeded")  # fmt: skip
        if max_tokens is None:
            max_tokens = default or (max(self.context - n, 1) if self.context else UNKNOWN_CONTEXT_MAX_TOKENS)
            max_tokens = min(max_tokens, self.limits.max_tokens)
        if self.context is not None and n + max_tokens > self.context:
            raise ApiError(400, f"this model's maximum context length is {self.context} tokens, but the request needs "
                           f"{n + max_tokens}: {n} in the prompt and {max_tokens} to generate; shorten the prompt or "
                           "lower max_tokens", param=param, code="context_length_exceeded")  # fmt: skip
        return max_tokens

    def jobs(self, request: ChatRequest | CompletionRequest, prompts: list[list[int]], max_tokens: int | None,
             default: int | None, param: str, stop_ids: list[int], echo: bool = False) -> list[Job]:  # fmt: skip
        n = request.n or 1
        temperature = 1.0 if request.temperature is None else request.temperature
        top_p = 1.0 if request.top_p is None else request.top_p
        logprobs = top_logprobs(request, self.limits)
        return [
            Job(prompt_ids=ids, n=n, max_tokens=self.budget(ids, max_tokens, default, param),
                temperature=temperature, top_p=top_p, stop=self.stops(request), seed=request.seed,
                first_index=i * n, stream=bool(request.stream), stop_ids=stop_ids, logprobs=logprobs, echo=echo)
            for i, ids in enumerate(prompts)
        ]  # fmt: skip

    def tool_format(self, param: str) -> CallFormat:
        """How the model writes tool calls; a 400 naming ``param`` when its template cannot render tools."""
        if self.calls is None:  # found once: the template does not change while the server runs
            with self.lock:
                try:
                    self.calls = call_format(self.tokenizer)
                except LiandanError as exc:
                    self.calls = tools_problem(self.tokenizer) or str(exc)
        if isinstance(self.calls, str):
            raise ApiError(400, f"this model cannot be served with tools: {self.calls}; serve a run trained with "
                           "tools_template: chatml, or start the server with --tools-template chatml (for a ChatML model) "
                           "or --tools-template FILE.jinja (a template that renders tools)", param=param,
                           code="tools_unsupported")  # fmt: skip
        return self.calls

    def chat_jobs(self, request: ChatRequest) -> tuple[list[Job], CallReader | None]:
        """The request's jobs, and how their replies are read for tool calls (None: as plain text)."""
        self.check(request)
        tools, messages = request.offered_tools(), request.conversation()
        fmt = self.tool_format("tools") if tools else None
        if fmt is None and any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            self.tool_format("messages")  # earlier calls and results need a template that renders them
        try:  # special-token text typed in a message stays text: a user cannot forge a turn
            with self.lock:
                ids = encode_generation_prompt(self.tokenizer, messages, tools=tools)
        except Exception as exc:
            raise ApiError(400, f"the model's chat template cannot render these messages: {exc}", param="messages") from exc
        reader = None
        if fmt is not None:
            reader = CallReader.for_request(fmt, request.forced_call(), request.parallel_tool_calls)
            if reader.forced:  # the template's own text (function names are letters, digits, _ and -)
                ids = ids + self.encode(reader.forced, add_special_tokens=False)
        max_tokens = request.max_completion_tokens or request.max_tokens
        return self.jobs(request, [ids], max_tokens, None, "messages", self.chat_stop_ids), reader

    def completion_jobs(self, request: CompletionRequest) -> list[Job]:
        self.check(request)
        if request.max_tokens == 0 and not request.echo:
            raise ApiError(400, "'max_tokens': 0 generates nothing; it is for scoring a prompt, with 'echo': true",
                           param="max_tokens")  # fmt: skip
        prompt = request.prompt  # a string, strings, token ids, or lists of token ids
        prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
        if len(prompts) > self.limits.max_prompts:
            raise ApiError(400, f"'prompt': at most {self.limits.max_prompts} prompts per request on this server "
                           f"(got {len(prompts)})", param="prompt")  # fmt: skip
        for ids in prompts:
            if not isinstance(ids, str) and self.vocab is not None and max(ids) >= self.vocab:
                raise ApiError(400, f"'prompt': token id {max(ids)} is not in this model's vocabulary (ids 0 to "
                               f"{self.vocab - 1})", param="prompt")  # fmt: skip
        # Text is encoded as pre-trained, BOS and all; token ids are taken as they are.
        ids = [self.encode(p, add_special_tokens=True) if isinstance(p, str) else p for p in prompts]
        return self.jobs(request, ids, request.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt", self.worker.stop_ids,
                         echo=bool(request.echo))  # fmt: skip

    async def prepare(self, make: Callable[[Any], list[Job]], request: SamplingRequest) -> list[Job]:
        """``make(request)`` in a thread: chat templates and tokenizers are slow on long inputs."""
        return _bound(await asyncio.to_thread(make, request))

    async def prepare_chat(self, request: ChatRequest) -> tuple[list[Job], CallReader | None]:
        jobs, reader = await asyncio.to_thread(self.chat_jobs, request)
        return _bound(jobs), reader

    async def results(self, jobs: list[Job], request: Request) -> list[Choice]:
        """The choices of ``jobs``; if the client leaves first, its jobs are cancelled, queued or running."""
        self.worker.submit(jobs)
        watcher = asyncio.create_task(_cancel_when_gone(request, jobs))
        choices: list[Choice] = []
        try:
            for job in jobs:
                kind, payload = await job.events.get()
                if kind == "error":
                    raise payload
                choices += payload
        finally:
            watcher.cancel()
            _cancel(jobs)
        return choices


def _bound(jobs: list[Job]) -> list[Job]:
    """``jobs``, reporting to the running event loop (they are made in a thread, off the loop)."""
    loop = asyncio.get_running_loop()
    for job in jobs:
        job.loop = loop
    return jobs


async def _cancel_when_gone(request: Request, jobs: list[Job]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    _cancel(jobs)


def _cancel(jobs: list[Job]) -> None:
    for job in jobs:
        job.cancelled = True


def _usage(jobs: list[Job], choices: list[Choice]) -> dict[str, int]:
    prompt = sum(len(job.prompt_ids) for job in jobs)  # counted once per prompt, not once per choice
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _stream(server: _Server, jobs: list[Job], head: dict, chunk: Callable[..., dict], opening: list[dict],
                  include_usage: bool, reader: CallReader | None = None) -> AsyncIterator[str]:  # fmt: skip
    """Server-sent events: ``opening`` chunks, one chunk per piece of text (with its tokens' log-
    probabilities when asked for), a finishing chunk per choice, the usage chunk if asked for, then
    ``[DONE]``. With a ``reader`` (chat with tools) each choice's text passes through a
    `CallStream`, which holds back what may be a call and sends calls as ``tool_calls`` deltas. A
    client that goes away cancels its jobs (queued by the caller, so that a full queue is a 429
    before the stream begins)."""
    choices: list[Choice] = []
    offsets: dict[int, int] = {}  # characters of each choice's tokens sent so far: their text_offset
    calls: dict[int, CallStream] = {}
    try:
        for data in opening:
            yield sse({**head, **data})
        for job in jobs:
            while (event := await job.events.get())[0] == "delta":
                _, index, text, tokens = event
                if reader is not None:
                    text, tokens = calls.setdefault(index, CallStream(reader, index)).feed(text, tokens)
                    if not text and not tokens:
                        continue
                start = offsets.get(index, 0)
                offsets[index] = start + sum(len(t.token) for t in tokens or ())
                yield sse({**head, **chunk(index, text, None, tokens, start)})
            if event[0] == "error":  # the status line went out with the first chunk: the error is an event
                error = event[1]
                yield sse({"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}})
                return
            for choice in event[1]:
                if reader is None:
                    yield sse({**head, **chunk(choice.index, None, choice.finish_reason)})
                    continue
                for data in calls.setdefault(choice.index, CallStream(reader, choice.index)).finish(choice.finish_reason):
                    yield sse({**head, **data})
            choices += event[1]
        if include_usage:
            yield sse({**head, "choices": [], "usage": _usage(jobs, choices)})
        yield sse("[DONE]")
    finally:
        _cancel(jobs)


def _streaming_response(server: _Server, jobs: list[Job], events: AsyncIterator[str]) -> StreamingResponse:
    server.worker.submit(jobs)
    # The background task also runs when the client left before the stream began.
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                             background=BackgroundTask(_cancel, jobs))  # fmt: skip


def create_app(model: Any, tokenizer: Any, *, model_name: str, api_key: str | None = None,
               max_prompt_tokens: int | None = None, limits: ServeLimits | None = None,
               hosts: tuple[str, ...] | None = LOCAL_HOSTS, origins: tuple[str, ...] = (),
               docs: bool = False) -> FastAPI:  # fmt: skip
    """The FastAPI app serving ``model`` under ``model_name``. The model's worker thread starts and
    stops with the app (its lifespan), so run it with uvicorn or another ASGI server.

    ``limits`` bound each request (`ServeLimits`: n, max_tokens, prompts, stop strings, body size,
    queue; its connection limits apply through `uvicorn_server`). ``hosts`` are the Host header names
    answered (None: any; a wrong one is a 400), and a browser request whose Origin is neither the
    server's own nor in ``origins`` is a 403: together they keep web pages the user visits from
    driving the server. ``docs`` serves ``/docs`` and
    ``/openapi.json`` (off by default; behind the API key when there is one)."""
    if not model_name:
        raise LiandanError("--model-name must not be empty")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise LiandanError(f"--max-prompt-tokens must be at least 1 (got {max_prompt_tokens})")
    limits = limits or ServeLimits()
    lock = threading.Lock()  # the tokenizer is shared by the handlers and the worker
    server = _Server(model, tokenizer, model_name, max_prompt_tokens, Worker(model, tokenizer, lock, limits), lock,
                     context=context_length(model), limits=limits,
                     chat_stop_ids=chat_stop_ids(tokenizer, getattr(model, "generation_config", None)),
                     vocab=min(len(tokenizer), model.get_input_embeddings().num_embeddings))  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.worker.start()
        try:
            yield
        finally:
            server.worker.stop()

    off = {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="liandan serve", lifespan=lifespan, **({} if docs else off))
    app.state.server = server  # what tests look into (the queue)
    app.add_middleware(AnswerBugs, log=log)  # the innermost: 500s say nothing of the internals
    if api_key:
        app.add_middleware(RequireApiKey, api_key=api_key)
    # Added last, so it runs first: a request from another site is refused before the key is looked at.
    app.add_middleware(GuardRequests, hosts=hosts, max_body_bytes=limits.max_body_bytes,
                       origins=tuple(web_origin(o) for o in origins))  # fmt: skip
    add_error_handlers(app)
    _add_routes(app, server)
    return app


def _add_routes(app: FastAPI, server: _Server) -> None:
    created = int(time.time())

    def card() -> dict:
        return {"id": server.name, "object": "model", "created": created, "owned_by": "liandan"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        if name != server.name:
            raise ApiError(404, f"model '{name}' is not served here; this server serves '{server.name}'",
                           param="model", code="model_not_found")  # fmt: skip
        return card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, http: Request) -> Any:
        jobs, reader = await server.prepare_chat(request)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.name}
        if request.stream:
            opening = [{"choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]} for i in range(request.n or 1)]  # fmt: skip
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            head["object"] = "chat.completion.chunk"
            events = _stream(server, jobs, head, chat_chunk, opening, include_usage, reader)
            return _streaming_response(server, jobs, events)
        choices = await server.results(jobs, http)
        return {**head, "object": "chat.completion", "usage": _usage(jobs, choices),
                "choices": [_chat_choice(c, reader, bool(request.logprobs)) for c in choices]}  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request) -> Any:
        jobs = await server.prepare(server.completion_jobs, request)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": server.name}  # fmt: skip
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return _streaming_response(server, jobs, _stream(server, jobs, head, completion_chunk, [], include_usage))
        choices = await server.results(jobs, http)
        return {**head, "usage": _usage(jobs, choices), "choices": [
            {"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
             "logprobs": None if request.logprobs is None else completion_logprobs(c.logprobs)} for c in choices]}  # fmt: skip


def _chat_choice(choice: Choice, reader: CallReader | None, logprobs: bool) -> dict:
    """A finished choice as OpenAI writes it; with a ``reader``, its calls as ``tool_calls``."""
    if reader is None:
        message, finish_reason = {"role": "assistant", "content": choice.text}, choice.finish_reason
    else:
        message, finish_reason = reader.message(choice.text, choice.finish_reason)
    return {"index": choice.index, "message": message, "logprobs": chat_logprobs(choice.logprobs) if logprobs else None,
            "finish_reason": finish_reason}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Entry point


def default_model_name(spec: str | None) -> str:
    """The name clients pass as ``model``: ``default``, a hub id as given, else the directory's (or
    file's) name, so ``runs/my-sft`` is served as ``my-sft``."""
    if spec in (None, "", "default"):
        return "default"
    path = Path(spec).expanduser()
    return path.resolve().name if path.exists() else spec


def serve(spec: str = "default", *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          dtype: str = "auto", device: str = "auto", model_name: str | None = None,
          max_prompt_tokens: int | None = None, limits: ServeLimits | None = None,
          extra_hosts: Sequence[str] | None = None, origins: Sequence[str] | None = None, docs: bool = False,
          tools_template: str | None = None) -> None:  # fmt: skip
    """Load ``spec`` with `liandan.models.load_model` and serve it on ``host:port`` until interrupted.

    ``limits``, ``origins`` and ``docs`` are `create_app`'s; the connection limits are applied as in
    `uvicorn_server`. The Host names answered are the localhost names, ``host`` itself and
    ``extra_hosts`` (``"*"``: any); any name when ``host`` is 0.0.0.0 or ::. ``tools_template``
    (``chatml`` or a ``.jinja`` file) is given to a model whose own template renders no tools, as
    `liandan.tools.with_tools_template` does. Every option is checked before the model loads."""
    if not 0 < port < 65536:
        raise LiandanError(f"--port {port}: expected a port number from 1 to 65535")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise LiandanError(f"--max-prompt-tokens must be at least 1 (got {max_prompt_tokens})")
    if tools_template and tools_template not in BUILTIN_TEMPLATES and not (
            tools_template.endswith(".jinja") and Path(tools_template).is_file()):  # fmt: skip
        raise LiandanError(f"--tools-template {tools_template!r}: expected {', '.join(BUILTIN_TEMPLATES)} or a .jinja file")
    hosts, origins = allowed_hosts(host, tuple(extra_hosts or ())), tuple(web_origin(o) for o in origins or ())
    check_models([spec])
    model, tokenizer = load_model(spec, device=device, dtype=dtype)
    tools_note = with_tools_template(tokenizer, tools_template, where="--tools-template")
    name = model_name or default_model_name(spec)
    app = create_app(model, tokenizer, model_name=name, api_key=api_key, max_prompt_tokens=max_prompt_tokens,
                     limits=limits, hosts=hosts, origins=origins, docs=docs)  # fmt: skip
    print(f"serving '{name}' at http://{host}:{port}/v1 (OpenAI API: /v1/models, /v1/chat/completions, "
          "/v1/completions); Ctrl+C stops it", flush=True)  # fmt: skip
    if not has_chat_template(tokenizer):
        print("note: the model has no chat template: chat requests are rendered as ChatML text", flush=True)
    if tools_template:
        note = tools_note or "the model's own chat template renders tools, so --tools-template changes nothing"
        print(f"note: {note}", flush=True)
    if host not in LOCAL_HOSTS and not api_key:
        print(f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model",
              flush=True)  # fmt: skip
    try:
        uvicorn_server(app, host=host, port=port, log_level="info").run()
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        raise LiandanError(f"could not listen on {host}:{port} (is the port in use? choose another with --port)") from exc
