"""A hostile client: a few hundred generated bad requests against the real server on 127.0.0.1, all on
one kept-alive connection. None may get a 5xx or lose the connection, and a fixed good request is answered
identically before and after."""

from __future__ import annotations

import http.client
import json
import random
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fastprompt import io  # noqa: E402
from tests.serve.test_server import serve_adapters  # noqa: E402

REQUESTS = 400


class Raw:
    """JSON text sent as it is (what json.dumps will not write: huge integers, NaN, lone surrogates)."""

    def __init__(self, text: str):
        self.text = text


BAD = [None, True, False, -1, 0, 1, 2**63, -2**63 - 1, 1.5, -0.0, 1e300, "", "x", "\ud800", "a\udfffb",
       "\U0001F600", [], {}, [[]], [None], [1, "a"], [-5], [10**6], [[1, 2], "x"], [[]] * 300, {"role": "user"},
       [{"role": "user"}], [{"role": 1, "content": "x"}], [{"role": "user", "content": "\ud800"}],
       [{"role": "\ud800", "content": "good"}], [{"role": "user", "content": None}], "good " * 2000,
       Raw("1" + "0" * 5000), Raw("-" + "9" * 4400), Raw("1" + "0" * 400), Raw("1e400"), Raw("-1e400"),
       Raw("NaN"), Raw("Infinity"), Raw('"\\udfff"'), Raw('["\\ud800"]'), Raw("[" * 50 + "]" * 50)]
COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                     "stop_token_ids", "ignore_eos", "stream", "return_token_ids", "stream_options", "task_id",
                     "n", "logprobs", "echo", "best_of", "logit_bias", "suffix"]
CHAT_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
               "stop", "stream"]
GARBAGE = [b"", b"{", b"\xff\xfe{}", b"[1, 2]", b"null", b'"x"', b"{" * 5000, b"[" * 100000,
           b'{"model": "a", "prompt": "\\ud800"}', b'{"model": "a", "prompt": [1, 2], "max_tokens": 1' + b"0" * 5000
           + b"}", b'{"model": "a", "prompt": [1, 2], "temperature": 1' + b"0" * 400 + b"}"]


def encode(value) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(encode(v) for v in value) + "]"
    return json.dumps(value)


def bad_adapter_folders(root, good) -> list[str]:
    """Folders each wrong in one way the issue found (and a few more)."""
    config = json.loads((good / io.CONFIG_NAME).read_text())
    tensors = io.read_tensors(good / io.WEIGHTS_NAME)
    cases = {
        "peft-type-list": ({**config, "peft_type": ["PROMPT_TUNING"]}, tensors),
        "peft-type-dict": ({**config, "peft_type": {"x": 1}}, tensors),
        "token-dim-string": ({**config, "token_dim": str(config["token_dim"])}, tensors),
        "nan": (config, {"prompt_embeddings": torch.full_like(tensors["prompt_embeddings"], float("nan"))}),
        "int64": (config, {"prompt_embeddings": tensors["prompt_embeddings"].long()}),
        "wrong-shape": (config, {"prompt_embeddings": tensors["prompt_embeddings"][:, :7].contiguous()}),
    }
    folders = []
    for name, (cfg, weights) in cases.items():
        (root / name).mkdir()
        (root / name / io.CONFIG_NAME).write_text(json.dumps(cfg))
        save_file(weights, root / name / io.WEIGHTS_NAME)
        folders.append(str(root / name))
    for name, config_bytes, weights_name, weights_bytes in (
            ("garbage-bin", json.dumps(config).encode(), io.LEGACY_WEIGHTS_NAME, b"\x80\x04garbage"),
            ("garbage-safetensors", json.dumps(config).encode(), io.WEIGHTS_NAME, b"\x00" * 64),
            ("non-utf8-config", b'{"peft_type": "\xff"}', io.WEIGHTS_NAME, (good / io.WEIGHTS_NAME).read_bytes())):
        (root / name).mkdir()
        (root / name / io.CONFIG_NAME).write_bytes(config_bytes)
        (root / name / weights_name).write_bytes(weights_bytes)
        folders.append(str(root / name))
    return folders + [str(root / "missing"), str(good / io.CONFIG_NAME), "/dev/null", "\ud800"]


def known_cases(folders: list[str]) -> list[tuple[str, str, bytes, str]]:
    """(method, path, body, the field the 400 must name): what gave 500s before, once each."""
    completion = '{"model": "a", "prompt": %s, "max_tokens": 2, "temperature": %s, "top_p": %s}'
    chat = '{"model": "b", "messages": [{"role": %s, "content": %s}]}'
    cases = [(completion % ('"\\ud800"', 0, 1), "prompt"), (completion % ('["good", "\\udfff"]', 0, 1), "prompt"),
             (chat % ('"user"', '"\\ud800 good"'), "messages[0].content"), (chat % ('"\\ud800"', '"good"'),
                                                                           "messages[0].role"),
             (completion % ("[5, 6]", "1" + "0" * 5000, 1), "body"), (completion % ("[5, 6]", 0, "9" * 4400), "body"),
             (completion % ("[5, 6]", "1" + "0" * 400, 1), "temperature"),
             (completion % ("[5, 6]", 0, "1" + "0" * 320), "top_p")]
    known = [("POST", "/v1/completions" if "prompt" in body else "/v1/chat/completions", body.encode(), field)
             for body, field in cases]
    return known + [("POST", "/v1/load_adapter", encode({"adapter_name": "fresh", "adapter_path": folder}).encode(),
                     "adapter_path") for folder in folders]


