"""liandan serve's command line (--limit, --allow-host, --allow-origin, --docs) and what uvicorn is
run with: a cap on open connections, the keep-alive timeout, the header size, and queued jobs
answered with a 503 when the server shuts down."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from typer.testing import CliRunner

import liandan.serve
from liandan.cli import app as cli
from liandan.errors import LiandanError
from liandan.models import load_model
from liandan.openai_api import ServeLimits, parse_limits
from liandan.serve import create_app
from liandan.serve_http import allowed_hosts, uvicorn_server, web_origin

HELLO = [{"role": "user", "content": "Question 3?"}]


@contextmanager
def served(app):
    """Run ``app`` as `serve` runs it, in a thread on a port the OS picked; yield (address, server)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn_server(app, log_level="warning", lifespan="on")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive())
    try:
        yield sock.getsockname(), server
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "the server did not shut down"


def wait_for(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def request(address, path: str = "/v1/models", body: dict | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    """One HTTP/1.1 request on its own connection; (status, body). Headers as given, Host included."""
    data = b"" if body is None else json.dumps(body).encode()
    head = {"Host": f"127.0.0.1:{address[1]}", "Connection": "close", **(headers or {})}
    if body is not None:
        head |= {"Content-Type": "application/json", "Content-Length": str(len(data))}
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
    with socket.create_connection(address, timeout=60) as sock:
        sock.sendall(f"{'POST' if body is not None else 'GET'} {path} HTTP/1.1\r\n{lines}\r\n".encode() + data)
        answer = read_all(sock)
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2]


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def chat(address, model: str, **options) -> tuple[int, dict]:
    status, body = request(address, "/v1/chat/completions", {"model": model, "messages": HELLO, **options})
    return status, json.loads(body)


# ---------------------------------------------------------------------------------------------
# --limit KEY=VALUE


def test_parse_limits_sets_only_the_limits_named():
    assert parse_limits(None) == ServeLimits() == parse_limits([])
    limits = parse_limits(["max_n=4", " max_queued = 128", "keep_alive_s=2"])
    assert (limits.max_n, limits.max_queued, limits.keep_alive_s, limits.max_tokens) == (4, 128, 2, 4096)
    assert limits.connections == 512  # 4 x max_queued unless set
    assert parse_limits(["max_connections=10"]).connections == 10
    assert parse_limits(["max_n=1", "max_n=3"]).max_n == 3  # the last one wins, as with any repeated option


@pytest.mark.parametrize(
    ("item", "message"),
    [("max_nn=4", "--limit max_nn=4: unknown limit 'max_nn' (did you mean 'max_n'?); the limits are max_n, max_tokens, "),
     ("colour=red", "unknown limit 'colour'; the limits are max_n, "),
     ("max_n", "--limit max_n: expected KEY=VALUE"),
     ("max_n=0", "--limit max_n=0: max_n must be a whole number of at least 1 (got '0')"),
     ("max_queued=lots", "max_queued must be a whole number of at least 1 (got 'lots')"),
     ("max_tokens=1.5", "max_tokens must be a whole number"),
     ("max_connections=-1", "max_connections must be a whole number")],
)  # fmt: skip
def test_a_bad_limit_is_one_line_naming_it(item, message):
    with pytest.raises(LiandanError) as caught:
        parse_limits([item])
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--limit", "max_queue=9"], "unknown limit 'max_queue' (did you mean 'max_queued'?)"),
     (["--limit", "max_n=none"], "max_n must be a whole number"),
     (["--allow-origin", "*"], "--allow-origin '*': expected a web page's origin"),
     (["--allow-origin", "https://app.example.com/chat"], "expected a web page's origin"),
     (["--allow-host", "my-box.lan:8000"], "--allow-host 'my-box.lan:8000': expected a host name or address without"),
     (["--allow-host", "http://my-box.lan"], "expected a host name"),
     (["--tools-template", "hermes"], "--tools-template 'hermes': expected chatml or a .jinja file")],
)  # fmt: skip
def test_bad_serve_options_exit_2_before_the_model_is_looked_at(args, message):
    """The model does not exist: its error would come first if the options were checked later."""
    result = CliRunner().invoke(cli, ["serve", "/no/such/model", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "no/such/model" not in result.output


def test_origins_and_host_names_are_written_as_browsers_send_them():
    assert web_origin("https://App.Example.com/") == "https://app.example.com"
    assert web_origin(" http://localhost:3000 ") == "http://localhost:3000"
    assert allowed_hosts("127.0.0.1", ["My-Box.lan", "[fe80::1]"])[-2:] == ("my-box.lan", "fe80::1")
    for bad in ("user@https://x.example", "https://x.example?a=1", "localhost:3000"):
        with pytest.raises(LiandanError):
            web_origin(bad)
    with pytest.raises(LiandanError):
        allowed_hosts("127.0.0.1", [""])


def test_the_serve_help_names_the_new_options():
    text = " ".join(CliRunner().invoke(cli, ["serve", "--help"], env={"COLUMNS": "200"}).output.split())
    for option in ("--limit", "--allow-host", "--allow-origin", "--docs", "--tools-template", "max_connections=4 x max_queued"):
        assert option in text


def test_the_command_line_reaches_the_running_server(chat_model_dir, monkeypatch):
    """``liandan serve`` with --limit, --allow-host, --allow-origin and --docs, run as a user runs it:
    each one changes what the server answers."""
    started = []

    def recorded(app, **config):
        started.append(uvicorn_server(app, **config))
        return started[-1]

    monkeypatch.setattr(liandan.serve, "uvicorn_server", recorded)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # free again for the server (another process taking it in between would fail the test loudly)
    args = ["serve", str(chat_model_dir), "--port", str(port), "--device", "cpu", "--model-name", "m", "--limit", "max_n=2",
            "--limit", "max_connections=5", "--allow-host", "my-box.lan", "--allow-origin", "http://localhost:3000", "--docs"]  # fmt: skip
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(CliRunner().invoke, cli, args)
        wait_for(lambda: (started and started[0].started) or running.done(), seconds=120)
        assert not running.done(), running.result().output
        address = ("127.0.0.1", port)
        try:
            status, body = chat(address, "m", n=3, max_tokens=1)
            assert status == 400 and body["error"]["param"] == "n" and "at most 2" in body["error"]["message"]
            assert chat(address, "m", n=2, max_tokens=1)[0] == 200
            assert request(address, headers={"Host": "my-box.lan:8000"})[0] == 200
            assert request(address, headers={"Host": "other-box.lan"})[0] == 400
            assert request(address, headers={"Origin": "http://localhost:3000"})[0] == 200
            assert request(address, headers={"Origin": "http://localhost:3001"})[0] == 403
            assert request(address, "/openapi.json")[0] == 200
            assert started[0].config.limit_concurrency == 6  # max_connections=5: uvicorn counts the one asking
        finally:
            started[0].should_exit = True
        result = running.result(timeout=60)
    assert result.exit_code == 0, result.output
    assert f"serving 'm' at http://127.0.0.1:{port}/v1" in result.output


# ---------------------------------------------------------------------------------------------
# Connections: uvicorn's own limits, as `serve` sets them


@pytest.fixture(scope="module")
def gated(chat_model_dir):
    """The random chat model; ``model.generate`` waits while ``gate`` is clear, and sets ``entered``."""
    model, tokenizer = load_model(str(chat_model_dir), device="cpu", dtype="float32")
    gate, entered = threading.Event(), threading.Event()
    gate.set()
    original = model.generate

    def gated_generate(**kwargs):
        entered.set()
        assert gate.wait(timeout=60)
        return original(**kwargs)

    model.generate = gated_generate
    return model, tokenizer, gate, entered


def test_a_connection_over_the_cap_is_503_and_the_server_answers_again_after(gated):
    model, tokenizer, *_ = gated
    limits = ServeLimits(max_connections=2, max_queued=1)
    with served(create_app(model, tokenizer, model_name="m", limits=limits)) as (address, server):
        idle = [socket.create_connection(address)]  # a client that connected and sent nothing yet
        wait_for(lambda: len(server.server_state.connections) == 1)
        assert request(address)[0] == 200  # two open: the cap
        idle.append(socket.create_connection(address))
        wait_for(lambda: len(server.server_state.connections) == 2)
        status, body = request(address)  # a third
        assert status == 503 and b"Service Unavailable" in body
        for sock in idle:
            sock.close()
        wait_for(lambda: not server.server_state.connections)
        assert request(address)[0] == 200
        assert chat(address, "m", max_tokens=1)[0] == 200


def test_an_idle_connection_is_closed_after_keep_alive_s(gated):
    model, tokenizer, *_ = gated
    with served(create_app(model, tokenizer, model_name="m", limits=ServeLimits(keep_alive_s=1))) as (address, _):
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{address[1]}\r\n\r\n".encode())
            answer = b""
            while not answer.endswith(b"]}"):  # the whole response: the headers and the JSON list of models
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200")
            began = time.monotonic()
            assert sock.recv(65536) == b""  # closed by the server, not by the 10 s timeout
            assert 0.5 < time.monotonic() - began < 5


def test_headers_still_incomplete_after_max_header_bytes_are_400(gated):
    """A client trickling headers that never end is cut off once it has sent max_header_bytes."""
    model, tokenizer, *_ = gated

    def trickle(address, padding: int, finish: bool) -> bytes:
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{address[1]}\r\nX-Padding: {'x' * padding}".encode())
            if finish:
                time.sleep(0.3)  # the server reads the first part on its own: headers still incomplete
                sock.sendall(b"\r\nConnection: close\r\n\r\n")
            return read_all(sock)  # (unfinished: the server must answer and close by itself)

    with served(create_app(model, tokenizer, model_name="m", limits=ServeLimits(max_header_bytes=2048))) as (address, _):
        assert trickle(address, 1500, finish=True).startswith(b"HTTP/1.1 200")
        assert trickle(address, 3000, finish=False).startswith(b"HTTP/1.1 400")
        assert request(address)[0] == 200


def test_a_connection_slow_to_send_its_headers_is_closed(gated):
    """Slowloris: a client that connects and sends nothing, or trickles a header that never ends,
    loses its connection after header_timeout_s; one that keeps its connection open after a
    response gets the same deadline for its next request."""
    model, tokenizer, *_ = gated
    limits = ServeLimits(header_timeout_s=1, keep_alive_s=30)
    with served(create_app(model, tokenizer, model_name="m", limits=limits)) as (address, server):
        silent = socket.create_connection(address, timeout=10)
        trickling = socket.create_connection(address, timeout=10)
        trickling.sendall(f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{address[1]}\r\nX-Slow: a".encode())
        kept = socket.create_connection(address, timeout=10)
        kept.sendall(f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{address[1]}\r\n\r\n".encode())
        answer = b""
        while not answer.endswith(b"]}"):
            answer += kept.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        began = time.monotonic()
        for sock in (silent, trickling, kept):  # closed by the server well before keep_alive_s or the 10 s timeout
            assert sock.recv(65536) == b""
            sock.close()
        assert time.monotonic() - began < 5
        wait_for(lambda: not server.server_state.connections)
        assert request(address)[0] == 200  # the server itself goes on answering


# ---------------------------------------------------------------------------------------------
# Shutdown


def test_shutdown_answers_queued_jobs_503_at_once_and_lets_the_running_one_finish(gated):
    model, tokenizer, gate, entered = gated
    gate.clear()
    entered.clear()
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            with served(create_app(model, tokenizer, model_name="m")) as (address, server):
                running = pool.submit(chat, address, "m", max_tokens=2)
                wait_for(entered.is_set)  # held in generate
                queued = pool.submit(chat, address, "m", max_tokens=2)
                wait_for(lambda: server.worker.held == 2)  # one running, one queued
                server.should_exit = True
                status, body = queued.result(timeout=10)  # while the running job is still held at the gate
                assert status == 503 and body["error"]["code"] == "server_shutting_down"
                assert "shutting down" in body["error"]["message"] and set(body["error"]) == {"message", "type", "param", "code"}
                assert not running.done()
                gate.set()
                status, body = running.result(timeout=30)
                assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    finally:
        gate.set()
