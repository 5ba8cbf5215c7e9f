"""Serving: an engine with continuous batching over many soft-prompt adapters, and an OpenAI-compatible
HTTP server (`fastprompt serve`, needs the `serve` extra: FastAPI and uvicorn). Exports are imported on first
use (fastprompt._lazy), so the `fastprompt` command's parser does not import torch."""

from fastprompt._lazy import lazy_exports

_EXPORTS = {
    "Engine": "fastprompt.serve.engine",
    "QueueFull": "fastprompt.serve.requests",
    "Request": "fastprompt.serve.requests",
    "RequestUpdate": "fastprompt.serve.requests",
    "InvalidRequest": "fastprompt.serve.sampling",
    "SamplingParams": "fastprompt.serve.sampling",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
