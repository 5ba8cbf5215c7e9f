"""The server's limits on 127.0.0.1: a large body is refused (413) without being read and without stalling
`/health`; a long text prompt is refused (400) before it is tokenized; and a small completion on an idle
engine answers in milliseconds, not after a poll interval; a bug answers 500 and keeps the connection."""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fastprompt.serve import Engine  # noqa: E402
from fastprompt.serve.server import create_app  # noqa: E402
from tests.serve.test_server import Server  # noqa: E402

MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def server(served):
    base, tokenizer, folders, _ = served
    engine = Engine(base, tokenizer, max_slots=4, max_len=48, max_queue=64)
    engine.load_adapter("a", folders["a"])
    running = Server(create_app(engine, request_timeout_s=60, max_body_bytes=MAX_BODY))
    host, port = running.url.removeprefix("http://").split(":")
    yield host, int(port), engine
    running.close()


def raw_post(host, port, headers: list[str], chunks, timeout=30.0) -> tuple[int, dict, bytes]:
    """POST the body chunks over a raw socket, stopping early once the server has answered; returns (status,
    headers, body) of the answer."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(["POST /v1/completions HTTP/1.1", f"Host: {host}",
                                   "Content-Type: application/json", *headers]) + "\r\n\r\n").encode())
        sock.setblocking(False)
        answer = b""
        for chunk in chunks:
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
            if answer:
                break
            try:
                sock.sendall(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
        sock.setblocking(True)
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
            answer += sock.recv(65536)
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        fields = dict(line.lower().split(": ", 1) for line in lines[1:])
        while len(body) < int(fields.get("content-length", 0)) and time.monotonic() < deadline:
            body += sock.recv(65536)
    return int(lines[0].split()[1]), fields, body


def test_large_bodies_are_refused_without_stalling_health(server):
    host, port, _ = server
    results, health = {}, []
    block = b" " * (256 * 1024)

    def declared():  # 40 MB announced by Content-Length: refused before any of it is read
        results["declared"] = raw_post(host, port, ["Content-Length: 40000000"],
                                       [b'{"model": "a", "prompt": "'] + [block] * 160)

    def chunked():  # 10 MB with no length given: refused once the bytes received pass the limit
        chunks = [b"%x\r\n%s\r\n" % (len(block), block)] * 40 + [b"0\r\n\r\n"]
        results["chunked"] = raw_post(host, port, ["Transfer-Encoding: chunked"], chunks)

    def long_prompt():  # under the body limit, but far more text than max_len tokens: refused untokenized
        body = json.dumps({"model": "a", "prompt": "good film " * 90_000, "max_tokens": 2}).encode()
        results["long_prompt"] = raw_post(host, port, [f"Content-Length: {len(body)}"], [body])

    def long_ids():
        body = json.dumps({"model": "a", "prompt": [5] * 200_000, "max_tokens": 2}).encode()
        results["long_ids"] = raw_post(host, port, [f"Content-Length: {len(body)}"], [body])

    senders = [threading.Thread(target=f) for f in (declared, chunked, long_prompt, long_ids) for _ in range(2)]
    stop = threading.Event()

    def poll():
        conn = http.client.HTTPConnection(host, port, timeout=30)
        while not stop.is_set() or len(health) < 3:   # a fast machine refuses every body within two polls
            start = time.perf_counter()
            conn.request("GET", "/health")
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())["status"] == "ok"
            health.append(time.perf_counter() - start)
            time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    for t in senders:
        t.start()
    for t in senders:
        t.join(60)
    stop.set()
    poller.join(30)
    for name in ("declared", "chunked"):
        status, headers, body = results[name]
        assert status == 413 and headers.get("connection") == "close", (name, status, headers)
        assert f"larger than the server's limit of {MAX_BODY} bytes" in json.loads(body)["error"]["message"]
    status, _, body = results["long_prompt"]
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "prompt" and "characters; at most 1536 are tokenized" in error["message"]
    status, _, body = results["long_ids"]
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "prompt" and "is 200000 tokens; at most 47 fit" in error["message"]
    assert len(health) >= 3 and max(health) < 1.0, health


def test_small_completion_on_an_idle_engine_is_fast(server):
    host, port, engine = server
    conn = http.client.HTTPConnection(host, port, timeout=30)
    body = json.dumps({"model": "a", "prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0, "ignore_eos": True})
    times = []
    for _ in range(7):
        while engine.num_running or engine.queue_depth:  # idle before each
            time.sleep(0.01)
        start = time.perf_counter()
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and len(json.loads(response.read())["choices"][0]["text"].split()) <= 2
        times.append(time.perf_counter() - start)
    # The waiter used to sleep out a 0.5 s poll interval on almost every request.
    assert statistics.median(times) < 0.25, times


def test_an_internal_error_is_a_500_that_keeps_the_connection(server, monkeypatch):
    host, port, engine = server
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/health")
    assert conn.getresponse().read() and conn.sock is not None
    sock = conn.sock
    monkeypatch.setattr(engine.store, "names", lambda: 1 / 0)
    conn.request("GET", "/v1/models")
    response = conn.getresponse()
    assert response.status == 500 and response.getheader("connection") != "close"
    assert json.loads(response.read())["error"] == {"message": "internal error: ZeroDivisionError",
                                                    "type": "server_error", "param": None, "code": 500}
    monkeypatch.undo()
    conn.request("GET", "/v1/models")
    response = conn.getresponse()
    assert response.status == 200 and [m["id"] for m in json.loads(response.read())["data"]] == ["a"]
    assert conn.sock is sock  # the same connection
