"""The serving engine: many soft-prompt adapters on one frozen causal LM, continuous batching over slots.

This module holds `Engine`, which ties the parts together: its thread and queues, admission of waiting
requests, the batched prefill and the decode step, and each row's tokens until it finishes. The parts live
beside it: `requests` (Request, RequestUpdate, QueueFull, the checks a request must pass), `kv_cache`
(SlotCache: the slots, the common offset, zeroing and moving slots; the decode step's bucketed sizes),
`cuda_graphs` (DecodeGraphs: capture and replay of the decode step), `adapters` (AdapterStore: the bank),
`sampling` (SamplingParams, per-row sampling, stop strings) and `metrics`.

Design (what is where, and why it is exact):

- **Bank.** `AdapterStore` keeps each adapter's per-layer prefix keys/values, computed once when it is
  loaded, and concatenates them into one bank per layer. Every row of every step reads its own entry by
  index, so one decode step runs all active rows whatever their adapters (`fastprompt.ops.prefix_attention`).
- **Cache with a common write offset.** The rows' own keys/values live in a preallocated cache
  `[max_slots, Hkv, cache_len, D]` per layer. All active rows end at one common offset `L`: row `i` holds
  its `length_i` tokens at `[L - length_i, L)`, and a `key_padding_mask` built from the lengths hides the
  rest. A decode step therefore writes every row at the same offset `L`. Where a key sits in the cache
  does not matter to attention (rotary positions are applied before caching; the model's position ids are
  each row's own, `P + length_i`), only the mask does.
- **A decode step a CUDA graph can replay.** `_decode_step` has no shape, address or host read that
  depends on `L`: the offset is a device tensor (`KVCache.write_at`, an `index_copy_` into the cache),
  attention reads a fixed key window `[0, R)` of the cache, and the mask `L - length_i <= j <= L` is
  built on the device. Two bucketed sizes are its only Python ints: the batch `nb` (active rows padded to
  a power of two, or `max_slots`) and the window `R` (`L + 1` rounded up to a power of two, at least
  `MIN_KEY_WINDOW`, at most `cache_len`). A pad row reads bank entry 0 with length 0 and writes into a
  free slot, which no live row reads. Eager decode runs the same step; on CUDA `DecodeGraphs` captures
  it once per `(nb, R)` and replays it.
- **Prefill.** The requests admitted in a step (up to `max_prefills_per_step`, and `max_prefill_tokens`
  counting the padding) run together through the backbone, left-padded to their longest prompt T and
  written into their new slots at `[L - T, L)` through a view of the cache; a row's key padding mask and
  position ids make its attention and positions exactly those it would have alone. Each samples its first
  token, and the rows join the batch at the next decode step. If `T > L`, or the common offset reaches the
  end of the cache, the whole block is moved ("rebased") so the longest row ends at the new offset: one
  contiguous copy per layer, amortised by allocating `cache_len = 2 * max_len`.
- **Slots.** Active rows are kept packed in slots `0..n-1` (a decode step reads a view `[:nb]` of the
  cache, so slots `n..nb-1` hold the pad rows): a row that finishes frees its slot at once, the last row
  moving into it.
- **Isolation.** A row reads its whole key window, masked columns included, and a masked NaN still
  poisons `0 * value`: so a new row's slot is zeroed at admission, a freed slot takes its new occupant's
  whole slot, and a row whose logits are not finite ends alone with finish_reason "error".
- **Sampling.** Per row: greedy rows share one argmax, sampled rows draw from their own seeded
  `torch.Generator` with `fastprompt.generation.sample_next`, so a request's tokens do not depend on what
  shares its batch, and equal `PromptModel.generate` for the same adapter, prompt and seed.
- **Threading.** `start()` runs `step()` in a background thread. Everything that touches the model
  (prefill, decode, computing a new adapter's prefixes) runs on that thread; `submit`, `cancel`,
  `load_adapter` and `unload_adapter` may be called from any thread (adapter changes are queued and applied
  between steps).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import torch

from fastprompt.backbones import AttentionContext, KVCache, get_backbone, patches
from fastprompt.model import PromptModel
from fastprompt.serve.adapters import AdapterStore
from fastprompt.serve.cuda_graphs import DecodeGraphs
from fastprompt.serve.kv_cache import SlotCache, batch_buckets, key_window
from fastprompt.serve.limits import ServeLimits
from fastprompt.serve.metrics import Metrics
from fastprompt.serve.requests import QueueFull, Request, RequestUpdate, check_request, drop_reason
from fastprompt.serve.sampling import InvalidRequest, TextTracker, sample_rows

logger = logging.getLogger("fastprompt.serve")


@dataclass(eq=False)
class _Row:
    request: Request
    length: int                       # tokens of this row in the cache
    entry: int                        # bank entry
    generator: torch.Generator | None
    tracker: TextTracker
    last_token: int = -1              # sampled, not yet in the cache
    last_time: float = 0.0


class Engine:
    """Continuous batching of soft-prompt requests on one frozen causal LM.

    model: a Hugging Face causal LM (or a PromptModel, whose base model is used); tokenizer: optional
    (needed for stop strings and text); max_slots: rows decoded together; max_len: prompt + generated
    tokens per request; max_queue: waiting requests before `submit` raises QueueFull; max_prefills_per_step
    (default max_slots) and max_prefill_tokens (padded prompt tokens, at least one request): what one step's
    batched prefill may take, which bounds the stall it adds to running rows; cuda_graphs: on a CUDA
    device, run decode steps as CUDA graphs captured per (batch bucket, key window) (`DecodeGraphs`);
    bucketed_steps: run every decode step at those bucketed shapes (default: exactly when CUDA graphs are on,
    since an eager step gains nothing from pad rows and unread keys; True on a CPU runs what a graph runs);
    limits: `ServeLimits`, what one adapter or one request may hold (adapters, virtual tokens, stop strings).
    """

    def __init__(self, model, tokenizer=None, *, max_slots: int = 8, max_len: int = 512, max_queue: int = 64,
                 cache_len: int | None = None, max_prefills_per_step: int | None = None,
                 max_prefill_tokens: int = 8192, backend: str | None = None,
                 eos_token_id=None, request_timeout_s: float | None = None, cuda_graphs: bool = True,
                 bucketed_steps: bool | None = None, limits: ServeLimits | None = None):
        base = model.base_model if isinstance(model, PromptModel) else model
        if max_slots < 1 or max_len < 2 or max_queue < 0:
            raise ValueError(f"need max_slots >= 1, max_len >= 2 and max_queue >= 0, got {max_slots}, {max_len}, "
                             f"{max_queue}")
        if (max_prefills_per_step is not None and max_prefills_per_step < 1) or max_prefill_tokens < 1:
            raise ValueError(f"need max_prefills_per_step >= 1 and max_prefill_tokens >= 1, got "
                             f"{max_prefills_per_step}, {max_prefill_tokens}")
        self.base_model = base.eval()
        self.backbone = get_backbone(base)
        # The frozen model's norms and activations through fastprompt.ops, as under a PromptModel (the
        # adapters' prompt passes and every step); the engine holds the base model for its life.
        self._frozen_ops = patches.patch_frozen_ops(self.backbone, backend)
        self.tokenizer = tokenizer
        self.backend = backend
        self.max_slots, self.max_len, self.max_queue = max_slots, max_len, max_queue
        self.cache_len = cache_len or 2 * max_len
        if self.cache_len < max_len:
            raise ValueError(f"cache_len must be >= max_len={max_len}, got {self.cache_len}")
        self.max_prefills_per_step = max_prefills_per_step or max_slots
        self.max_prefill_tokens = max_prefill_tokens
        self.request_timeout_s = request_timeout_s
        self.device = self.backbone.device
        self.limits = limits or ServeLimits()
        self.store = AdapterStore(self.backbone, backend, self.limits)
        self.cache = SlotCache(self.backbone.num_layers, max_slots, self.backbone.num_kv_heads, self.cache_len,
                               self.backbone.head_dim, self.backbone.dtype, self.device)
        self.keys, self.values = self.cache.keys, self.cache.values   # per layer [max_slots, Hkv, cache_len, D]
        self.rows: list[_Row] = []                   # active rows, packed in slots 0..n-1
        self.queue: deque[Request] = deque()
        self.lock = threading.Lock()
        self.wakeup = threading.Event()
        self.control: deque[tuple[Callable, Future]] = deque()
        self.metrics = Metrics()
        gen_config = getattr(base, "generation_config", None)
        eos = eos_token_id if eos_token_id is not None else getattr(gen_config, "eos_token_id", None)
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set() if eos is None else set(eos if isinstance(eos, (list, tuple)) else [eos])
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._store_version = self.store.bank.version
        self.batch_buckets = batch_buckets(max_slots)
        self._graphs = (DecodeGraphs(self._decode_step, lambda: self.store.bank.version)
                        if cuda_graphs and self.device.type == "cuda" else None)
        if self._graphs is not None and bucketed_steps is False:
            raise ValueError("bucketed_steps=False needs cuda_graphs=False on a CUDA device: graphs are captured "
                             "per bucketed shape")
        self.bucketed_steps = self._graphs is not None if bucketed_steps is None else bucketed_steps

    @property
    def L(self) -> int:
        """The common write offset: every active row's tokens end at it (`SlotCache.L`)."""
        return self.cache.L

    @L.setter
    def L(self, value: int) -> None:
        self.cache.L = value

    # adapters --------------------------------------------------------------------------------
    def load_adapter(self, name: str, adapter_dir, timeout: float | None = 300):
        """Load a PEFT or fastprompt adapter folder under `name`; safe while serving (applied between steps)."""
        return self._in_engine(lambda: self.store.add_from_dir(name, adapter_dir), timeout)

    def add_adapter(self, name: str, model: PromptModel, adapter_name: str | None = None,
                    timeout: float | None = 300):
        """Serve adapter `adapter_name` of an in-memory PromptModel (on the same base model) as `name`."""
        return self._in_engine(lambda: self.store.add_from_model(name, model, adapter_name), timeout)

    def unload_adapter(self, name: str, timeout: float | None = 300) -> None:
        """Remove an adapter; its running and waiting requests end with finish_reason "abort"."""
        return self._in_engine(lambda: self._unload(name), timeout)

    def adapter_names(self) -> list[str]:
        return self.store.names()

    def _unload(self, name: str) -> None:
        self.store.remove(name)
        for i in reversed(range(len(self.rows))):
            if self.rows[i].request.adapter == name:
                self._finish(self.rows[i].request, "abort", f"adapter {name!r} was unloaded")
                self._free(i)

    def _in_engine(self, fn: Callable, timeout: float | None):
        thread = self._thread
        if thread is None or not thread.is_alive() or threading.current_thread() is thread:
            with torch.no_grad():
                result = fn()
            self._reindex()
            return result
        future: Future = Future()
        self.control.append((fn, future))
        self.wakeup.set()
        return future.result(timeout)

    def _run_control(self) -> None:
        while self.control:
            fn, future = self.control.popleft()
            try:
                future.set_result(fn())
            except BaseException as error:  # handed to the caller's thread
                future.set_exception(error)
        self._reindex()

    def _reindex(self) -> None:
        if self.store.bank.version != self._store_version:
            for row in self.rows:
                row.entry = self.store.entry(row.request.adapter, row.request.task)
            self._store_version = self.store.bank.version

    # requests --------------------------------------------------------------------------------
    def validate(self, request: Request) -> None:
        """Raise InvalidRequest naming the field if the engine cannot run this request (`check_request`); then
        give it the engine's request_timeout_s if it has no timeout of its own."""
        check_request(request, backbone=self.backbone, store=self.store, max_len=self.max_len,
                      has_tokenizer=self.tokenizer is not None)
        if request.timeout_s is None:
            request.timeout_s = self.request_timeout_s

    def submit(self, request: Request) -> Request:
        """Queue a request (any thread). InvalidRequest on bad input, QueueFull when the queue is full."""
        self.validate(request)
        with self.lock:
            if len(self.queue) >= self.max_queue:
                self.metrics.rejected += 1
                raise QueueFull(f"{len(self.queue)} requests are waiting (max_queue={self.max_queue})")
            self.queue.append(request)
        self.wakeup.set()
        return request

    def submit_many(self, requests: list[Request]) -> list[Request]:
        """Queue several requests all together or none."""
        for request in requests:
            self.validate(request)
        with self.lock:
            if len(self.queue) + len(requests) > self.max_queue:
                self.metrics.rejected += 1
                raise QueueFull(f"{len(self.queue)} requests are waiting (max_queue={self.max_queue})")
            self.queue.extend(requests)
        self.wakeup.set()
        return requests

    def generate(self, requests: list[Request], timeout: float | None = None) -> list[Request]:
        """Submit and wait (or step here when no background thread runs)."""
        self.submit_many(requests)
        if self.running:
            for request in requests:
                request.wait(timeout)
        else:
            while not all(r.done.is_set() for r in requests):
                self.step()
        return requests

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    @property
    def num_running(self) -> int:
        return len(self.rows)

    @property
    def num_decode_graphs(self) -> int:
        """CUDA graphs captured now (0 off CUDA or with cuda_graphs=False)."""
        return 0 if self._graphs is None else len(self._graphs.graphs)

    # the loop ---------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Engine":
        if not self.running:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._loop, name="fastprompt-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still running or waiting end with finish_reason "abort"."""
        self._stopping.set()
        self.wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None
        self._abort_all("the engine stopped")

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                worked = self.step()
            except Exception as error:  # never let one bad step end the server
                logger.exception("engine step failed; aborting the running rows")
                self._abort_all(f"internal error: {type(error).__name__}: {error}", running_only=True)
                worked = False
            if not worked:
                self.wakeup.wait(0.05)
                self.wakeup.clear()

    @torch.no_grad()
    def step(self) -> bool:
        """One iteration: adapter changes, drop cancelled/timed-out requests, prefill newcomers, one decode
        step of all active rows. Returns whether there was anything to do."""
        self._run_control()
        self._reap()
        admitted = self._admit()
        if self.rows:
            self._decode()
            return True
        return admitted

    def _reap(self) -> None:
        now = time.monotonic()
        for i in reversed(range(len(self.rows))):
            request = self.rows[i].request
            reason = drop_reason(request, now)
            if reason:
                self._finish(request, reason, "cancelled" if reason == "abort" else "request timed out")
                self._free(i)
        with self.lock:
            dropped = [r for r in self.queue if drop_reason(r, now)]
            for r in dropped:
                self.queue.remove(r)
        for r in dropped:
            reason = drop_reason(r, now)
            self._finish(r, reason, "cancelled" if reason == "abort" else "request timed out")

    def _admit(self) -> bool:
        """Prefill as many waiting requests as free slots and the step's budgets allow, in one forward."""
        batch: list[tuple[Request, int]] = []
        longest = 0
        while len(self.rows) + len(batch) < self.max_slots and len(batch) < self.max_prefills_per_step:
            with self.lock:
                if not self.queue:
                    break
                request = self.queue[0]
                padded = (len(batch) + 1) * max(longest, len(request.prompt_ids))
                if batch and padded > self.max_prefill_tokens:
                    break
                self.queue.popleft()
            try:
                entry = self.store.entry(request.adapter, request.task)
            except InvalidRequest as error:  # unloaded while it waited
                self._finish(request, "error", str(error))
                continue
            batch.append((request, entry))
            longest = max(longest, len(request.prompt_ids))
        if batch:
            self._prefill(batch)
        return bool(batch)

    def _prefill(self, batch: list[tuple[Request, int]]) -> None:
        """Run the newcomers' prompts as one left-padded batch into slots n..n+k-1, sample their first tokens.

        Row i's T_i tokens end at the common offset L like every other row's, so the batch is padded on the
        left to T = max T_i and written at [L - T, L): a pad column lies in the row's own new slot, masked
        now and by the decode mask later (which reads only [L - length, L)). Position ids count each row's
        own tokens from its adapter's P, as if it ran alone. A failure ends these requests only.
        """
        try:
            rows, tokens = self._prefill_forward(batch)
        except Exception as error:  # the newcomers' failure, not the running rows'
            logger.exception("prefill of %d requests failed", len(batch))
            for request, _ in batch:
                self._finish(request, "error", f"internal error: {type(error).__name__}: {error}")
            return
        slot = len(self.rows)
        self.rows.extend(rows)
        with self.metrics.lock:
            self.metrics.prompt_tokens += sum(row.length for row in rows)
        self.metrics.tokens(len(rows))
        finished = [slot + i for i, (row, token) in enumerate(zip(rows, tokens)) if self._emit(row, token)]
        for i in reversed(finished):
            self._free(i)

    def _prefill_forward(self, batch: list[tuple[Request, int]]) -> tuple[list[_Row], list[int]]:
        """The batch's forward into its slots' cache columns (rebasing the cache if needed) and its first
        tokens; adds no row."""
        k = len(batch)
        lengths = [len(request.prompt_ids) for request, _ in batch]
        T = max(lengths)
        if not self.rows:
            self.L = 0
        if T > self.L:
            self._rebase(max([T] + [r.length for r in self.rows]))
        slot, L = len(self.rows), self.L
        # A new row reads its whole key window, masked columns included, so its slot starts from zeros: what
        # an earlier occupant or a pad row left there must not reach it (0 * NaN is NaN).
        self.cache.zero_slots(slot, k)
        cache = self.cache.prefill_view(slot, k, T)
        pads = torch.tensor([T - n for n in lengths], device=self.device)
        columns = torch.arange(T, device=self.device)[None]
        mask = columns >= pads[:, None]
        ids = torch.tensor([[0] * (T - len(r.prompt_ids)) + list(r.prompt_ids) for r, _ in batch],
                           dtype=torch.long, device=self.device)
        entries = torch.tensor([entry for _, entry in batch], device=self.device)
        ctx = self._context(entries, mask, cache)
        positions = self.store.bank.entry_lengths[entries, None] + (columns - pads[:, None]).clamp(min=0)
        hidden = self.backbone.hidden_states(input_ids=ids, position_ids=positions, ctx=ctx)
        logits = self.backbone.lm_head(hidden[:, -1])
        rows = [_Row(request, n, entry, request.params.make_generator(self.device),
                     TextTracker(self.tokenizer, request.params.stop))
                for (request, entry), n in zip(batch, lengths)]
        return rows, sample_rows(logits, [r.request.params for r in rows], [r.generator for r in rows])

    def _decode(self) -> None:
        start_time = time.monotonic()
        n = len(self.rows)
        if self.L >= self.cache_len:
            self._rebase(max(r.length for r in self.rows))
        if self.bucketed_steps:
            nb, window = next(b for b in self.batch_buckets if b >= n), key_window(self.L, self.cache_len)
        else:
            nb, window = n, self.L + 1
        pad = [0] * (nb - n)
        inputs = torch.tensor([r.last_token for r in self.rows] + pad + [r.length for r in self.rows] + pad
                              + [r.entry for r in self.rows] + pad + [self.L], dtype=torch.long).to(self.device)
        logits = self._graphs.run(nb, window, inputs) if self._graphs is not None else None
        if logits is None:  # no graphs, or a model whose step cannot be captured
            logits = self._decode_step(nb, window, inputs)
        self.L += 1
        for row in self.rows:
            row.length += 1
        tokens = sample_rows(logits[:n], [r.request.params for r in self.rows], [r.generator for r in self.rows])
        self.metrics.tokens(n)
        finished = [i for i, (row, token) in enumerate(zip(self.rows, tokens)) if self._emit(row, token)]
        for i in reversed(finished):
            self._free(i)
        with self.metrics.lock:
            self.metrics.steps += 1
        self.metrics.observe(self.metrics.step_time, time.monotonic() - start_time)

    def _decode_step(self, nb: int, window: int, inputs: torch.Tensor) -> torch.Tensor:
        """One decode step of slots [0, nb): logits [nb, V] in the model's dtype.

        inputs: int64 [3 * nb + 1] on the model's device: each row's last token, its length (tokens in the
        cache), its bank entry, then the common offset L. The step writes every row's key/value at column
        L and reads the window [0, window) of the cache (window > L). No shape, address or host read
        depends on L or on the rows, only on nb and window, so a CUDA graph captured once per (nb, window)
        replays it for every L with L < window, whatever the rows.
        """
        input_ids, lengths, bank_rows = inputs[:nb, None], inputs[nb:2 * nb], inputs[2 * nb:3 * nb]
        offset = inputs[3 * nb]
        columns = torch.arange(window, device=inputs.device)[None]
        mask = (columns >= (offset - lengths)[:, None]) & (columns <= offset)
        cache = self.cache.decode_view(nb, window, offset)
        positions = lengths[:, None] + self.store.bank.entry_lengths[bank_rows, None]
        hidden = self.backbone.hidden_states(input_ids=input_ids, position_ids=positions,
                                             ctx=self._context(bank_rows, mask, cache))
        return self.backbone.lm_head(hidden[:, -1])

    def _context(self, entries: torch.Tensor, mask: torch.Tensor, cache: KVCache) -> AttentionContext:
        """Prefix attention of rows reading bank `entries` [n] (their prefix padding hidden by the store's
        bias when adapters differ in length), own keys under `mask` [n, S], through `cache`."""
        bank = self.store.bank
        bias = None if bank.prefix_bias is None else bank.prefix_bias[entries]
        return AttentionContext("prefix", bank.keys, bank.values, entries, key_padding_mask=mask, cache=cache,
                                backend=self.backend, prefix_bias=bias)

    # rows and slots ---------------------------------------------------------------------------
    def _emit(self, row: _Row, token: int | None) -> bool:
        """Record a sampled token, tell the client, and return whether the row has finished. token None: the
        row's logits were not finite, which ends it alone with an error."""
        request, params = row.request, row.request.params
        if token is None:
            self._finish(request, "error", f"adapter {request.adapter!r} produced non-finite logits (NaN or inf)")
            return True
        request.output_ids.append(token)
        now = time.monotonic()
        if request.first_token_time is None:
            request.first_token_time = now
            self.metrics.observe(self.metrics.ttft, now - request.arrival)
        else:
            self.metrics.observe(self.metrics.itl, now - row.last_time)
        row.last_time = now
        row.last_token = token
        reason = None
        if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_set:
            reason = "stop"
        delta, stopped = row.tracker.push([] if reason else [token])
        if stopped:
            reason = "stop"
        elif reason is None and len(request.output_ids) >= params.max_tokens:
            reason = "length"
        if reason and not stopped:
            delta += row.tracker.flush()
        request.text = row.tracker.text
        if reason:
            self._finish(request, reason, None, update=RequestUpdate([token], delta, True, reason))
            return True
        self._notify(request, RequestUpdate([token], delta, False, None))
        return False

    def _finish(self, request: Request, reason: str, error: str | None, update: RequestUpdate | None = None):
        if request.done.is_set():
            return
        request.finish_reason, request.error = reason, error
        request.finish_time = time.monotonic()
        self.metrics.finished(reason)
        self.metrics.observe(self.metrics.e2e, request.finish_time - request.arrival)
        # Done before the update: a waiter woken by the update must find the request finished, or it sleeps
        # a poll interval before looking again.
        request.done.set()
        self._notify(request, update or RequestUpdate([], "", True, reason))

    @staticmethod
    def _notify(request: Request, update: RequestUpdate) -> None:
        if request.on_update is not None:
            try:
                request.on_update(request, update)
            except Exception:  # a listener's failure is never the batch's
                logger.exception("on_update of request %s failed", request.request_id)

    def _free(self, i: int) -> None:
        """Free slot i at once: the last active row moves into it, so rows stay packed."""
        last = len(self.rows) - 1
        if i != last:
            # The whole slot, not only the moved row's tokens: the freed row's leftovers (NaN, if its adapter
            # overflowed) would sit under the moved row's mask, and a masked NaN still poisons 0 * value.
            self.cache.move_slot(i, last)
            self.rows[i] = self.rows[last]
        self.rows.pop()
        if not self.rows:
            self.L = 0

    def _rebase(self, new_L: int) -> None:
        """Move every row's tokens so that they end at offset new_L (one block copy per layer)."""
        self.cache.rebase(len(self.rows), max([r.length for r in self.rows], default=0), new_L)

    def _abort_all(self, message: str, running_only: bool = False) -> None:
        for row in self.rows:
            self._finish(row.request, "error" if running_only else "abort", message)
        self.rows.clear()
        self.L = 0
        if running_only:
            return
        with self.lock:
            waiting, self.queue = list(self.queue), deque()
        for request in waiting:
            self._finish(request, "abort", message)
