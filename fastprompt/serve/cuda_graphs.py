"""CUDA graphs of the engine's decode step: `DecodeGraphs` captures `Engine._decode_step` once per (batch
bucket nb, key window R) and replays it.

The step it wraps is `step(nb, window, inputs) -> logits`: inputs int64 `[3 * nb + 1]` on the CUDA device
(each row's last token, its length, its bank entry, then the common write offset L), logits `[nb, V]` in the
model's dtype. Replay returns the graph's static logits tensor, valid until the next replay. Off CUDA the
engine never builds one (it decodes eagerly).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

logger = logging.getLogger("fastprompt.serve")


class DecodeGraphs:
    """CUDA graphs of `Engine._decode_step`, captured lazily, one per (batch bucket nb, key window R).

    Capture: on one side stream of the engine's device, the step runs once (Triton compiles its kernels,
    cuBLAS sets up its workspace), then is captured into a CUDAGraph that reads a static inputs tensor
    and leaves its logits in a static output. All graphs share one memory pool and the capture stream:
    they replay one at a time, on the engine's thread, and each keeps its inputs and output alive, so
    what one graph shares with another is only memory both use as temporaries. Replay: copy the step's
    inputs into the static tensor, replay, return the static logits (valid until the next replay;
    sampling reads them at once, outside the graph).

    What a graph bakes in: the cache tensors (allocated once by `SlotCache`: rebasing and freeing a slot
    move rows within them and change nothing) and the adapter bank, which `AdapterStore` rebuilds on every
    load and unload: a change of `version()` drops every graph, and their pool, before the next replay.
    Bounded: at most len(batch_buckets) * len(key windows) graphs, e.g. 6 * 7 = 42 for 32 slots and a
    1024-position cache.

    Capture runs in "thread_local" mode, so CUDA work on other threads of the process cannot abort it.
    A model whose step cannot be captured (one that reads a device value on the host, e.g. a rotary
    embedding rescaled by the longest position) fails its first capture: graphs are then turned off for
    good, with a warning, and `run` returns None (the engine decodes eagerly).
    """

    def __init__(self, step: Callable[[int, int, torch.Tensor], torch.Tensor], version: Callable[[], int]):
        self.step = step
        self.version = version
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None
        self.stream: torch.cuda.Stream | None = None
        self.captured_version: int | None = None
        self.disabled = False

    def run(self, nb: int, window: int, inputs: torch.Tensor) -> torch.Tensor | None:
        """Logits [nb, V] of `step(nb, window, inputs)` (inputs: int64 [3 * nb + 1] on the CUDA device),
        replaying the (nb, window) graph, captured first if there is none; None once capture failed."""
        if self.disabled:
            return None
        if self.version() != self.captured_version:
            self.graphs.clear()
            self.pool = torch.cuda.graph_pool_handle()
            self.captured_version = self.version()
        entry = self.graphs.get((nb, window))
        if entry is None:
            try:
                with torch.cuda.device(inputs.device):
                    entry = self._capture(nb, window, inputs)
            except Exception as error:  # the step is not capturable: serve eagerly rather than fail every step
                logger.warning("CUDA-graph capture of the decode step failed (%s: %s); decoding eagerly from "
                               "now on (pass cuda_graphs=False to skip the attempt)", type(error).__name__, error)
                self.disabled = True
                self.graphs.clear()
                return None
            self.graphs[(nb, window)] = entry
        graph, static_inputs, logits = entry
        static_inputs.copy_(inputs)
        graph.replay()
        return logits

    def _capture(self, nb: int, window: int, inputs: torch.Tensor):
        if self.stream is None:
            self.stream = torch.cuda.Stream(inputs.device)
        static_inputs = inputs.clone()
        # The warm-up writes the same keys/values into the same cache columns as the replay that follows.
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.step(nb, window, static_inputs)
        torch.cuda.current_stream().wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            logits = self.step(nb, window, static_inputs)
        return graph, static_inputs, logits
