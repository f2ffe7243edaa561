"""The HTTP layer under `liandan serve`, apart from the OpenAI wire format: the guards that keep the
local server for its user and within its limits, and the uvicorn server it runs on.

    from liandan.serve_http import allowed_hosts, uvicorn_server
    allowed_hosts("127.0.0.1", ("my-box.lan",))  # ('localhost', '127.0.0.1', '::1', 'my-box.lan')
    uvicorn_server(create_app(model, tokenizer, model_name="m"), host="127.0.0.1", port=8000).run()

`RequireApiKey` is the API-key check; `GuardRequests` refuses, before a body is read, requests from
other sites (Host and Origin checks, so that a web page the user visits cannot drive the server) and
bodies that are too large; `AnswerBugs` answers an error no handler answered with a 500 in OpenAI's
shape, and `add_error_handlers` the errors FastAPI answers itself. `uvicorn_server` runs an app of
`liandan.serve.create_app` with the connection limits of its `ServeLimits`, a deadline for each
request's line and headers, and the jobs still queued at shutdown answered with a 503.
"""

from __future__ import annotations

import logging
import secrets
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import LiandanError
from .openai_api import ApiError, error_response, validation_error

if TYPE_CHECKING:  # the worker runs the model: torch, needed here only for a type
    from .serve_worker import Worker


# ---------------------------------------------------------------------------------------------
# Guards: ASGI middleware, run before the app


