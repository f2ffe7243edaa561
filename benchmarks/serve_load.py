"""Load test of ``liandan serve`` on loopback: many concurrent clients, a fifth of the requests
malformed or abusive. Every answer must be the status it should be, the server's resident memory
must stay bounded and the server must keep answering. Prints p50/p99 latency and throughput.

    python benchmarks/serve_load.py                         # the tiny test model, 32 clients, 320 requests
    python benchmarks/serve_load.py runs/my-sft --clients 32 --requests 500

The server runs as its own process (``liandan serve``), so its memory is measured alone.
"""

from __future__ import annotations

import argparse
import http.client
import json
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
HELLO = [{"role": "user", "content": "Question 3?"}]


def tiny_model(where: Path) -> Path:
    """The random tiny chat model the tests use (tests/conftest.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import CHATML, build_model_dir

    return build_model_dir(where, CHATML, "<|im_end|>")


def start_server(model: str, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "liandan.cli", "serve", model, "--port", str(port), "--model-name", "m",
               "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if request(port, "GET", "/v1/models")[0] == 200:
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start")


def request(port: int, method: str, path: str, body: dict | bytes | None = None, headers: dict | None = None,
            timeout: float = 120) -> tuple[int, bytes]:  # fmt: skip
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def huge_body(port: int, size: int = 10 * 1024 * 1024) -> tuple[int, bytes]:
    """POSTs ``size`` bytes, stopping as soon as the server answers (it should, after the headers)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode())  # fmt: skip
        chunk, sent = b"x" * 65536, 0
        while sent < size and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer and (data := sock.recv(65536)):
                answer += data
        except ConnectionResetError:
            pass
        if not answer.startswith(b"HTTP/1.1 "):
            return -1, answer  # reset before an answer came
        return int(answer.split(b" ")[1]), answer
    finally:
        sock.close()


def leave_mid_request(port: int, stream: bool) -> tuple[int, bytes]:
    """Sends a long request and leaves before the answer: nothing to check but that the server goes on."""
    body = json.dumps({"model": "m", "messages": HELLO, "max_tokens": 200, "stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
    time.sleep(0.05)
    sock.close()
    return 0, b""


def plan(i: int, port: int) -> tuple[str, set[int], object]:
    """Request ``i``: its kind, the statuses it may get, and a callable that sends it."""
    chat = {"model": "m", "messages": [{"role": "user", "content": f"Question {i}?"}], "max_tokens": 16}
    ok = {200, 429}
    if i % 5:  # four in five are well-formed
        kind = ("chat", "chat-stream", "completion", "completions-2")[i % 4]
        if kind == "chat":
            return kind, ok, lambda: request(port, "POST", "/v1/chat/completions", chat)
        if kind == "chat-stream":
            return kind, ok, lambda: request(port, "POST", "/v1/chat/completions", {**chat, "stream": True})
        prompts = "Once upon a time" if kind == "completion" else ["Once upon", "Hello world"]
        return kind, ok, lambda: request(port, "POST", "/v1/completions", {"model": "m", "prompt": prompts, "max_tokens": 16})
    abuse = [
        ("huge-n", {400}, lambda: request(port, "POST", "/v1/chat/completions", {**chat, "n": 100000})),
        ("huge-max_tokens", {400}, lambda: request(port, "POST", "/v1/chat/completions", {**chat, "max_tokens": 10**9})),
        ("10MB-body", {413}, lambda: huge_body(port)),
        ("cross-site-origin", {403}, lambda: request(port, "POST", "/v1/chat/completions", chat, {"Origin": "https://x.example"})),
        ("wrong-host", {400}, lambda: request(port, "POST", "/v1/chat/completions", chat, {"Host": "evil.example"})),
        ("leave-mid-request", {0}, lambda: leave_mid_request(port, stream=False)),
        ("leave-mid-stream", {0}, lambda: leave_mid_request(port, stream=True)),
        ("1000-prompts", {400}, lambda: request(port, "POST", "/v1/completions", {"model": "m", "prompt": ["a"] * 1000})),
        ("bad-json", {400}, lambda: request(port, "POST", "/v1/chat/completions", b"{nope")),
        ("docs", {404}, lambda: request(port, "GET", "/openapi.json")),
    ]
    return abuse[(i // 5) % len(abuse)]


def run(model: str, port: int, clients: int, requests: int) -> int:
    server = start_server(model, port)
    memory, peak, stop = psutil.Process(server.pid), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], memory.memory_info().rss)
            time.sleep(0.05)

    try:
        for _ in range(5):  # warm up
            request(port, "POST", "/v1/chat/completions", {"model": "m", "messages": HELLO, "max_tokens": 16})
        before = memory.memory_info().rss
        threading.Thread(target=sample, daemon=True).start()
        results: list[tuple[str, int, set[int], float]] = []

        def one(i: int) -> None:
            kind, expected, send = plan(i, port)
            started = time.perf_counter()
            try:
                status = send()[0]
            except OSError as exc:
                status = -2 if kind not in ("leave-mid-request", "leave-mid-stream") else 0
                print(f"  {kind}: {type(exc).__name__}: {exc}")
            results.append((kind, status, expected, time.perf_counter() - started))

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            list(pool.map(one, range(requests)))
        elapsed = time.perf_counter() - started
        stop.set()
        after = request(port, "POST", "/v1/chat/completions", {"model": "m", "messages": HELLO, "max_tokens": 4})[0]
        return report(results, elapsed, before, peak[0], memory.memory_info().rss, after, clients)
    finally:
        stop.set()
        server.terminate()
        server.wait(timeout=30)


def report(results: list, elapsed: float, before: int, peak: int, end: int, after: int, clients: int) -> int:
    wrong = [(kind, status, expected) for kind, status, expected, _ in results if status not in expected]
    good = sorted(seconds for kind, status, _, seconds in results if status == 200)
    by_kind = Counter((kind, status) for kind, status, _, _ in results)
    print(f"{len(results)} requests from {clients} clients in {elapsed:.1f} s: {len(results) / elapsed:.1f} requests/s, "
          f"{len(good) / elapsed:.1f} answered 200/s")  # fmt: skip
    if good:
        p99 = statistics.quantiles(good, n=100)[98] if len(good) > 1 else good[0]
        print(f"latency of the 200s: p50 {statistics.median(good) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    refused = sorted(seconds for _, status, _, seconds in results if 400 <= status < 500)
    if len(refused) > 1:  # refusals must not wait behind the model's queue
        p99 = statistics.quantiles(refused, n=100)[98]
        print(f"latency of the 4xx: p50 {statistics.median(refused) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    print(f"server RSS: {before / 2**20:.0f} MiB before, {peak / 2**20:.0f} MiB peak, {end / 2**20:.0f} MiB after")
    for (kind, status), count in sorted(by_kind.items()):
        print(f"  {kind:20} {status:4}  x{count}")
    print(f"a request after the load: {after}")
    limit = 512 * 2**20
    failed = bool(wrong) or after != 200 or peak - before > limit
    for kind, status, expected in wrong:
        print(f"WRONG: {kind} answered {status}, expected one of {sorted(expected)}")
    if peak - before > limit:
        print(f"WRONG: the server grew by {(peak - before) / 2**20:.0f} MiB (limit {limit / 2**20:.0f})")
    print("FAILED" if failed else "OK")
    return int(failed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="model to serve (default: the tiny random test model)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    args = parser.parse_args()
    port = args.port
    if not port:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(tiny_model(Path(tmp) / "tiny"))
        sys.exit(run(model, port, args.clients, args.requests))


if __name__ == "__main__":
    main()
