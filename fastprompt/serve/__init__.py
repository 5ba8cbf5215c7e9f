"""Serving: an engine with continuous batching over many soft-prompt adapters, and an OpenAI-compatible
HTTP server (`fastprompt serve`, needs the `serve` extra: FastAPI and uvicorn)."""

from fastprompt.serve.engine import Engine, QueueFull, Request, RequestUpdate
from fastprompt.serve.sampling import InvalidRequest, SamplingParams

__all__ = ["Engine", "InvalidRequest", "QueueFull", "Request", "RequestUpdate", "SamplingParams"]