class RequireApiKey:
    """ASGI middleware: every request (``/v1`` and any other path) needs ``Authorization: Bearer KEY``.
    It runs before the body is read, so a caller without the key learns nothing about what it sent."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if not auth:
                response = error_response(401, "missing API key: send the header 'Authorization: Bearer KEY'")
                return await response(scope, receive, send)
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                response = error_response(401, "incorrect API key", code="invalid_api_key")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class AnswerBugs:
    """ASGI middleware: an exception no handler answered becomes a 500 that says only that it
    happened; the traceback goes to ``log``. (Starlette's own handler re-raises, and uvicorn then
    drops the connection.)"""

    def __init__(self, app: Any, log: logging.Logger) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        started = False

        async def watched_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception:
            self.log.exception("internal error answering %s %s", scope.get("method"), scope.get("path"))
            if started or scope["type"] != "http":
                return
            response = error_response(500, "internal error (the server's log has the details)", type="server_error")
            await response(scope, receive, send)


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
ANY_HOST = ("0.0.0.0", "::", "")


def allowed_hosts(bind_host: str, extra: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """Host header names the server answers to: the localhost names, the address it is bound to, and
    ``extra``; None (any) when it listens on every address, as its name on the network is not known."""
    if bind_host in ANY_HOST or "*" in extra:
        return None
    for name in extra:  # the Host header's port is dropped before the check, so a name with one never matches
        if not name or any(c in name for c in "/ @") or name.count(":") == 1:
            raise LiandanError(f"--allow-host {name!r}: expected a host name or address without scheme or port, "
                               "e.g. my-box.lan or 192.168.1.5 ('*': any name)")  # fmt: skip
    return tuple(dict.fromkeys((*LOCAL_HOSTS, bind_host.strip("[]").lower(), *(h.strip("[]").lower() for h in extra))))


def web_origin(origin: str) -> str:
    """``"https://App.example.com/"`` -> ``"https://app.example.com"``, the form a browser sends in
    ``Origin``; anything else (a path, no scheme, ``*``) is a `LiandanError`, as it would never match."""
    parts = urllib.parse.urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc or parts.path not in ("", "/") \
            or parts.query or parts.fragment:  # fmt: skip
        raise LiandanError(f"--allow-origin {origin!r}: expected a web page's origin: scheme, host and port if not "
                           "the default, e.g. https://app.example.com or http://localhost:3000")  # fmt: skip
    return f"{parts.scheme}://{parts.netloc}".lower()


def _host_name(host: str) -> str:
    """``"127.0.0.1:8000"`` -> ``"127.0.0.1"``, ``"[::1]:8000"`` -> ``"::1"``."""
    if host.startswith("["):
        return host[1 : host.find("]")].lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


class GuardRequests:
    """ASGI middleware that refuses, before the body is read:

    - a ``Host`` header not in ``hosts`` (400): a web page that rebinds its own DNS name to
      127.0.0.1 cannot reach the server under that name;
    - a browser request from another site (403): an ``Origin`` other than the server's own (the
      scheme and ``Host`` the request came to, or one of ``origins``), or ``Sec-Fetch-Site: cross-site``;
    - a body over ``max_body_bytes`` (413), by ``Content-Length`` or, for a chunked body, while it
      arrives (a chunked body is read here, at most ``max_body_bytes``, and handed on whole).
    """

    def __init__(self, app: Any, hosts: tuple[str, ...] | None, max_body_bytes: int, origins: tuple[str, ...] = ()) -> None:
        self.app, self.hosts, self.max_body, self.origins = app, hosts, max_body_bytes, origins

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal, receive = await self._check(scope, receive)
        if refusal is not None:
            return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    async def _check(self, scope: dict, receive: Callable) -> tuple[JSONResponse | None, Callable]:
        headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get(b"host", "")
        if self.hosts is not None and _host_name(host) not in self.hosts:
            return error_response(400, f"this server does not answer to the host name '{host[:100]}'; it answers to "
                                  f"{', '.join(self.hosts)}", code="invalid_host"), receive  # fmt: skip
        origin = headers.get(b"origin")
        own = f"{scope.get('scheme', 'http')}://{host}".lower()
        if (origin is not None and origin.lower() not in (own, *self.origins)) or (
                origin is None and headers.get(b"sec-fetch-site") == "cross-site"):  # fmt: skip
            return error_response(403, f"cross-site requests are refused (Origin '{(origin or '')[:100]}' is not "
                                  f"this server's '{own}')", code="cross_origin_refused"), receive  # fmt: skip
        length = headers.get(b"content-length")
        too_large = error_response(413, f"the request body is larger than this server accepts ({self.max_body} bytes)",
                                   code="request_too_large")  # fmt: skip
        if length is not None:
            return (too_large if not length.isdigit() or int(length) > self.max_body else None), receive
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return None, receive
        return await self._read_chunked(receive, too_large)

    async def _read_chunked(self, receive: Callable, too_large: JSONResponse) -> tuple[JSONResponse | None, Callable]:
        chunks, size, message = [], 0, {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":
                return None, receive  # the client left; the app will see that
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return too_large, receive
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return None, replay


# ---------------------------------------------------------------------------------------------
# Errors in OpenAI's shape, for those FastAPI answers itself


def add_error_handlers(app: FastAPI) -> None:
    """A body that fails validation, an `ApiError` and FastAPI's own HTTP errors (an unknown path, a
    wrong method) answered as ``{"error": {...}}``, as OpenAI answers them."""
    @app.exception_handler(RequestValidationError)
    async def on_invalid(request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc)

    @app.exception_handler(ApiError)
    async def on_api_error(request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, type=exc.type,
                              headers=exc.headers)  # fmt: skip

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, exc: StarletteHTTPException) -> JSONResponse:
        response = error_response(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response


# ---------------------------------------------------------------------------------------------
# The uvicorn server


def uvicorn_server(app: FastAPI, **config: Any) -> uvicorn.Server:
    """uvicorn's server for an app of `liandan.serve.create_app`, with the connection limits of its
    `ServeLimits` (at most ``connections`` open, ``keep_alive_s``, ``max_header_bytes``); ``config`` is
    the rest of `uvicorn.Config` (host, port, log_level). At shutdown, jobs still queued are answered
    with a 503."""
    server = app.state.server  # create_app's: its limits and its worker
    limits = server.limits
    protocol = type("HeaderDeadlineH11", (_HeaderDeadline,), {"header_timeout_s": limits.header_timeout_s})
    return _ClosingServer(server.worker, uvicorn.Config(
        app, http=protocol,  # h11, the parser max_header_bytes is for (httptools, when installed, has its own)
        limit_concurrency=limits.connections + 1,  # uvicorn counts the connection asking among the open ones
        timeout_keep_alive=limits.keep_alive_s, h11_max_incomplete_event_size=limits.max_header_bytes, **config,
    ))  # fmt: skip


class _HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's line and headers: a connection
    that has not begun a request ``header_timeout_s`` after it opened, or after its last response
    ended, is closed (uvicorn's keep-alive timer stops at the first byte, so a client that trickles
    a header, or sends nothing at all, would otherwise hold its connection for ever)."""

    header_timeout_s = 10

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        waiting_after = self.cycle  # a new request replaces the cycle; until then, none has begun
        self.loop.call_later(self.header_timeout_s, self._header_deadline, waiting_after)

    def _header_deadline(self, waiting_after: Any) -> None:
        if self.cycle is waiting_after and not self.transport.is_closing():
            self.transport.close()


class _ClosingServer(uvicorn.Server):
    """Closes the worker's queue as shutdown begins. uvicorn waits for open requests to finish before
    the app's lifespan ends, and queued jobs would otherwise all run first (or, on a second Ctrl+C,
    get no answer at all)."""

    def __init__(self, worker: Worker, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.worker = worker

    async def shutdown(self, sockets: Any = None) -> None:
        self.worker.close()
        await super().shutdown(sockets)