def generate_requests(rng: random.Random, folders: list[str]) -> list[tuple[str, str, bytes]]:
    requests = []
    for _ in range(REQUESTS):
        kind = rng.choice(["completion"] * 5 + ["chat"] * 2 + ["load", "unload", "garbage", "route"])
        if kind in ("completion", "chat"):
            body = ({"model": "a", "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0} if kind == "completion"
                    else {"model": "b", "messages": [{"role": "user", "content": "good movie"}], "max_tokens": 3})
            for field in rng.sample(COMPLETION_FIELDS if kind == "completion" else CHAT_FIELDS, rng.randint(1, 3)):
                body[field] = rng.choice(BAD)
            path = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
            requests.append(("POST", path, encode(body).encode("utf-8", "surrogatepass")))
        elif kind == "load":
            body = {"adapter_name": rng.choice(BAD + ["fresh", "a"]), "adapter_path": rng.choice(BAD + folders)}
            if isinstance(body["adapter_name"], str) and isinstance(body["adapter_path"], str):
                body["adapter_path"] = rng.choice(folders)  # a good name gets a bad folder: nothing may load
            requests.append(("POST", "/v1/load_adapter", encode(body).encode()))
        elif kind == "unload":
            requests.append(("POST", "/v1/unload_adapter", encode({"adapter_name": rng.choice(BAD + ["zzz"])}).encode()))
        elif kind == "garbage":
            requests.append(("POST", rng.choice(["/v1/completions", "/v1/chat/completions", "/v1/load_adapter"]),
                             rng.choice(GARBAGE)))
        else:
            requests.append(rng.choice([("GET", "/v1/completions", b""), ("POST", "/v1/nothing", b"{}"),
                                        ("DELETE", "/v1/models", b""), ("POST", "/health", b"{}")]))
    return requests


GOOD = [("/v1/completions", {"model": "a", "prompt": [[7, 8, 9], [10, 11]], "max_tokens": 6, "temperature": 0,
                             "ignore_eos": True, "return_token_ids": True}),
        ("/v1/completions", {"model": "mpt", "task_id": 1, "prompt": "the movie was", "max_tokens": 5,
                             "temperature": 0.9, "top_p": 0.8, "seed": 7, "return_token_ids": True}),
        ("/v1/chat/completions", {"model": "b", "messages": [{"role": "user", "content": "a good film"}],
                                  "max_tokens": 4, "temperature": 0})]


def ask(conn: http.client.HTTPConnection, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def good_answers(conn) -> list:
    answers = []
    for path, body in GOOD:
        status, raw = ask(conn, "POST", path, json.dumps(body).encode())
        assert status == 200, raw
        answers.append([{k: v for k, v in c.items()} for c in json.loads(raw)["choices"]])
    return answers


def test_fuzzed_requests_get_4xx_and_keep_the_connection(served, tmp_path):
    _, tokenizer, folders, _ = served
    server, engine = serve_adapters(served, max_slots=4, adapter_root=tmp_path)
    try:
        host, port = server.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        before = good_answers(conn)
        sock = conn.sock
        statuses, params = Counter(), Counter()
        bad_folders = bad_adapter_folders(tmp_path, folders["a"])
        for method, path, body, field in known_cases(bad_folders):
            status, raw = ask(conn, method, path, body)
            assert status == 400 and json.loads(raw)["error"]["param"] == field, (body[:200], raw[:500])
        for method, path, body in generate_requests(random.Random(5), bad_folders):
            status, raw = ask(conn, method, path, body)
            statuses[status] += 1
            assert status < 500, (method, path, body[:300], raw[:500])
            assert conn.sock is sock, (method, path, body[:300], "the server closed the connection")
            if status >= 400:
                error = json.loads(raw)["error"]
                assert error["code"] == status, error
                params[error["param"]] += 1
                if status == 400:
                    assert error["param"] and error["message"].startswith(error["param"]), error
        assert sum(statuses.values()) == REQUESTS and statuses[400] >= REQUESTS // 2, statuses
        assert len(params) >= 15, params  # the refusals named many different fields
        assert engine.adapter_names() == ["a", "b", "mpt"]
        assert good_answers(conn) == before
        assert conn.sock is sock
        conn.close()
    finally:
        server.close()
        tokenizer.chat_template = None
