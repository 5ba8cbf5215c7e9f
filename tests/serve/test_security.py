"""The server is safe by default: an API key closes every route but /health and /metrics; runtime adapter
loading exists only with an adapter root and never leaves it; JSON routes take JSON only; and every size an
adapter or a request controls has a limit. Each hole is tried as an attacker would, and each test asserts the
refusal and that nothing changed (the adapters loaded, the bank)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

import fastprompt  # noqa: E402
from fastprompt.serve import Engine, Request, SamplingParams  # noqa: E402
from fastprompt.serve.limits import ServeLimits  # noqa: E402
from fastprompt.serve.sampling import InvalidRequest, TextTracker  # noqa: E402
from fastprompt.serve.server import create_app  # noqa: E402
from tests.serve.conftest import reference_tokens  # noqa: E402
from tests.tiny_models import tiny_model  # noqa: E402

KEY = "sk-test-0123456789"
COMPLETION = {"model": "a", "prompt": [3, 4], "max_tokens": 1, "temperature": 0}


def _client(served, tmp_path=None, limits=None, **options):
    """A TestClient over an engine holding adapter "a" (not started: load/unload run inline)."""
    base, tokenizer, folders, _ = served
    engine = Engine(base, tokenizer, max_slots=2, max_len=32, limits=limits)
    engine.load_adapter("a", folders["a"])
    return TestClient(create_app(engine, start_engine=False, **options)), engine


def _root_with_adapters(served, tmp_path):
    """An adapter root holding copies of adapters "pre" and "b", and a secret folder beside it."""
    folders = served[2]
    root = tmp_path / "adapters"
    root.mkdir()
    shutil.copytree(folders["pre"], root / "pre")
    shutil.copytree(folders["b"], root / "b")
    secret = tmp_path / "secret"
    shutil.copytree(folders["b"], secret)
    return root, secret


# API key -------------------------------------------------------------------------------------------
def test_api_key_guards_every_route_but_health_and_metrics(served, tmp_path):
    root, _ = _root_with_adapters(served, tmp_path)
    client, engine = _client(served, api_key=KEY, adapter_root=root)
    attempts = [("GET", "/v1/models", None), ("POST", "/v1/completions", COMPLETION),
                ("POST", "/v1/chat/completions", {"model": "a", "messages": []}),
                ("POST", "/v1/unload_adapter", {"adapter_name": "a"}),
                ("POST", "/v1/load_adapter", {"adapter_name": "x", "adapter_path": "pre"}),
                ("GET", "/docs", None), ("GET", "/openapi.json", None), ("POST", "/v1/nothing", {})]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Bearer {KEY[:-1]}"}):
        for method, path, body in attempts:
            response = client.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (path, headers, response.text)
            assert response.json()["error"]["code"] == 401
            assert response.headers["www-authenticate"] == "Bearer"
    assert engine.adapter_names() == ["a"]  # neither the unload nor the load happened
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
    for scheme in ("Bearer", "bearer"):
        ok = client.get("/v1/models", headers={"Authorization": f"{scheme} {KEY}"})
        assert ok.status_code == 200 and [m["id"] for m in ok.json()["data"]] == ["a"]


def test_a_request_without_the_key_is_refused_before_its_body_is_read(served):
    client, _ = _client(served, api_key=KEY, max_body_bytes=1000)
    huge = client.post("/v1/completions", content=b"x" * 5000, headers={"Content-Type": "application/json"})
    assert huge.status_code == 401  # not 413: nothing of the body was looked at


def test_api_key_must_be_a_usable_header_value(served):
    for bad in ("", " padded", "line\nbreak", "ключ"):
        with pytest.raises(ValueError, match="api_key"):
            _client(served, api_key=bad)


def test_serve_cli_reads_the_api_key_flag_and_environment(monkeypatch, tmp_path):
    import argparse

    import fastprompt.serve.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "build_engine", lambda args: "engine")
    monkeypatch.setattr("fastprompt.serve.server.create_app", lambda engine, **kw: seen.update(kw) or "app")
    uvicorn = pytest.importorskip("uvicorn")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    parser = argparse.ArgumentParser()
    cli.add_commands(parser.add_subparsers())
    monkeypatch.setenv(cli.API_KEY_ENV, "from-env")
    assert cli.run(parser.parse_args(["serve", "--model", "m"])) == 0
    assert seen["api_key"] == "from-env" and seen["adapter_root"] is None
    assert cli.run(parser.parse_args(["serve", "--model", "m", "--api-key", "flag", "--adapter-root",
                                      str(tmp_path)])) == 0
    assert seen["api_key"] == "flag" and seen["adapter_root"] == str(tmp_path)
    monkeypatch.delenv(cli.API_KEY_ENV)
    assert cli.run(parser.parse_args(["serve", "--model", "m"])) == 0 and seen["api_key"] is None
    with pytest.raises(SystemExit, match="adapter-root"):
        cli.run(parser.parse_args(["serve", "--model", "m", "--adapter-root", str(tmp_path / "missing")]))
    with pytest.raises(SystemExit):  # the old flag is gone: loading is off unless --adapter-root is given
        parser.parse_args(["serve", "--model", "m", "--no-adapter-loading"])


# Runtime adapter loading ------------------------------------------------------------------------------
def test_adapter_loading_routes_do_not_exist_without_an_adapter_root(served):
    client, engine = _client(served)
    folders = served[2]
    assert client.post("/v1/unload_adapter", json={"adapter_name": "a"}).status_code == 404
    assert client.post("/v1/load_adapter", json={"adapter_name": "x",
                                                 "adapter_path": str(folders["pre"])}).status_code == 404
    assert engine.adapter_names() == ["a"]


def test_adapter_paths_outside_the_root_get_one_answer(served, tmp_path):
    root, secret = _root_with_adapters(served, tmp_path)
    os.symlink(secret, root / "link-out")                 # a folder link leaving the root
    (root / "file-link").mkdir()                          # a folder inside whose files link outside
    for name in os.listdir(secret):
        os.symlink(secret / name, root / "file-link" / name)
    client, engine = _client(served, adapter_root=root)
    outside = [str(secret), str(tmp_path / "missing"), "../secret", "../missing", "pre/../../secret",
               "link-out", "file-link", "/etc", "/", "pre/\x00"]
    messages = set()
    for path in outside:
        response = client.post("/v1/load_adapter", json={"adapter_name": "x", "adapter_path": path})
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert error["param"] == "adapter_path"
        messages.add(error["message"])
    assert len(messages) == 1, messages  # existing or not, the answer is the same
    assert str(tmp_path) not in messages.pop()
    assert engine.adapter_names() == ["a"] and engine.store.bank.keys[0].shape[0] == 1


def test_adapters_inside_the_root_load_by_relative_or_absolute_path(served, tmp_path):
    root, _ = _root_with_adapters(served, tmp_path)
    os.symlink(root / "b", root / "link-in")  # a link that stays inside is fine
    client, engine = _client(served, adapter_root=root)
    for name, path in (("pre", "pre"), ("b", str(root / "b")), ("b2", "link-in")):
        response = client.post("/v1/load_adapter", json={"adapter_name": name, "adapter_path": path})
        assert response.status_code == 200, response.text
    missing = client.post("/v1/load_adapter", json={"adapter_name": "y", "adapter_path": "nope"})
    assert missing.status_code == 400 and str(root) not in missing.text  # the root's location stays private
    assert engine.adapter_names() == ["a", "pre", "b", "b2"]
    out = engine.generate([Request([4, 5], "pre", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))])
    assert out[0].output_ids == reference_tokens(served[3], "pre", [4, 5], 3)
    assert client.post("/v1/unload_adapter", json={"adapter_name": "pre"}).status_code == 200
    assert engine.adapter_names() == ["a", "b", "b2"]


# Content-Type ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx"])
def test_json_routes_refuse_other_content_types(served, tmp_path, content_type):
    root, _ = _root_with_adapters(served, tmp_path)
    client, engine = _client(served, adapter_root=root)
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path, body in (("/v1/completions", COMPLETION), ("/v1/unload_adapter", {"adapter_name": "a"}),
                       ("/v1/load_adapter", {"adapter_name": "x", "adapter_path": "pre"}),
                       ("/v1/chat/completions", {"model": "a", "messages": []})):
        response = client.post(path, content=json.dumps(body).encode(), headers=headers)
        assert response.status_code == 415, (path, response.text)
        assert response.json()["error"]["code"] == 415
    assert engine.adapter_names() == ["a"]
    # With the right type the body is parsed and judged on its content (an unknown model: not a 415). A valid
    # completion would wait forever on this engine, which is never started.
    judged = client.post("/v1/completions", content=json.dumps({**COMPLETION, "model": "nope"}).encode(),
                         headers={"Content-Type": "application/json; charset=utf-8"})
    assert judged.status_code in (400, 404) and "nope" in judged.json()["error"]["message"]


# Limits ------------------------------------------------------------------------------------------------
def test_max_adapters_is_enforced_and_nothing_is_added(served, tmp_path):
    root, _ = _root_with_adapters(served, tmp_path)
    client, engine = _client(served, adapter_root=root, limits=ServeLimits(max_adapters=2))
    assert client.post("/v1/load_adapter", json={"adapter_name": "pre", "adapter_path": "pre"}).status_code == 200
    bank = engine.store.bank.keys[0].clone()
    refused = client.post("/v1/load_adapter", json={"adapter_name": "b", "adapter_path": "b"})
    assert refused.status_code == 400 and "at most 2 adapters" in refused.json()["error"]["message"]
    assert engine.adapter_names() == ["a", "pre"] and torch.equal(engine.store.bank.keys[0], bank)


def test_max_virtual_tokens_is_enforced(served, tmp_path):
    base = served[0]
    wide = fastprompt.get_peft_model(base, fastprompt.PromptTuningConfig(num_virtual_tokens=9))
    root = tmp_path / "adapters"
    wide.save_pretrained(root / "wide")
    client, engine = _client(served, adapter_root=root, limits=ServeLimits(max_virtual_tokens=8))
    refused = client.post("/v1/load_adapter", json={"adapter_name": "wide", "adapter_path": "wide"})
    assert refused.status_code == 400 and "num_virtual_tokens=9" in refused.json()["error"]["message"]
    assert engine.adapter_names() == ["a"] and engine.store.bank.num_virtual_tokens == 5


def test_an_adapter_config_larger_than_its_file_is_refused_before_allocating(served, tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(served[2]["a"], root / "huge")
    config = json.loads((root / "huge" / "adapter_config.json").read_text())
    (root / "huge" / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": 50_000_000}))
    with pytest.raises(ValueError, match="num_virtual_tokens=50000000"):
        fastprompt.from_pretrained(tiny_model("llama"), root / "huge")  # would be 9.6 GB if allocated
    client, engine = _client(served, adapter_root=root, limits=ServeLimits(max_virtual_tokens=10**9))
    refused = client.post("/v1/load_adapter", json={"adapter_name": "huge", "adapter_path": "huge"})
    assert refused.status_code == 400 and "shape" in refused.json()["error"]["message"]
    assert engine.adapter_names() == ["a"]


@pytest.mark.parametrize("field, value, limit", [
    ("stop", ["x"] * 5, "at most 4"), ("stop", "y" * 33, "at most 32"),
    ("stop_token_ids", list(range(3, 10)), "at most 6")])
def test_stop_limits_answer_400_naming_the_field(served, field, value, limit):
    limits = ServeLimits(max_stop_strings=4, max_stop_chars=32, max_stop_token_ids=6)
    client, engine = _client(served, limits=limits)
    response = client.post("/v1/completions", json={**COMPLETION, field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and limit in error["message"] and len(error["message"]) < 300
    assert engine.queue_depth == 0
    with pytest.raises(InvalidRequest, match=limit):  # the engine's own check, without HTTP
        engine.submit(Request([3], "a", SamplingParams(**{field: value})))


def test_stop_token_ids_at_the_limit_stop_generation(served):
    _, _, _, references = served
    client, engine = _client(served)
    greedy = reference_tokens(references, "a", [4, 5], 6)
    ids = [greedy[2]] + [t for t in range(3, 101) if t not in greedy][:255]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, stop_token_ids=ids)
    out = engine.generate([Request([4, 5], "a", params)])[0]
    assert out.output_ids == greedy[:greedy.index(greedy[2]) + 1] and out.finish_reason == "stop"


def test_stop_string_hold_back_matches_the_quadratic_definition():
    """The hold-back check scans only where a stop string can begin; it must hold back exactly the longest
    tail of the text that begins a stop string, as checking every prefix did."""
    import random

    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        tracker = TextTracker(None, stops)
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        tracker.tokenizer = type("T", (), {"decode": lambda self, ids, **_: text})()
        delta, stopped = tracker.push([1])
        if any(s in text for s in stops):
            continue
        held = max([k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])],
                   default=0)
        assert not stopped and delta == text[:len(text) - held], (stops, text, delta)


def test_growing_the_bank_writes_only_the_new_entry(served):
    """An added adapter costs its own entry: once the buffers have room, the bank's storage stays where it
    is and the earlier entries are not copied; generation still equals each adapter alone."""
    base, tokenizer, folders, references = served
    engine = Engine(base, tokenizer, max_slots=4, max_len=32)
    pointers = []
    for name in ("a", "b", "pre", "pt"):
        engine.load_adapter(name, folders[name])
        pointers.append(engine.store.bank.keys[0].data_ptr())
    assert engine.store.bank.keys[0].shape[0] == 4
    assert pointers[3] == pointers[2]  # capacity 4 after the third add: the fourth wrote into a spare row
    engine.unload_adapter("b")
    assert engine.store.bank.keys[0].shape[0] == 3 and engine.store.bank.offsets == {"a": 0, "pre": 1, "pt": 2}
    engine.load_adapter("mpt", folders["mpt"])
    rows = [Request([4, 5, 6], name, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), task)
            for name, task in (("a", 0), ("pre", 0), ("pt", 0), ("mpt", 1))]
    for request, out in zip(rows, engine.generate(rows)):
        assert out.output_ids == reference_tokens(references, request.adapter, [4, 5, 6], 3, task=request.task)
