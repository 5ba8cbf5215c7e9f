"""Serving suite: batched greedy generation of many rows whose prompts come from 1 or many tasks.

A workload is `rows` random prompts of `prompt_len` tokens; row i uses prompt-tuning adapter i % n_tasks
(each adapter a distinct random prompt of P virtual tokens). Every provider generates `new_tokens` greedy
tokens for every row (EOS ignored):

  fastprompt-engine    fastprompt.serve.Engine: continuous batching, all adapters' prefixes in one bank
  fastprompt-generate  PromptModel.generate: one call for the whole mixed batch (adapter_names per row)
  peft                 PEFT: one generate per adapter on that adapter's rows (PEFT cannot mix prompt
                       adapters in a batch), groups one after another (the baseline of every ratio)
  naive-concat         plain transformers: each row's prompt concatenated before its embeddings, one
                       generate over the whole batch (every row recomputes its prompt)

Check (on the first run, which is also the warm-up): the provider's tokens are scored by an fp32
reference (the same weights upcast, eager attention, prompt concatenated: the definition) with teacher
forcing; each generated token must be the reference's argmax, up to a margin of RTOL[dtype] x the
position's logit range. In fp32 that is equality of greedy tokens; in half precision it lets a
near-tie go either way, and nothing else.

Latency: each token's time is taken when it exists on the host (the engine's per-token callback; the
LM head's forward hook, after a device synchronisation, for the generate-based providers, whose rows get
their group's step times). TTFT: from the start of the batch to a row's first token (later PEFT groups
wait for the earlier ones: that is what grouping costs). ITL: between consecutive tokens of a row.
p50/p99 over all rows of `reps` runs; tokens/s = rows x new_tokens / the time of the batch's last token
(median over runs).
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import fastprompt
from bench.harness import RTOL, WrongOutput, add_ratios, failure_status, peak_memory_mb, release_memory, synchronize
from bench.models import build_model, model_shape

BASELINE = "peft"
CASE_KEYS = ("model", "num_virtual_tokens", "n_tasks", "rows", "prompt_len", "new_tokens", "dtype")
RATIO_METRICS = ("tokens_per_s", "ttft_ms_p50", "itl_ms_p50")
ROW_KEYS = ("suite", *CASE_KEYS, "method", "model_shape", "provider", "status", "error", "ttft_ms_p50",
            "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "tokens_per_s", "total_ms", "peak_mb")


@dataclass(frozen=True)
class ServeCase:
    model: str
    n_tasks: int
    rows: int
    prompt_len: int
    new_tokens: int
    num_virtual: int


@dataclass
class Workload:
    """The rows and the adapters of one case, on the model's device."""

    input_ids: torch.Tensor    # [rows, prompt_len] int64
    tasks: torch.Tensor        # [rows] int64: row i reads adapter i % n_tasks
    prompts: torch.Tensor      # [n_tasks, P, d] fp32: adapter k's prompt-tuning embeddings
    new_tokens: int

    @classmethod
    def random(cls, case: ServeCase, base: nn.Module, seed: int = 0) -> "Workload":
        gen = torch.Generator().manual_seed(seed)
        embeddings = base.get_input_embeddings().weight
        ids = torch.randint(0, embeddings.shape[0], (case.rows, case.prompt_len), generator=gen)
        # Prompts on the scale of the token embeddings, so they weigh in the output like tokens do.
        prompts = torch.randn(case.n_tasks, case.num_virtual, embeddings.shape[1], generator=gen)
        prompts *= embeddings.float().std().item()
        device = embeddings.device
        return cls(ids.to(device), (torch.arange(case.rows) % case.n_tasks).to(device), prompts.to(device),
                   case.new_tokens)

    @property
    def names(self) -> list[str]:
        return [f"task{k}" for k in range(self.prompts.shape[0])]

    @property
    def row_names(self) -> list[str]:
        return [self.names[t] for t in self.tasks.tolist()]


@dataclass
class Generation:
    tokens: torch.Tensor    # [rows, new_tokens] int64, CPU
    times: torch.Tensor     # [rows, new_tokens] float64 seconds from the batch's start, CPU


