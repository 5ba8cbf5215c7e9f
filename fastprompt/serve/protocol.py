"""The OpenAI API's shapes for the HTTP server: request bodies parsed and checked into engine inputs, and the
error, usage and server-sent-event payloads (no app, no routes: those are `fastprompt.serve.server`).

Every check raises `InvalidRequest(field, message)`, which the app answers with 400 naming the field. Prompts
come back as lists of int token ids (`prompt_ids`, `chat_prompt_ids`: tokenizing runs here, so call them from
a worker thread), sampling fields as a validated `SamplingParams`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from fastapi import Request as HTTPRequest
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastprompt.serve.requests import Request
from fastprompt.serve.sampling import InvalidRequest, SamplingParams, unicode_text

if TYPE_CHECKING:
    from fastprompt.serve.engine import Engine

DEFAULT_MAX_TOKENS = 16
# A text prompt of more than max_len * CHARS_PER_TOKEN characters is refused before it is tokenized: the
# tokenizer's work grows with the text, and hardly any text needs more characters per token.
CHARS_PER_TOKEN = 32
MAX_MESSAGE_CHARS = 1000  # an error message echoes the bad value, cut to this length
UNSUPPORTED = {"logprobs": (None, False, 0), "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
               "n": (None, 1), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
               "top_logprobs": (None, 0)}


def error_body(status: int, message: str, param: str | None, kind: str) -> bytes:
    """OpenAI's error JSON, `{"error": {"message", "type", "param", "code"}}`, as ASCII bytes; a message over
    MAX_MESSAGE_CHARS is cut."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    # ASCII: a message may quote a client's string, and a lone surrogate in it cannot be encoded as UTF-8.
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}},
                      ensure_ascii=True).encode()


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   headers: dict | None = None) -> Response:
    """`error_body` as a JSON response with this status (and headers, e.g. Retry-After)."""
    return Response(error_body(status, message, param, kind), status_code=status, headers=headers,
                    media_type="application/json")


def response_options(body: dict) -> tuple[bool, bool, bool]:
    """(stream, return_token_ids, stream_options.include_usage) of a completion body, after refusing the
    OpenAI fields this server does not support (UNSUPPORTED, unless at a default value)."""
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
    return stream, return_ids, include_usage


async def json_body(http: HTTPRequest) -> dict:
    """The request's body as a JSON object, parsed in a worker thread (`parse_json`). 415 unless its
    Content-Type is application/json: a browser page may send a text/plain POST to any address without a
    preflight, never an application/json one."""
    media_type = http.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise StarletteHTTPException(415, f"Content-Type must be application/json, got {media_type or 'none'!r}")
    return await run_in_threadpool(parse_json, await http.body())


def parse_json(raw: bytes) -> dict:
    """raw as a JSON object; InvalidRequest("body") for anything else."""
    try:
        body = json.loads(raw)
    # ValueError covers bad JSON, bad UTF-8 and an integer of more digits than Python converts;
    # RecursionError, deep nesting
    except (ValueError, RecursionError) as error:
        raise InvalidRequest("body", f"malformed JSON: {error}") from error
    if not isinstance(body, dict):
        raise InvalidRequest("body", f"must be a JSON object, got {type(body).__name__}")
    return body


def string_field(body: dict, names: tuple[str, ...]) -> str:
    """The first of `names` present in body (aliases, e.g. adapter_name or lora_name), a non-empty valid string."""
    for name in names:
        if name in body:
            value = body[name]
            if not isinstance(value, str) or not value:
                raise InvalidRequest(name, f"must be a non-empty string, got {value!r}")
            return unicode_text(name, value)
    raise InvalidRequest(names[0], "is required")


def adapter_and_task(body: dict) -> tuple[str, int]:
    """(`model`, the adapter's name; `task_id`, an int, default 0) of a completion body."""
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


def prompt_list(prompt) -> list:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    if isinstance(prompt, str) or _is_ids(prompt):
        return [prompt]
    if (isinstance(prompt, list) and prompt and len(prompt) <= 256
            and all(isinstance(p, str) or _is_ids(p) for p in prompt)):
        return prompt
    raise InvalidRequest("prompt", "must be a string, a list of strings, a list of token ids or a list of lists "
                                   "of token ids (at most 256 prompts)")


def prompt_ids(engine: Engine, prompt, max_chars: int) -> list[list[int]]:
    """The token ids of each prompt of a completion request (a worker thread's job: it may tokenize)."""
    return [tokenize_prompt(engine, p, max_chars) for p in prompt_list(prompt)]


def tokenize_prompt(engine: Engine, prompt, max_chars: int) -> list[int]:
    """A prompt's token ids: token ids as given, text (at most max_chars characters) through the engine's
    tokenizer."""
    if isinstance(prompt, list):
        return prompt
    if engine.tokenizer is None:
        raise InvalidRequest("prompt", "this server has no tokenizer: send token ids")
    if not prompt:
        raise InvalidRequest("prompt", "must not be empty")
    if len(prompt) > max_chars:
        raise InvalidRequest("prompt", f"is {len(prompt)} characters; at most {max_chars} are tokenized")
    return engine.tokenizer(unicode_text("prompt", prompt))["input_ids"]


def chat_prompt_ids(tokenizer, messages, max_chars: int) -> list[int]:
    """The token ids of a chat request's messages through the tokenizer's chat template."""
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                       and isinstance(m.get("content"), str) for m in messages)):
        raise InvalidRequest("messages", "must be a non-empty list of {\"role\": str, \"content\": str}")
    chars = 0
    for i, m in enumerate(messages):
        unicode_text(f"messages[{i}].role", m["role"])
        unicode_text(f"messages[{i}].content", m["content"])
        chars += len(m["role"]) + len(m["content"])
    if chars > max_chars:
        raise InvalidRequest("messages", f"hold {chars} characters; at most {max_chars} are tokenized")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as error:
        raise InvalidRequest("messages", f"the chat template failed: {error}") from error
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sampling_params(body: dict, engine: Engine, prompt_len: int) -> SamplingParams:
    """The body's sampling fields, validated for the engine's vocabulary; max_tokens defaults to
    DEFAULT_MAX_TOKENS, or what is left of max_len after the prompt if fewer (at least 1)."""
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = max(1, min(DEFAULT_MAX_TOKENS, engine.max_len - prompt_len))
    fields = dict(max_tokens=max_tokens)
    for name, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("seed", None), ("stop", None),
                          ("stop_token_ids", None), ("ignore_eos", False)):
        value = body.get(name, default)
        fields[name] = default if value is None and name not in ("seed", "stop", "stop_token_ids") else value
    return SamplingParams(**fields).validate(engine.backbone.vocab_size, engine.limits)


def usage(requests: list[Request]) -> dict:
    """OpenAI's usage object: prompt, completion and total tokens of the requests together."""
    prompt = sum(len(r.prompt_ids) for r in requests)
    completion = sum(len(r.output_ids) for r in requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict) -> str:
    """One server-sent event carrying payload as JSON."""
    return f"data: {json.dumps(payload)}\n\n"
