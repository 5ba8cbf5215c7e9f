"""`fastprompt serve`: an OpenAI-compatible server for one base model and many soft-prompt adapters."""

from __future__ import annotations

import argparse
import os

API_KEY_ENV = "FASTPROMPT_API_KEY"


def add_commands(subparsers) -> None:
    """Add the `serve` command to the `fastprompt` CLI's subparsers."""
    serve = subparsers.add_parser("serve", help="serve a base model and soft-prompt adapters over an "
                                                "OpenAI-compatible HTTP API (needs the `serve` extra)")
    serve.add_argument("--model", required=True, help="local folder of a Hugging Face causal LM (and tokenizer)")
    serve.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model)")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                       help="an adapter folder (PEFT or fastprompt) served as model NAME; repeatable")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-slots", type=int, default=16, help="rows decoded together (default 16)")
    serve.add_argument("--max-len", type=int, default=1024, help="prompt + generated tokens per request")
    serve.add_argument("--max-prefill-tokens", type=int, default=8192,
                       help="padded prompt tokens prefilled together in one step (default 8192)")
    serve.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 (default 256)")
    serve.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request (default 300)")
    serve.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024,
                       help="larger request bodies are refused with 413 (default 2 MiB)")
    serve.add_argument("--max-prompt-chars", type=int, default=None,
                       help="longer text prompts are refused with 400 before tokenizing (default 32 x --max-len)")
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    serve.add_argument("--api-key", default=None,
                       help=f"require 'Authorization: Bearer KEY' on every route but /health and /metrics "
                            f"(default: ${API_KEY_ENV} if set, else no key: bind to loopback only)")
    serve.add_argument("--adapter-root", default=None, metavar="DIR",
                       help="enable POST /v1/load_adapter and /v1/unload_adapter, loading only folders inside "
                            "DIR (default: off, those routes do not exist)")
    limits = serve.add_argument_group("limits (per adapter and per request)")
    limits.add_argument("--max-adapters", type=int, default=64, help="adapters loaded at once (default 64)")
    limits.add_argument("--max-virtual-tokens", type=int, default=256,
                        help="an adapter's num_virtual_tokens (default 256)")
    limits.add_argument("--max-stop-strings", type=int, default=16, help="stop strings per request (default 16)")
    limits.add_argument("--max-stop-chars", type=int, default=256,
                        help="characters of each stop string (default 256)")
    limits.add_argument("--max-stop-token-ids", type=int, default=256,
                        help="stop token ids per request (default 256)")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(run=run)


def parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    adapters = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"--adapter must look like NAME=DIR, got {spec!r}")
        adapters.append((name, folder))
    return adapters


def build_engine(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastprompt.serve.engine import Engine
    from fastprompt.serve.limits import ServeLimits
    from fastprompt.serve.sampling import InvalidRequest

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    except (OSError, ValueError):
        if args.tokenizer:
            raise
        tokenizer = None  # token-id prompts only
    try:
        limits = ServeLimits(args.max_adapters, args.max_virtual_tokens, args.max_stop_strings, args.max_stop_chars,
                             args.max_stop_token_ids)
    except ValueError as error:
        raise SystemExit(f"fastprompt serve: --{str(error).replace('_', '-')}") from None
    engine = Engine(model, tokenizer, max_slots=args.max_slots, max_len=args.max_len, max_queue=args.max_queue,
                    max_prefill_tokens=args.max_prefill_tokens, request_timeout_s=args.request_timeout,
                    limits=limits)
    for name, folder in parse_adapters(args.adapter):
        try:
            engine.load_adapter(name, folder)
        except InvalidRequest as error:
            raise SystemExit(f"fastprompt serve: --adapter {name}={folder}: {error.message}") from None
    return engine


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError as error:
        raise SystemExit("fastprompt serve needs FastAPI and uvicorn: pip install 'fastprompt[serve]'") from error
    from fastprompt.serve.server import create_app

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if args.adapter_root is not None and not os.path.isdir(args.adapter_root):
        raise SystemExit(f"fastprompt serve: --adapter-root {args.adapter_root!r} is not a folder")
    engine = build_engine(args)
    try:
        app = create_app(engine, request_timeout_s=args.request_timeout, api_key=api_key,
                         adapter_root=args.adapter_root, max_body_bytes=args.max_body_bytes,
                         max_prompt_chars=args.max_prompt_chars)
    except ValueError as error:
        raise SystemExit(f"fastprompt serve: {error}") from None
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