class StepClock:
    """Host times of every call of `module` (the LM head: once per decoding step), each taken after a
    device synchronisation so that it marks when the step's logits exist."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.stamps: list[float] = []
        self._device = device
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        synchronize(self._device)
        self.stamps.append(time.perf_counter())

    def remove(self) -> None:
        self._handle.remove()


# A provider builds its model(s) for a workload and returns the call that generates the whole workload once.
Provider = Callable[[nn.Module, Workload], Callable[[], Generation]]


def _prompt_model(base: nn.Module, w: Workload) -> fastprompt.PromptModel:
    model = fastprompt.PromptModel(copy.deepcopy(base))
    for k, name in enumerate(w.names):
        model.add_adapter(name, fastprompt.PromptTuningConfig(num_virtual_tokens=w.prompts.shape[1]))
        model.prompt_sources[name].load_state_dict({"embedding.weight": w.prompts[k]})
    return model


def fastprompt_generate(base: nn.Module, w: Workload) -> Callable[[], Generation]:
    """PromptModel.generate over the whole mixed batch."""
    model = _prompt_model(base, w)
    device = model.backbone.device

    def run() -> Generation:
        clock = StepClock(model.backbone.lm_head, device)
        try:
            synchronize(device)
            start = time.perf_counter()
            out = model.generate(w.input_ids, adapter_names=w.row_names, max_new_tokens=w.new_tokens,
                                 eos_token_id=[])
        finally:
            clock.remove()
        return _same_steps(out[:, w.input_ids.shape[1]:], clock.stamps, start)
    return run


def fastprompt_engine(base: nn.Module, w: Workload) -> Callable[[], Generation]:
    """fastprompt.serve.Engine with one slot per row; every request submitted at once."""
    from fastprompt.serve import Engine, Request, SamplingParams

    model = _prompt_model(base, w)
    rows, prompt_len = w.input_ids.shape
    engine = Engine(model, max_slots=rows, max_len=prompt_len + w.new_tokens, max_queue=rows)
    for name in w.names:
        engine.add_adapter(name, model, name)

    def run() -> Generation:
        stamps: dict[str, list[float]] = {}

        def on_update(request, update):
            stamps.setdefault(request.request_id, []).extend(time.perf_counter() for _ in update.token_ids)

        params = SamplingParams(max_tokens=w.new_tokens, temperature=0.0, ignore_eos=True)
        requests = [Request(ids, name, params, on_update=on_update)
                    for ids, name in zip(w.input_ids.tolist(), w.row_names)]
        synchronize(model.backbone.device)
        start = time.perf_counter()
        engine.generate(requests)
        for r in requests:
            if r.finish_reason != "length":
                raise RuntimeError(f"engine request ended with {r.finish_reason!r}: {r.error}")
        tokens = torch.tensor([r.output_ids for r in requests])
        times = torch.tensor([stamps[r.request_id] for r in requests], dtype=torch.float64) - start
        return Generation(tokens, times)
    return run


def peft_grouped(base: nn.Module, w: Workload) -> Callable[[], Generation]:
    """PEFT with one prompt-tuning adapter per task; one generate per adapter over its rows."""
    import peft

    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=w.prompts.shape[1])
    backbone = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(backbone, config, adapter_name=w.names[0])
        for name in w.names[1:]:
            model.add_adapter(name, config)
    for k, name in enumerate(w.names):
        model.prompt_encoder[name].load_state_dict({"embedding.weight": w.prompts[k]})
    device = w.input_ids.device

    def run() -> Generation:
        rows, prompt_len = w.input_ids.shape
        tokens = torch.zeros(rows, w.new_tokens, dtype=torch.long)
        times = torch.zeros(rows, w.new_tokens, dtype=torch.float64)
        clock = StepClock(backbone.get_output_embeddings(), device)
        try:
            synchronize(device)
            start = time.perf_counter()
            for k, name in enumerate(w.names):
                rows_k = (w.tasks == k).nonzero().flatten()
                ids = w.input_ids[rows_k]
                model.set_adapter(name)
                first = len(clock.stamps)
                with warnings.catch_warnings():  # PEFT warns, every call, that it ignores position ids
                    warnings.simplefilter("ignore")
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **_greedy(w))
                group = _same_steps(out[:, prompt_len:], clock.stamps[first:], start)
                tokens[rows_k.cpu()], times[rows_k.cpu()] = group.tokens, group.times
        finally:
            clock.remove()
        return Generation(tokens, times)
    return run


def naive_concat(base: nn.Module, w: Workload) -> Callable[[], Generation]:
    """transformers' generate on inputs_embeds: each row's prompt concatenated before its embeddings."""
    model = copy.deepcopy(base)
    device = w.input_ids.device

    def run() -> Generation:
        clock = StepClock(model.get_output_embeddings(), device)
        try:
            synchronize(device)
            start = time.perf_counter()
            embeds = concatenated_embeddings(model, w, w.input_ids)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
            out = model.generate(inputs_embeds=embeds, attention_mask=mask, **_greedy(w))
        finally:
            clock.remove()
        return _same_steps(out[:, -w.new_tokens:], clock.stamps, start)
    return run


PROVIDERS: dict[str, Provider] = {
    "peft": peft_grouped,
    "fastprompt-engine": fastprompt_engine,
    "fastprompt-generate": fastprompt_generate,
    "naive-concat": naive_concat,
}


def _greedy(w: Workload) -> dict:
    """transformers generate arguments: exactly new_tokens greedy tokens (EOS suppressed until then)."""
    return dict(max_new_tokens=w.new_tokens, min_new_tokens=w.new_tokens, do_sample=False, pad_token_id=0)


def concatenated_embeddings(model: nn.Module, w: Workload, ids: torch.Tensor, rows=slice(None)) -> torch.Tensor:
    """[rows, P + len, d]: each row's prompt, then the embeddings of `ids` (the rows `rows` of the workload)."""
    tokens = model.get_input_embeddings()(ids)
    return torch.cat([w.prompts[w.tasks[rows]].to(tokens.dtype), tokens], dim=1)


