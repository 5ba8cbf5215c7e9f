"""The HTTP server end to end on 127.0.0.1: completions (streamed and not), chat, models, adapters live,
metrics, a bounded load test, and malformed requests answered 4xx while the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from fastprompt.serve import Engine, Request, SamplingParams  # noqa: E402
from fastprompt.serve.server import create_app  # noqa: E402
from tests.serve.conftest import random_prompt, reference_tokens  # noqa: E402

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


class Server:
    """uvicorn in a thread on 127.0.0.1 with a free port; stops by itself at the end of the test module."""

    def __init__(self, app):
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(20)


def serve_adapters(served, max_slots: int, adapter_root=None, **options) -> tuple[Server, Engine]:
    """A running server over a fresh engine (max_len 48, queue 400) with adapters a, b and mpt loaded; runtime
    loading from `adapter_root` (default: the folder holding the served adapters); `options` go to
    create_app."""
    base, tokenizer, folders, _ = served
    tokenizer.chat_template = CHAT_TEMPLATE
    engine = Engine(base, tokenizer, max_slots=max_slots, max_len=48, max_queue=400)
    for name in ("a", "b", "mpt"):
        engine.load_adapter(name, folders[name])
    app = create_app(engine, request_timeout_s=60, adapter_root=adapter_root or folders["a"].parent, **options)
    return Server(app), engine


@pytest.fixture(scope="module")
def server(served):
    running, engine = serve_adapters(served, max_slots=8)
    yield running, engine
    running.close()
    served[1].chat_template = None


def post(url, path, body, **kwargs):
    return httpx.post(url + path, json=body, timeout=30, **kwargs)


def test_completion_matches_the_engine_and_generate(server, served):
    srv, engine = server
    references = served[3]
    body = {"model": "b", "prompt": [[7, 8, 9], [10, 11]], "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    response = post(srv.url, "/v1/completions", body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "text_completion" and data["model"] == "b"
    assert [c["index"] for c in data["choices"]] == [0, 1]
    for choice, prompt in zip(data["choices"], body["prompt"]):
        assert choice["token_ids"] == reference_tokens(references, "b", prompt, 6)
        assert choice["finish_reason"] == "length"
    assert data["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}
    text = post(srv.url, "/v1/completions", {"model": "a", "prompt": "the movie was", "max_tokens": 4,
                                               "temperature": 0, "return_token_ids": True}).json()
    ids = served[1]("the movie was")["input_ids"]
    expected = reference_tokens(references, "a", ids, 4, eos=True)
    assert text["choices"][0]["token_ids"] == expected
    assert text["choices"][0]["text"] == served[1].decode(expected, skip_special_tokens=True)
    mpt = post(srv.url, "/v1/completions", {"model": "mpt", "task_id": 1, "prompt": [4, 5], "max_tokens": 5,
                                              "temperature": 0, "ignore_eos": True, "return_token_ids": True})
    assert mpt.json()["choices"][0]["token_ids"] == reference_tokens(references, "mpt", [4, 5], 5, task=1)


def test_streaming_gives_the_same_tokens(server, served):
    srv, _ = server
    body = {"model": "a", "prompt": [7, 8, 9], "max_tokens": 7, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "stream": True, "stream_options": {"include_usage": True}}
    tokens, events = [], []
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks[:-1]:
        tokens += chunk["choices"][0]["token_ids"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 7
    assert tokens == reference_tokens(served[3], "a", [7, 8, 9], 7)


def test_openai_client_if_installed(server):
    openai = pytest.importorskip("openai")
    srv, _ = server
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=30, max_retries=0)
    assert {m.id for m in client.models.list().data} >= {"a", "b", "mpt"}
    plain = client.completions.create(model="a", prompt="the film is", max_tokens=5, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="a", prompt="the film is", max_tokens=5, temperature=0, stream=True) if c.choices)
    assert plain.choices[0].text == streamed
    chat = client.chat.completions.create(model="b", messages=[{"role": "user", "content": "good movie"}],
                                          max_tokens=4, temperature=0)
    assert chat.choices[0].message.role == "assistant"


def test_chat_completion(server, served):
    srv, _ = server
    body = {"model": "b", "messages": [{"role": "user", "content": "good movie"}], "max_tokens": 4,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    data = post(srv.url, "/v1/chat/completions", body).json()
    assert data["object"] == "chat.completion"
    ids = served[1]("good movie ", add_special_tokens=False)["input_ids"]
    assert data["choices"][0]["token_ids"] == reference_tokens(served[3], "b", ids, 4)


def test_models_health_metrics_and_live_adapters(server, served):
    srv, engine = server
    folders = served[2]
    assert httpx.get(srv.url + "/health").status_code == 200
    names = [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]]
    assert names[:3] == ["a", "b", "mpt"]
    loaded = post(srv.url, "/v1/load_adapter", {"lora_name": "pre2", "lora_path": str(folders["pre"])})
    assert loaded.status_code == 200, loaded.text
    out = post(srv.url, "/v1/completions", {"model": "pre2", "prompt": [3, 4], "max_tokens": 3, "temperature": 0,
                                              "ignore_eos": True, "return_token_ids": True}).json()
    assert out["choices"][0]["token_ids"] == reference_tokens(served[3], "pre", [3, 4], 3)
    assert post(srv.url, "/v1/load_adapter", {"adapter_name": "x", "adapter_path": "/nonexistent"}).status_code == 400
    assert post(srv.url, "/v1/unload_adapter", {"adapter_name": "pre2"}).status_code == 200
    gone = post(srv.url, "/v1/completions", {"model": "pre2", "prompt": [3], "max_tokens": 1})
    assert gone.status_code == 400 and gone.json()["error"]["param"] == "model"
    assert post(srv.url, "/v1/unload_adapter", {"adapter_name": "pre2"}).status_code == 400
    metrics = httpx.get(srv.url + "/metrics").text
    for name in ("fastprompt_queue_depth", "fastprompt_running_rows", "fastprompt_generation_tokens_per_second",
                 "fastprompt_time_to_first_token_seconds_bucket", "fastprompt_request_latency_seconds_count"):
        assert name in metrics


MALFORMED = [
    (b"{not json", "body"),
    (b"[1, 2]", "body"),
    (b"[" * 100_000, "body"),
    ({"prompt": "good"}, "model"),
    ({"model": "nope", "prompt": "good"}, "model"),
    ({"model": "a"}, "prompt"),
    ({"model": "a", "prompt": 5}, "prompt"),
    ({"model": "a", "prompt": [3] * 60}, "prompt"),
    ({"model": "a", "prompt": [3, 1000]}, "prompt"),
    ({"model": "a", "prompt": [3] * 40, "max_tokens": 20}, "max_tokens"),
    ({"model": "a", "prompt": "good", "max_tokens": 0}, "max_tokens"),
    ({"model": "a", "prompt": "good", "max_tokens": "5"}, "max_tokens"),
    ({"model": "a", "prompt": "good", "temperature": -0.5}, "temperature"),
    ({"model": "a", "prompt": "good", "temperature": "hot"}, "temperature"),
    ({"model": "a", "prompt": "good", "top_p": 1.5}, "top_p"),
    ({"model": "a", "prompt": "good", "top_k": 2.5}, "top_k"),
    ({"model": "a", "prompt": "good", "seed": "x"}, "seed"),
    ({"model": "a", "prompt": "good", "stop": [1, 2]}, "stop"),
    ({"model": "a", "prompt": "good", "stream": "yes"}, "stream"),
    ({"model": "a", "prompt": "good", "n": 3}, "n"),
    ({"model": "mpt", "prompt": "good", "task_id": 9}, "task_id"),
    ({"model": "a", "prompt": "good", "stop_token_ids": [-1]}, "stop_token_ids"),
]


def test_malformed_requests_get_400_naming_the_field(server):
    srv, _ = server
    for body, field in MALFORMED:
        if isinstance(body, bytes):
            response = httpx.post(srv.url + "/v1/completions", content=body, timeout=30,
                                  headers={"content-type": "application/json"})
        else:
            response = post(srv.url, "/v1/completions", body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == field, (body, response.text)
        assert field in response.json()["error"]["message"]
    assert httpx.get(srv.url + "/v1/nothing").status_code == 404
    chat = post(srv.url, "/v1/chat/completions", {"model": "a", "messages": "hi"})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    ok = post(srv.url, "/v1/completions", {"model": "a", "prompt": [3, 4], "max_tokens": 2})
    assert ok.status_code == 200


def test_disconnect_frees_the_row(server):
    srv, engine = server
    body = {"model": "a", "prompt": [3, 4], "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # the client leaves after the first chunk
    deadline = time.monotonic() + 10
    while engine.num_running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_running == 0
    assert 'finish_reason="abort"' in httpx.get(srv.url + "/metrics").text


def aborted_requests(url) -> int:
    """The server's count of requests that ended with finish_reason "abort" (cancelled)."""
    prefix = 'fastprompt_requests_total{finish_reason="abort"} '
    lines = [line for line in httpx.get(url + "/metrics").text.splitlines() if line.startswith(prefix)]
    return int(lines[0][len(prefix):]) if lines else 0


