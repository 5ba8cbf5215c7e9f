"""OpenAI-compatible HTTP server over an `Engine` (FastAPI; the `serve` extra).

`model` in a request names an adapter (as vLLM names LoRA adapters); MPT adapters take the task in an
extra field `task_id`. Endpoints: POST /v1/completions, POST /v1/chat/completions (when the tokenizer has a
chat template), GET /v1/models, POST /v1/load_adapter, POST /v1/unload_adapter, GET /health, GET /metrics.
Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 naming the field for bad
input, 404 for an unknown route, 413 for a body over `max_body_bytes`, 429 with Retry-After when the queue
is full, 503/504 when a request is aborted or times out. A 500 (a bug) is answered like any other error and
keeps the connection open.

One client never stalls the others: the body is bounded before it is read in full, a text prompt's length
is bounded before it is tokenized, and parsing, tokenizing and validating run in worker threads, off the
event loop that answers every other client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastprompt.serve.engine import Engine, QueueFull, Request, RequestUpdate
from fastprompt.serve.sampling import InvalidRequest, SamplingParams

logger = logging.getLogger("fastprompt.serve")

DEFAULT_MAX_TOKENS = 16
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
# A text prompt of more than max_len * CHARS_PER_TOKEN characters is refused before it is tokenized: the
# tokenizer's work grows with the text, and hardly any text needs more characters per token.
CHARS_PER_TOKEN = 32
MAX_MESSAGE_CHARS = 1000  # an error message echoes the bad value, cut to this length
UNSUPPORTED = {"logprobs": (None, False, 0), "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
               "n": (None, 1), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
               "top_logprobs": (None, 0)}


def _error_body(status: int, message: str, param: str | None, kind: str) -> bytes:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    # ASCII: a message may quote a client's string, and a lone surrogate in it cannot be encoded as UTF-8.
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}},
                      ensure_ascii=True).encode()


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           headers: dict | None = None) -> Response:
    return Response(_error_body(status, message, param, kind), status_code=status, headers=headers,
                    media_type="application/json")


class BodyTooLarge(Exception):
    pass


class _Guard:
    """ASGI middleware around the whole app: refuses a body over `max_body_bytes` (at once from its
    Content-Length, else as soon as the bytes received pass the limit) with 413, and answers an unhandled
    exception with a 500 instead of re-raising it, which would make the server drop the connection."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, started = self.max_body_bytes, False
        too_large = f"the request body is larger than the server's limit of {limit} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
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
    async def _send_error(send, status: int, message: str, close: bool = False):
        body = _error_body(status, message, None, "invalid_request_error" if status < 500 else "server_error")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if close:  # the unread rest of the body cannot be skipped on a kept-alive connection
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def create_app(engine: Engine, *, request_timeout_s: float | None = 300.0, retry_after_s: int = 1,
               start_engine: bool = True, allow_adapter_loading: bool = True,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_prompt_chars: int | None = None) -> FastAPI:
    """The FastAPI app serving `engine`. With start_engine, the app starts the engine's background loop on
    startup and stops it on shutdown. max_body_bytes: larger request bodies get 413; max_prompt_chars: a
    longer text prompt (or chat, all messages together) gets 400 before it is tokenized (default
    CHARS_PER_TOKEN * engine.max_len)."""
    max_chars = max_prompt_chars or CHARS_PER_TOKEN * engine.max_len

    @asynccontextmanager
    async def lifespan(app):
        if start_engine:
            engine.start()
        try:
            yield
        finally:
            if start_engine:
                engine.stop()

    app = FastAPI(title="fastprompt", lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(_Guard, max_body_bytes=max_body_bytes)

    @app.exception_handler(InvalidRequest)
    async def invalid(_, error: InvalidRequest):
        return _error(400, str(error), error.field)

    @app.exception_handler(QueueFull)
    async def full(_, error: QueueFull):
        return _error(429, f"the server is busy: {error}; retry later", None, "rate_limit_error",
                      headers={"Retry-After": str(retry_after_s)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, error: StarletteHTTPException):
        return _error(error.status_code, str(error.detail), None, "invalid_request_error")

    # endpoints --------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if start_engine and not engine.running:
            return _error(503, "the engine is not running", None, "server_error")
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

    @app.post("/v1/load_adapter")
    async def load_adapter(http: HTTPRequest):
        if not allow_adapter_loading:
            return _error(403, "adapter loading is disabled on this server", None, "permission_error")
        body = await _json_body(http)
        name = _string(body, ("adapter_name", "lora_name"))
        path = _string(body, ("adapter_path", "lora_path"))
        await run_in_threadpool(engine.load_adapter, name, path)
        return {"status": "ok", "message": f"adapter {name!r} loaded", "adapters": engine.adapter_names()}

    @app.post("/v1/unload_adapter")
    async def unload_adapter(http: HTTPRequest):
        if not allow_adapter_loading:
            return _error(403, "adapter loading is disabled on this server", None, "permission_error")
        body = await _json_body(http)
        name = _string(body, ("adapter_name", "lora_name"))
        await run_in_threadpool(engine.unload_adapter, name)
        return {"status": "ok", "message": f"adapter {name!r} unloaded", "adapters": engine.adapter_names()}

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = await _json_body(http)
        adapter, task = _model(body)
        if "prompt" not in body:
            raise InvalidRequest("prompt", "is required")
        prompts = await run_in_threadpool(_prompts, engine, body["prompt"], max_chars)
        return await _run(http, body, adapter, task, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        body = await _json_body(http)
        adapter, task = _model(body)
        tokenizer = engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest("messages", "this model's tokenizer has no chat template; use /v1/completions")
        ids = await run_in_threadpool(_chat_prompt, tokenizer, body.get("messages"), max_chars)
        if "max_tokens" not in body and "max_completion_tokens" in body:
            body["max_tokens"] = body["max_completion_tokens"]
        return await _run(http, body, adapter, task, [ids], chat=True)

    async def _run(http: HTTPRequest, body: dict, adapter: str, task: int, prompts: list[list[int]], *,
                   chat: bool):
        for name, allowed in UNSUPPORTED.items():
            if name in body and body[name] not in allowed:
                raise InvalidRequest(name, f"is not supported by this server (got {body[name]!r})")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidRequest("stream", f"must be a boolean, got {stream!r}")
        return_ids = body.get("return_token_ids", False)
        if not isinstance(return_ids, bool):
            raise InvalidRequest("return_token_ids", f"must be a boolean, got {return_ids!r}")
        include_usage = False
        options = body.get("stream_options")
        if options is not None:
            if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
                raise InvalidRequest("stream_options", "must be an object like {\"include_usage\": true}")
            include_usage = options.get("include_usage", False)
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        requests = []
        for index, ids in enumerate(prompts):
            params = _params(body, engine, len(ids))

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
                return _error(499, "client disconnected", None)
        finally:
            for r in requests:
                if not r.done.is_set():
                    r.cancel()
        for r in requests:
            if r.finish_reason in ("timeout", "abort", "error"):
                status = 504 if r.finish_reason == "timeout" else 503
                return _error(status, f"request {r.finish_reason}: {r.error}", None, "server_error")
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
                "model": adapter, "choices": choices, "usage": _usage(requests)}

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
                    yield _sse({"id": rid, "object": kind, "created": created, "model": adapter, "choices": [
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                         "logprobs": None}]})
            while remaining:
                try:
                    index, update = await asyncio.wait_for(updates.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if start_engine and not engine.running:
                        yield _sse({"error": {"message": "the engine stopped", "type": "server_error",
                                              "param": None, "code": 503}})
                        break
                    continue
                if update.finished:
                    remaining -= 1
                reason = update.finish_reason
                if reason in ("timeout", "abort", "error"):
                    request = requests[index]
                    yield _sse({"error": {"message": f"request {reason}: {request.error}", "type": "server_error",
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
                    yield _sse({"id": rid, "object": kind, "created": created, "model": adapter,
                                "choices": [choice]})
            if include_usage:
                yield _sse({"id": rid, "object": kind, "created": created, "model": adapter, "choices": [],
                            "usage": _usage(requests)})
            yield "data: [DONE]\n\n"
        finally:  # the client went away, or the stream ended: free the rows at once
            for r in requests:
                if not r.done.is_set():
                    r.cancel()
            engine.wakeup.set()

    return app


# request parsing ------------------------------------------------------------------------------
async def _json_body(http: HTTPRequest) -> dict:
    return await run_in_threadpool(_parse_json, await http.body())


def _parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    # ValueError covers bad JSON, bad UTF-8 and an integer of more digits than Python converts;
    # RecursionError, deep nesting
    except (ValueError, RecursionError) as error:
        raise InvalidRequest("body", f"malformed JSON: {error}") from error
    if not isinstance(body, dict):
        raise InvalidRequest("body", f"must be a JSON object, got {type(body).__name__}")
    return body


def _text(field: str, value: str) -> str:
    """value, if it is valid Unicode: JSON lets a lone surrogate (\\ud800) through, and tokenizers and file
    paths fail on one."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequest(field, f"is not valid Unicode text (a lone surrogate at index {error.start})") from None
    return value


def _string(body: dict, names: tuple[str, ...]) -> str:
    for name in names:
        if name in body:
            value = body[name]
            if not isinstance(value, str) or not value:
                raise InvalidRequest(name, f"must be a non-empty string, got {value!r}")
            return _text(name, value)
    raise InvalidRequest(names[0], "is required")


def _model(body: dict) -> tuple[str, int]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model", f"must name a loaded adapter (GET /v1/models), got {model!r}")
    task = body.get("task_id", 0)
    if isinstance(task, bool) or not isinstance(task, int):
        raise InvalidRequest("task_id", f"must be an integer, got {task!r}")
    return model, task


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in value)


def _prompt_list(prompt) -> list:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    if isinstance(prompt, str) or _is_ids(prompt):
        return [prompt]
    if (isinstance(prompt, list) and prompt and len(prompt) <= 256
            and all(isinstance(p, str) or _is_ids(p) for p in prompt)):
        return prompt
    raise InvalidRequest("prompt", "must be a string, a list of strings, a list of token ids or a list of lists "
                                   "of token ids (at most 256 prompts)")


def _prompts(engine: Engine, prompt, max_chars: int) -> list[list[int]]:
    """The token ids of each prompt of a completion request (a worker thread's job: it may tokenize)."""
    return [_tokenize(engine, p, max_chars) for p in _prompt_list(prompt)]


def _tokenize(engine: Engine, prompt, max_chars: int) -> list[int]:
    if isinstance(prompt, list):
        return prompt
    if engine.tokenizer is None:
        raise InvalidRequest("prompt", "this server has no tokenizer: send token ids")
    if not prompt:
        raise InvalidRequest("prompt", "must not be empty")
    if len(prompt) > max_chars:
        raise InvalidRequest("prompt", f"is {len(prompt)} characters; at most {max_chars} are tokenized")
    return engine.tokenizer(_text("prompt", prompt))["input_ids"]


def _chat_prompt(tokenizer, messages, max_chars: int) -> list[int]:
    """The token ids of a chat request's messages through the tokenizer's chat template."""
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                       and isinstance(m.get("content"), str) for m in messages)):
        raise InvalidRequest("messages", "must be a non-empty list of {\"role\": str, \"content\": str}")
    chars = 0
    for i, m in enumerate(messages):
        _text(f"messages[{i}].role", m["role"])
        _text(f"messages[{i}].content", m["content"])
        chars += len(m["role"]) + len(m["content"])
    if chars > max_chars:
        raise InvalidRequest("messages", f"hold {chars} characters; at most {max_chars} are tokenized")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as error:
        raise InvalidRequest("messages", f"the chat template failed: {error}") from error
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _params(body: dict, engine: Engine, prompt_len: int) -> SamplingParams:
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = max(1, min(DEFAULT_MAX_TOKENS, engine.max_len - prompt_len))
    fields = dict(max_tokens=max_tokens)
    for name, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("seed", None), ("stop", None),
                          ("stop_token_ids", None), ("ignore_eos", False)):
        value = body.get(name, default)
        fields[name] = default if value is None and name not in ("seed", "stop", "stop_token_ids") else value
    return SamplingParams(**fields).validate(engine.backbone.vocab_size)


def _usage(requests: list[Request]) -> dict:
    prompt = sum(len(r.prompt_ids) for r in requests)
    completion = sum(len(r.output_ids) for r in requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
