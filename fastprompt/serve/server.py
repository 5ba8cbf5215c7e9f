"""OpenAI-compatible HTTP server over an `Engine` (FastAPI; the `serve` extra).

`model` in a request names an adapter (as vLLM names LoRA adapters); MPT adapters take the task in an
extra field `task_id`. Endpoints: POST /v1/completions, POST /v1/chat/completions (when the tokenizer has a
chat template), GET /v1/models, GET /health, GET /metrics, and, only when the server has an adapter root,
POST /v1/load_adapter and POST /v1/unload_adapter. Errors use OpenAI's shape, `{"error": {"message", "type",
"param", "code"}}`: 400 naming the field for bad input, 401 without the API key, 404 for an unknown route,
413 for a body over `max_body_bytes`, 415 for a JSON route's body sent as anything but application/json, 429
with Retry-After when the queue is full, 503/504 when a request is aborted or times out. A 500 (a bug) is
answered like any other error and keeps the connection open.

Safe by default, as a server facing strangers should be: with an `api_key`, every route but /health and
/metrics answers 401 without `Authorization: Bearer <key>` (compared in constant time), before its body is
read; runtime adapter loading exists only with an `adapter_root`, and loads only folders that resolve
(symlinks followed) inside it, the files in them included, with one answer for every path outside it,
existing or not.

One client never stalls the others: the body is bounded before it is read in full, a text prompt's length
is bounded before it is tokenized, and parsing, tokenizing and validating run in worker threads, off the
event loop that answers every other client.

This module holds the app: `create_app` (its routes, waiting on and streaming a request's updates) and the
ASGI guard around it (body limit, 500s). Parsing request bodies and shaping error, usage and event payloads
is `fastprompt.serve.protocol`'s job.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastprompt.io import ADAPTER_NAMES
from fastprompt.serve.engine import Engine
from fastprompt.serve.protocol import (CHARS_PER_TOKEN, adapter_and_task, chat_prompt_ids, error_body,
                                       error_response, json_body, prompt_ids, response_options,
                                       sampling_params, sse, string_field, usage)
from fastprompt.serve.requests import QueueFull, Request, RequestUpdate
from fastprompt.serve.sampling import InvalidRequest

logger = logging.getLogger("fastprompt.serve")

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
OPEN_PATHS = ("/health", "/metrics")  # answered without the API key


class BodyTooLarge(Exception):
    pass


class _Guard:
    """ASGI middleware around the whole app: answers 401 to a request without the API key (when there is
    one) on every path but OPEN_PATHS, before reading its body; refuses a body over `max_body_bytes` (at once
    from its Content-Length, else as soon as the bytes received pass the limit) with 413; and answers an
    unhandled exception with a 500 instead of re-raising it, which would make the server drop the
    connection."""

    def __init__(self, app, max_body_bytes: int, api_key: str | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.expected_authorization = None if api_key is None else b"Bearer " + api_key.encode()

    def _authorized(self, headers: dict) -> bool:
        given = headers.get(b"authorization", b"")
        expected = self.expected_authorization
        # The scheme is case-insensitive (RFC 7235); the key is compared in constant time.
        return given[:7].lower() == b"bearer " and hmac.compare_digest(given[7:], expected[7:])

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, started = self.max_body_bytes, False
        too_large = f"the request body is larger than the server's limit of {limit} bytes"
        headers = dict(scope.get("headers") or [])
        if (self.expected_authorization is not None and scope.get("path") not in OPEN_PATHS
                and not self._authorized(headers)):
            return await self._send_error(send, 401, "a valid API key is required: send the header "
                                          "'Authorization: Bearer <key>'", close=True,
                                          extra_headers=[(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await self._send_error(send, 413, too_large, close=True)
        received = 0

        async def bounded_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._send_error(send, 413, too_large, close=True)
        except Exception as error:
            if started:  # a stream already under way: nothing else can be said on it
                raise
            logger.exception("unhandled error")
            await self._send_error(send, 500, f"internal error: {type(error).__name__}")

    @staticmethod
    async def _send_error(send, status: int, message: str, close: bool = False, extra_headers=()):
        body = error_body(status, message, None, "invalid_request_error" if status < 500 else "server_error")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   *extra_headers]
        if close:  # the unread rest of the body cannot be skipped on a kept-alive connection
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def create_app(engine: Engine, *, request_timeout_s: float | None = 300.0, retry_after_s: int = 1,
               start_engine: bool = True, api_key: str | None = None, adapter_root=None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_prompt_chars: int | None = None) -> FastAPI:
    """The FastAPI app serving `engine`. With start_engine, the app starts the engine's background loop on
    startup and stops it on shutdown. api_key: when given, every route but /health and /metrics needs
    `Authorization: Bearer <api_key>` (401 otherwise); adapter_root: a folder; when given, POST
    /v1/load_adapter and /v1/unload_adapter exist and load adapter folders inside it only (else those routes
    are 404); max_body_bytes: larger request bodies get 413; max_prompt_chars: a longer text prompt (or chat,
    all messages together) gets 400 before it is tokenized (default CHARS_PER_TOKEN * engine.max_len)."""
    max_chars = max_prompt_chars or CHARS_PER_TOKEN * engine.max_len
    if api_key is not None and (not isinstance(api_key, str) or not api_key or not api_key.isprintable()
                                or not api_key.isascii() or api_key != api_key.strip()):
        raise ValueError("api_key must be a non-empty string of printable ASCII without surrounding spaces")
    root = None if adapter_root is None else Path(os.path.realpath(adapter_root))
    if root is not None and not root.is_dir():
        raise ValueError(f"adapter_root {str(adapter_root)!r} is not a folder")

    @asynccontextmanager
    async def lifespan(app):
        if start_engine:
            engine.start()
        try:
            yield
        finally:
            if start_engine:
                engine.stop()

    # No interactive docs or schema routes: the API is OpenAI's, and a stranger learns nothing more here.
    app = FastAPI(title="fastprompt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.add_middleware(_Guard, max_body_bytes=max_body_bytes, api_key=api_key)

    @app.exception_handler(InvalidRequest)
    async def invalid(_, error: InvalidRequest):
        return error_response(400, str(error), error.field)

    @app.exception_handler(QueueFull)
    async def full(_, error: QueueFull):
        return error_response(429, f"the server is busy: {error}; retry later", None, "rate_limit_error",
                      headers={"Retry-After": str(retry_after_s)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail), None, "invalid_request_error")

    # endpoints --------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if start_engine and not engine.running:
            return error_response(503, "the engine is not running", None, "server_error")
        return {"status": "ok", "running": engine.num_running, "queue_depth": engine.queue_depth}

    @app.get("/metrics")
    async def metrics():
        text = engine.metrics.render(queue_depth=engine.queue_depth, running=engine.num_running,
                                     max_slots=engine.max_slots, adapters=len(engine.adapter_names()))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        root = getattr(engine.base_model.config, "name_or_path", None) or engine.base_model.config.model_type
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "fastprompt", "root": root,
             "parent": root, "max_model_len": engine.max_len,
             "num_tasks": engine.store.adapters[name].num_entries}
            for name in engine.adapter_names()]}

    if root is not None:
        @app.post("/v1/load_adapter")
        async def load_adapter(http: HTTPRequest):
            body = await json_body(http)
            name = string_field(body, ("adapter_name", "lora_name"))
            given = string_field(body, ("adapter_path", "lora_path"))
            folder = _inside_root(root, given)
            try:
                await run_in_threadpool(engine.load_adapter, name, folder)
            except InvalidRequest as error:  # say the client's path, never where the root is on this machine
                raise InvalidRequest(error.field, error.message.replace(str(folder), given)
                                     .replace(str(root), "<adapter root>")) from None
            return {"status": "ok", "message": f"adapter {name!r} loaded", "adapters": engine.adapter_names()}

        @app.post("/v1/unload_adapter")
        async def unload_adapter(http: HTTPRequest):
            body = await json_body(http)
            name = string_field(body, ("adapter_name", "lora_name"))
            await run_in_threadpool(engine.unload_adapter, name)
            return {"status": "ok", "message": f"adapter {name!r} unloaded", "adapters": engine.adapter_names()}

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = await json_body(http)
        adapter, task = adapter_and_task(body)
        if "prompt" not in body:
            raise InvalidRequest("prompt", "is required")
        prompts = await run_in_threadpool(prompt_ids, engine, body["prompt"], max_chars)
        return await _run(http, body, adapter, task, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        body = await json_body(http)
        adapter, task = adapter_and_task(body)
        tokenizer = engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest("messages", "this model's tokenizer has no chat template; use /v1/completions")
        ids = await run_in_threadpool(chat_prompt_ids, tokenizer, body.get("messages"), max_chars)
        if "max_tokens" not in body and "max_completion_tokens" in body:
            body["max_tokens"] = body["max_completion_tokens"]
        return await _run(http, body, adapter, task, [ids], chat=True)

    async def _run(http: HTTPRequest, body: dict, adapter: str, task: int, prompts: list[list[int]], *,
                   chat: bool):
        stream, return_ids, include_usage = response_options(body)
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        requests = []
        for index, ids in enumerate(prompts):
            params = sampling_params(body, engine, len(ids))

            def on_update(_, update: RequestUpdate, index=index):
                loop.call_soon_threadsafe(updates.put_nowait, (index, update))

            requests.append(Request(ids, adapter, params, task, on_update=on_update, timeout_s=request_timeout_s))
        # InvalidRequest -> 400, QueueFull -> 429; in a thread, as validating reads every token id
        await run_in_threadpool(engine.submit_many, requests)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if stream:
            return StreamingResponse(_stream(http, requests, updates, rid, created, adapter, chat, return_ids,
                                             include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            if not await _wait(http, requests, updates):
                return error_response(499, "client disconnected", None)
        finally:
            for r in requests:
                if not r.done.is_set():
                    r.cancel()
        for r in requests:
            if r.finish_reason in ("timeout", "abort", "error"):
                status = 504 if r.finish_reason == "timeout" else 503
                return error_response(status, f"request {r.finish_reason}: {r.error}", None, "server_error")
        choices = []
        for i, r in enumerate(requests):
            if chat:
                choice = {"index": i, "message": {"role": "assistant", "content": r.text},
                          "finish_reason": r.finish_reason, "logprobs": None}
            else:
                choice = {"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
            if return_ids:
                choice["token_ids"] = list(r.output_ids)
            choices.append(choice)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": adapter, "choices": choices, "usage": usage(requests)}

    async def _wait(http: HTTPRequest, requests: list[Request], updates: asyncio.Queue) -> bool:
        """Wait until every request has finished; False (after cancelling them) if the client went away."""
        while not all(r.done.is_set() for r in requests):
            try:
                await asyncio.wait_for(updates.get(), timeout=0.5)
            except asyncio.TimeoutError:
                pass
            while not updates.empty():
                updates.get_nowait()
            if await http.is_disconnected():
                for r in requests:
                    r.cancel()
                return False
            if start_engine and not engine.running:
                for r in requests:
                    r.cancel()
                break
        return True

    async def _stream(http, requests, updates, rid, created, adapter, chat, return_ids, include_usage):
        kind = "chat.completion.chunk" if chat else "text_completion"
        remaining = len(requests)
        try:
            if chat:
                for i in range(len(requests)):
                    yield sse({"id": rid, "object": kind, "created": created, "model": adapter, "choices": [
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                         "logprobs": None}]})
            while remaining:
                try:
                    index, update = await asyncio.wait_for(updates.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if start_engine and not engine.running:
                        yield sse({"error": {"message": "the engine stopped", "type": "server_error",
                                              "param": None, "code": 503}})
                        break
                    continue
                if update.finished:
                    remaining -= 1
                reason = update.finish_reason
                if reason in ("timeout", "abort", "error"):
                    request = requests[index]
                    yield sse({"error": {"message": f"request {reason}: {request.error}", "type": "server_error",
                                          "param": None, "code": 504 if reason == "timeout" else 503}})
                    continue
                if chat:
                    choice = {"index": index, "delta": {"content": update.text} if update.text else {},
                              "finish_reason": reason, "logprobs": None}
                else:
                    choice = {"index": index, "text": update.text, "finish_reason": reason, "logprobs": None}
                if return_ids:
                    choice["token_ids"] = update.token_ids
                if update.text or reason or return_ids:
                    yield sse({"id": rid, "object": kind, "created": created, "model": adapter,
                                "choices": [choice]})
            if include_usage:
                yield sse({"id": rid, "object": kind, "created": created, "model": adapter, "choices": [],
                            "usage": usage(requests)})
            yield "data: [DONE]\n\n"
        finally:  # the client went away, or the stream ended: free the rows at once
            for r in requests:
                if not r.done.is_set():
                    r.cancel()
            engine.wakeup.set()

    return app


def _inside_root(root: Path, given: str) -> Path:
    """The folder `given` names (relative to `root`, or absolute) after following every symlink, if it and
    the adapter files in it lie inside `root`; else one InvalidRequest whatever exists there, so a client
    learns nothing about the machine's other paths."""
    outside = InvalidRequest("adapter_path", "must name an adapter folder inside the server's adapter root "
                                             "(--adapter-root)")
    if "\0" in given:
        raise outside
    folder = Path(os.path.realpath(root / given))
    paths = [folder] + [Path(os.path.realpath(folder / name)) for name in ADAPTER_NAMES
                        if os.path.lexists(folder / name)]
    if not all(path == root or root in path.parents for path in paths):
        raise outside
    return folder