def _same_steps(tokens: torch.Tensor, stamps: list[float], start: float) -> Generation:
    """Rows generated together: every row's i-th token exists at the i-th step's time."""
    tokens = tokens.cpu()
    if len(stamps) != tokens.shape[1]:
        raise RuntimeError(f"expected one LM head call per new token, got {len(stamps)} for {tokens.shape[1]}")
    times = (torch.tensor(stamps, dtype=torch.float64) - start).expand(tokens.shape[0], -1).clone()
    return Generation(tokens, times)


# ---------------------------------------------------------------------------------------------------------
# the check and the statistics
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def check_tokens(provider: str, tokens: torch.Tensor, w: Workload, reference: nn.Module, rtol: float,
                 rows_per_chunk: int = 4) -> None:
    """Raise WrongOutput unless every generated token ([rows, new_tokens]) is the fp32 reference's argmax
    at its position, up to rtol x that position's logit range (teacher forcing on the provider's tokens)."""
    tokens = tokens.to(w.input_ids.device)
    n = w.new_tokens
    for start in range(0, tokens.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        seq = torch.cat([w.input_ids[rows], tokens[rows, :-1]], dim=1)
        logits = reference(inputs_embeds=concatenated_embeddings(reference, w, seq, rows),
                           logits_to_keep=n).logits.float()                    # [c, n, V]
        best, worst = logits.max(-1).values, logits.min(-1).values
        chosen = logits.gather(-1, tokens[rows, :, None]).squeeze(-1)
        bad = chosen < best - rtol * (best - worst)
        if bad.any():
            r, i = (int(v) for v in bad.nonzero()[0])
            raise WrongOutput(f"{provider}: token {i} of row {start + r} is not the fp32 reference's greedy "
                              f"choice (its logit {float(chosen[r, i]):.4f}, the best {float(best[r, i]):.4f}); "
                              "refusing to report its speed")


def latency_stats(times: list[torch.Tensor]) -> dict:
    """TTFT and inter-token latency p50/p99 (ms) over every row of every run, tokens/s and the batch's
    total ms (medians over runs). times: per run [rows, new_tokens] seconds from the batch's start."""
    def q(values: torch.Tensor, p: float) -> float:
        return float(values.quantile(p)) * 1e3

    ttft = torch.cat([t[:, 0] for t in times])
    itl = torch.cat([(t[:, 1:] - t[:, :-1]).flatten() for t in times])
    totals = torch.tensor([float(t.max()) for t in times], dtype=torch.float64)
    throughput = torch.tensor([t.numel() / float(t.max()) for t in times], dtype=torch.float64)
    return {"ttft_ms_p50": q(ttft, 0.5), "ttft_ms_p99": q(ttft, 0.99),
            "itl_ms_p50": q(itl, 0.5) if itl.numel() else None, "itl_ms_p99": q(itl, 0.99) if itl.numel() else None,
            "tokens_per_s": float(throughput.quantile(0.5)), "total_ms": float(totals.quantile(0.5)) * 1e3}


# ---------------------------------------------------------------------------------------------------------
# the suite
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    reps: int = 2


def serving_cases(model: str, rows: int, task_counts: tuple[int, ...], prompt_len: int, new_tokens: int,
                  num_virtual: int) -> list[ServeCase]:
    """One case per number of distinct tasks; ValueError when a count is not in 1..rows."""
    for n in task_counts:
        if not 1 <= n <= rows:
            raise ValueError(f"each number of tasks must lie in 1..rows={rows}, got {n}")
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (an inter-token latency needs two tokens), got {new_tokens}")
    return [ServeCase(model, n, rows, prompt_len, new_tokens, num_virtual) for n in task_counts]


def bench_case(base: nn.Module, reference: nn.Module, case: ServeCase, settings: Settings,
               providers: dict[str, Provider], log=print) -> list[dict]:
    """One row per provider (see the module docstring); a refused, out-of-memory or failed provider gets
    a row with its status and error."""
    common = dict(suite="serving", model=case.model, method="prompt_tuning", num_virtual_tokens=case.num_virtual,
                  n_tasks=case.n_tasks, rows=case.rows, prompt_len=case.prompt_len, new_tokens=case.new_tokens,
                  dtype=str(settings.dtype).removeprefix("torch."), model_shape=model_shape(base))
    w = Workload.random(case, base)
    rows = []
    for name, build in providers.items():
        run = None
        try:
            run = build(base, w)
            check_tokens(name, run().tokens, w, reference, RTOL[settings.dtype])
            runs: list[Generation] = []
            peak = peak_memory_mb(lambda: runs.extend(run() for _ in range(settings.reps)), settings.device)
            rows.append({**dict.fromkeys(ROW_KEYS), **common, "provider": name, "status": "ok",
                         **latency_stats([g.times for g in runs]), "peak_mb": peak})
        except WrongOutput as error:
            rows.append({**dict.fromkeys(ROW_KEYS), **common, "provider": name, "status": "refused",
                         "error": str(error)})
        except Exception as error:  # OOM, or a failure: reported in the row, the next provider runs
            status, message = failure_status(error)
            rows.append({**dict.fromkeys(ROW_KEYS), **common, "provider": name, "status": status, "error": message})
        finally:
            del run
            release_memory(settings.device)
        row = rows[-1]
        log(f"serving {case.model} {case.n_tasks} tasks x {case.rows} rows {name}: {row['status']}"
            + (f" {row['tokens_per_s']:.1f} tokens/s" if row["status"] == "ok" else f" ({row['error']})"))
    return rows


def run(cases: list[ServeCase], settings: Settings, providers: dict[str, Provider] | None = None,
        log=print) -> list[dict]:
    """Rows of every case, with the ratios to PEFT of tokens/s, TTFT p50 and ITL p50 added."""
    providers = PROVIDERS if providers is None else providers
    rows = []
    for model_name in dict.fromkeys(c.model for c in cases):
        base = build_model(model_name, settings.dtype, settings.device)
        reference = copy.deepcopy(base).float()
        reference.set_attn_implementation("eager")
        for case in (c for c in cases if c.model == model_name):
            rows += bench_case(base, reference, case, settings, providers, log)
        del base, reference
        release_memory(settings.device)
    return add_ratios(rows, group_by=CASE_KEYS, baseline=BASELINE, metrics=RATIO_METRICS)

