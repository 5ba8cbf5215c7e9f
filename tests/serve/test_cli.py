"""`fastprompt serve`'s argument parsing and engine construction (the HTTP part is tested in test_server)."""

from __future__ import annotations

import argparse

import pytest

from fastprompt.serve import Request, SamplingParams
from fastprompt.serve.cli import add_commands, build_engine, parse_adapters
from tests.serve.conftest import reference_tokens


def test_serve_command_builds_an_engine_with_adapters(served, tmp_path):
    base, tokenizer, folders, references = served
    base.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    parser = argparse.ArgumentParser(prog="fastprompt")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "--model", str(tmp_path / "model"), "--adapter", f"a={folders['a']}",
                              "--adapter", f"pre={folders['pre']}", "--max-slots", "2", "--max-len", "32",
                              "--max-prefill-tokens", "20", "--port", "0", "--device", "cpu"])
    assert args.run.__name__ == "run" and args.host == "127.0.0.1"
    engine = build_engine(args)
    assert engine.adapter_names() == ["a", "pre"] and engine.max_slots == 2 and engine.max_len == 32
    assert engine.max_prefill_tokens == 20
    out = engine.generate([Request([4, 5], "pre", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))])
    assert out[0].output_ids == reference_tokens(references, "pre", [4, 5], 4)


def test_adapter_specs_must_name_a_folder():
    assert parse_adapters(["x=/a/b", "y=c=d"]) == [("x", "/a/b"), ("y", "c=d")]
    for bad in ("x", "=dir", "x="):
        with pytest.raises(SystemExit):
            parse_adapters([bad])