def test_non_streaming_disconnect_frees_the_row(server, monkeypatch):
    """A client that stops waiting for a plain (non-streamed) completion has its row cancelled: the server
    notices the closed connection while the request is still decoding."""
    srv, engine = server
    step = engine._decode_step

    def slow_step(*args):  # 40 tokens take 2 s: far longer than the client waits
        time.sleep(0.05)
        return step(*args)

    monkeypatch.setattr(engine, "_decode_step", slow_step)
    aborted = aborted_requests(srv.url)
    body = {"model": "a", "prompt": [3, 4], "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    deadline = time.monotonic() + 1.5
    while engine.num_running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_running == 0 and aborted_requests(srv.url) == aborted + 1


def test_load_many_concurrent_clients(server, served):
    """50 clients, 200 requests over all adapters, greedy and seeded: every response arrives once and equals
    the engine's answer to that request alone; some stream. Bounded by a wall-clock limit."""
    srv, engine = server
    g = torch.Generator().manual_seed(11)
    jobs = []
    for i in range(200):
        name = ("a", "b", "mpt")[i % 3]
        max_tokens = int(torch.randint(1, 9, (1,), generator=g))
        body = {"model": name, "prompt": random_prompt(g, 1, 10), "max_tokens": max_tokens,
                "ignore_eos": True, "return_token_ids": True, "user": f"job-{i}"}
        if name == "mpt":
            body["task_id"] = i % 2
        body.update({"temperature": 0} if i % 4 else {"temperature": 0.9, "top_p": 0.95, "seed": i})
        body["stream"] = i % 5 == 0
        jobs.append(body)

    async def one(client, body):
        if body["stream"]:
            ids = []
            async with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        ids += json.loads(line[6:])["choices"][0]["token_ids"]
            return body["user"], ids
        response = await client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return body["user"], response.json()["choices"][0]["token_ids"]

    async def main():
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as client:
            semaphore = asyncio.Semaphore(50)

            async def bounded(body):
                async with semaphore:
                    return await one(client, body)

            return await asyncio.wait_for(asyncio.gather(*(bounded(b) for b in jobs)), timeout=120)

    started = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - started
    assert sorted(r[0] for r in results) == sorted(b["user"] for b in jobs)  # none lost, none duplicated
    got = dict(results)
    for body in jobs:
        params = SamplingParams(max_tokens=body["max_tokens"], temperature=body["temperature"],
                                top_p=body.get("top_p", 1.0), seed=body.get("seed"), ignore_eos=True)
        alone = engine.generate([Request(body["prompt"], body["model"], params, body.get("task_id", 0))])[0]
        assert got[body["user"]] == alone.output_ids, body
    assert elapsed < 120


def test_queue_full_answers_429_with_retry_after(served):
    base, tokenizer, folders, _ = served
    engine = Engine(base, tokenizer, max_slots=1, max_len=48, max_queue=1)
    engine.load_adapter("a", folders["a"])
    from fastapi.testclient import TestClient  # in-process: the engine is not started, so the queue stays full

    app = create_app(engine, start_engine=False)
    engine.submit(Request([3], "a"))
    with TestClient(app) as client:
        response = client.post("/v1/completions", json={"model": "a", "prompt": [3, 4], "max_tokens": 2})
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
