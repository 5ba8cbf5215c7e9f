"""Training suite: one soft-prompt training step, fastprompt against PEFT, on the same model, batch and data.

For each case (model, method, batch, sequence length) every provider builds its own copy of the frozen
backbone, loads the same prompt parameters, and is checked before it is timed:

  peft-sdpa         PEFT's prompt-learning model, SDPA attention (the baseline of every ratio)
  peft-eager        the same with eager attention
  peft-lora-r16     PEFT LoRA r=16 (alpha 32, PEFT's default target modules) on the same model: what
                    users train instead of a soft prompt
  fastprompt        what a user gets by default, the Trainer's step: on CUDA the whole step (forward,
                    backward, AdamW) replayed from a CUDA graph (fastprompt.train.CudaGraphStep); elsewhere
                    eager, as fastprompt-eager. A graph's peak_mb is that of its build and capture (see
                    Memory below): a replay allocates nothing, its memory is the graph pool's, held from
                    capture on
  fastprompt-eager  fastprompt eagerly on path="auto" (the cost model's choice; Triton kernels on CUDA)
  fastprompt-shared fastprompt on the shared-prefix path (path="shared_prefix")
  fastprompt-concat fastprompt on the concatenation path (path="concat"); prefix tuning has none (its
                    keys/values are parameters read from the bank): status "n/a", no timing
  fastprompt-torch  fastprompt-eager with kernels off (backend="torch": the PyTorch references)
  fastprompt-loss-graph  the loss's forward and backward replayed from CUDA graphs, the update eager
                    (fastprompt.train.CudaGraphLoss: the Trainer's step with gradient accumulation; CUDA
                    only, "n/a" elsewhere; peak_mb as fastprompt's above)

Check (on the first batch, before any optimizer step): the loss and every prompt-parameter gradient
against an fp32 reference, PEFT on the same weights upcast, computed row by row (the rows have no padding,
so the mean over rows of the row losses is the batch loss), with SDPA attention (in fp32 its memory stays
linear in T, where eager attention's T x T probabilities would take 36 GB at T=4096 on the 1B shape).
fp32 runs are held to 1e-4; in bf16/fp16 a whole backbone drifts from fp32 by itself (PEFT's prompt
gradients by 2% on an 8-layer model), so the bar per quantity is PEFT (SDPA)'s own error in that dtype, x1.25 + 1e-3, or the
ARCHITECTURE.md tolerance 2e-2 where larger. LoRA at initialisation computes the backbone's own function, so its
loss is checked against the backbone's fp32 loss. A provider over the bar is refused: its row carries
the error message and no timing.

A provider that runs the whole step itself (`fastprompt` on CUDA) is checked through that step at learning
rate 0, which leaves the prompt as it was and its gradients in .grad.

Timing: `steps` optimizer steps (forward, backward, AdamW on the trainable parameters) after `warmup`
ones, each between device synchronisations; median and p20/p80. The providers that passed the check are
timed together, one step of each in turn (bench.harness.time_interleaved_ms), so a shared machine's
drifting load falls on all of them alike; their models are all resident meanwhile, each with modules of its
own and the base model's weights (an 8B case holds one model, not one per provider). Memory: the CUDA peak
of one step above what was allocated before it (model and optimizer state included in "before"); for a
provider that replays CUDA graphs, the peak of its build and check (the capture) above what was allocated
before it was built (its prompt and optimizer state included, a few MB); and on every device the
activations autograd saves for the backward (fastprompt.audit.saved_bytes). tokens/s counts the rows'
B·T tokens (virtual tokens are not data). MFU (bench/flops.py): against the device's peak measured once
per run (a large matmul in the run's dtype, peak_tflops_measured), and against the datasheet peak where
one is known (mfu_datasheet, peak_tflops_datasheet; None on CPUs).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

import fastprompt
from bench.flops import measured_peak_flops, mfu, peak_flops, train_step_flops
from bench.harness import (RTOL, WrongOutput, add_ratios, device_name, failure_status, peak_memory_mb,
                           relative_error, release_memory, time_interleaved_ms)
from bench.models import build_model, max_positions, model_shape
from fastprompt.audit import saved_bytes

BASELINE = "peft-sdpa"
LR = 1e-4   # every provider's AdamW
CASE_KEYS = ("model", "method", "num_virtual_tokens", "n_tasks", "batch", "seq_len", "sweep", "dtype")
RATIO_METRICS = ("tokens_per_s", "peak_mb", "saved_mb")
ROW_KEYS = ("suite", *CASE_KEYS, "model_shape", "provider", "status", "error", "loss_rel_err", "grad_rel_err",
            "loss_tolerance", "grad_tolerance", "step_ms", "step_ms_p20", "step_ms_p80", "tokens_per_s", "peak_mb",
            "saved_mb", "flops_per_step", "peak_tflops_measured", "mfu", "peak_tflops_datasheet", "mfu_datasheet")


@dataclass(frozen=True)
class Method:
    """A soft-prompt method at one prompt length; MPT rows cycle over `n_tasks` tasks (mixed rows)."""

    name: str                   # "prompt_tuning", "prefix", "p_tuning_mlp" or "mpt"
    num_virtual: int
    n_tasks: int = 1

    @property
    def label(self) -> str:
        return f"{self.name}-P{self.num_virtual}"

    @property
    def prompt_entries(self) -> int:
        """Distinct prompts the prompt pass runs (prefix tuning has none: its keys/values are parameters)."""
        return 0 if self.name == "prefix" else self.n_tasks

    def peft_config(self):
        """PEFT's config for this method (fastprompt takes the same object)."""
        import peft

        common = dict(task_type="CAUSAL_LM", num_virtual_tokens=self.num_virtual)
        if self.name == "prompt_tuning":
            return peft.PromptTuningConfig(**common)
        if self.name == "prefix":
            return peft.PrefixTuningConfig(**common)
        if self.name == "p_tuning_mlp":
            return peft.PromptEncoderConfig(encoder_reparameterization_type="MLP", **common)
        if self.name == "mpt":
            return peft.MultitaskPromptTuningConfig(num_tasks=self.n_tasks, **common)
        raise ValueError(f"method name must be prompt_tuning, prefix, p_tuning_mlp or mpt, got {self.name!r}")


METHODS = (Method("prompt_tuning", 20), Method("prompt_tuning", 100), Method("prefix", 100),
           Method("p_tuning_mlp", 100), Method("mpt", 100, n_tasks=4))
SWEEP_METHOD = Method("prompt_tuning", 100)


@dataclass(frozen=True)
class Case:
    model: str
    method: Method
    batch: int
    seq_len: int
    sweep: str | None = None    # "seq_len", "batch" or "num_virtual" for the points of a sweep, "longest"
                                # for bench/longest.py's probes, None for the main table


@dataclass
class Batch:
    """One batch of random token ids (no padding: every row has seq_len tokens and labels)."""

    input_ids: torch.Tensor           # [B, T] int64
    attention_mask: torch.Tensor      # [B, T] int64, all ones
    labels: torch.Tensor              # [B, T] int64, = input_ids
    task_ids: torch.Tensor | None     # [B] int64 (MPT: row i has task i % n_tasks), else None

    @classmethod
    def random(cls, case: Case, vocab: int, device: torch.device, seed: int = 0) -> "Batch":
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (case.batch, case.seq_len), generator=gen).to(device)
        task_ids = None
        if case.method.name == "mpt":
            task_ids = (torch.arange(case.batch) % case.method.n_tasks).to(device)
        return cls(ids, torch.ones_like(ids), ids.clone(), task_ids)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int) -> "Batch":
        return Batch(self.input_ids[start:stop], self.attention_mask[start:stop], self.labels[start:stop],
                     None if self.task_ids is None else self.task_ids[start:stop])


# ---------------------------------------------------------------------------------------------------------
# providers: each builds a Runner on its own copy of the backbone
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Runner:
    module: nn.Module
    params: dict[str, nn.Parameter]           # trainable, named as in PEFT's prompt encoder
    loss: Callable[[Batch], torch.Tensor]     # the step's scalar loss on a batch
    has_prompt: bool = True                   # False for LoRA: no prompt (its loss is the backbone's)
    eager_loss: Callable[[Batch], torch.Tensor] | None = None   # a graph replay's eager twin: what the
                                              # saved-activations audit traces (a replay runs no Python)
    step: Callable[[Batch, float], torch.Tensor] | None = None  # the whole optimizer step at a learning
                                              # rate, its loss returned and its gradients left in .grad;
                                              # None: loss, backward and the bench's AdamW


Builder = Callable[[nn.Module, Method, "dict | None"], Runner]


def _backbone_copy(base: nn.Module, attention: str, dtype: torch.dtype | None = None) -> nn.Module:
    """`base` with modules of its own and the given attention. dtype None: its weights and buffers are
    `base`'s own tensors, so N providers cost one model's memory (an 8B model is 16 GB in bf16; nothing
    writes a frozen weight, and freezing one freezes it for all, as every provider does anyway); a dtype:
    new tensors converted to it (the fp32 reference)."""
    tensors = itertools.chain(base.parameters(), base.buffers())
    if dtype is None:
        memo = {id(t): t for t in tensors}
    else:
        memo = {id(t): _converted(t, dtype) for t in tensors}
    model = copy.deepcopy(base, memo)
    model.set_attn_implementation(attention)
    return model


def _converted(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A floating-point tensor converted to `dtype` (a parameter stays a parameter); others as they are."""
    if not tensor.is_floating_point():
        return tensor
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(tensor.detach().to(dtype, copy=True), requires_grad=tensor.requires_grad)
    return tensor.to(dtype, copy=True)


def _prompt_runner(model: nn.Module, prompt: nn.Module, state: "dict | None") -> Runner:
    """A Runner training `prompt` (PEFT's prompt encoder or fastprompt's prompt source, whose parameters
    carry PEFT's names), loaded from `state` when given; the loss is the model's own on a batch."""
    if state is not None:
        prompt.load_state_dict(state)

    def loss(batch: Batch) -> torch.Tensor:
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                     task_ids=batch.task_ids).loss
    return Runner(model, dict(prompt.named_parameters()), loss)


def peft_prompt(attention: str) -> Builder:
    """PEFT's prompt-learning model with the given attention ("sdpa" or "eager"); `state` (a prompt encoder
    state dict) replaces PEFT's initialisation when given."""
    def build(base, method, state):
        import peft

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(_backbone_copy(base, attention), method.peft_config())
        return _prompt_runner(model, model.prompt_encoder["default"], state)
    return build


def peft_lora(base, method, state) -> Runner:
    """PEFT LoRA r=16, alpha 32, on PEFT's default target modules (q_proj/v_proj; GPT-2's c_attn)."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_backbone_copy(base, "sdpa"),
                                    peft.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0))

    def loss(batch: Batch) -> torch.Tensor:
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    return Runner(model, {n: p for n, p in model.named_parameters() if p.requires_grad}, loss, has_prompt=False)


class NotApplicable(Exception):
    """A provider that does not apply to a method (its row: status "n/a", the reason, no timing)."""


def fastprompt_model(backend: str | None, path: str = "auto") -> Builder:
    """fastprompt's PromptModel on `path` ("auto", "shared_prefix" or "concat"); backend None lets each op
    choose (Triton on CUDA), "torch" turns the kernels off. path="concat" raises NotApplicable for prefix
    tuning, which reads its keys/values from the bank on every path."""
    def build(base, method, state):
        if path == "concat" and method.name == "prefix":
            raise NotApplicable("prefix tuning has no concat path: its keys/values are parameters, read from "
                                "the bank")
        model = fastprompt.get_peft_model(_backbone_copy(base, "sdpa"), method.peft_config(), backend=backend,
                                          path=path)
        return _prompt_runner(model, model.prompt_sources["default"], state)
    return build


def fastprompt_default(base, method, state) -> Runner:
    """The Trainer's default step: on CUDA the whole step from a CUDA graph (`CudaGraphStep`: path "auto"
    taken as the shared prefix, AdamW capturable with the bench's learning rate as a tensor), captured on
    the first batch; elsewhere fastprompt-eager's."""
    from fastprompt.train import CudaGraphStep, cuda_graphs

    eager = fastprompt_model(None)(base, method, state)
    if next(base.parameters()).device.type != cuda_graphs.RECORDER.device_type:   # CUDA
        return eager
    graphed = CudaGraphStep(eager.module, lr=LR)

    def step(batch: Batch, lr: float) -> torch.Tensor:
        return graphed(batch.input_ids, batch.attention_mask, batch.labels, batch.task_ids, lr=lr)[0]
    return Runner(eager.module, eager.params, eager.loss, eager_loss=eager.loss, step=step)


def fastprompt_loss_graph(base, method, state) -> Runner:
    """fastprompt (path "auto") with its loss replayed from CUDA graphs (`CudaGraphLoss`, captured on the
    first batch) and the bench's AdamW eager: the Trainer's step with gradient accumulation."""
    from fastprompt.train import CudaGraphLoss

    if next(base.parameters()).device.type != "cuda":
        raise NotApplicable("CUDA graphs need a CUDA device")
    eager = fastprompt_model(None)(base, method, state)
    graphed = CudaGraphLoss(eager.module)

    def loss(batch: Batch) -> torch.Tensor:
        return graphed(batch.input_ids, batch.attention_mask, batch.labels, batch.task_ids)
    return Runner(eager.module, eager.params, loss, eager_loss=eager.loss)


PROVIDERS: dict[str, Builder] = {
    "peft-sdpa": peft_prompt("sdpa"),
    "peft-eager": peft_prompt("eager"),
    "peft-lora-r16": peft_lora,
    "fastprompt": fastprompt_default,
    "fastprompt-eager": fastprompt_model(None),
    "fastprompt-shared": fastprompt_model(None, "shared_prefix"),
    "fastprompt-concat": fastprompt_model(None, "concat"),
    "fastprompt-torch": fastprompt_model("torch"),
    "fastprompt-loss-graph": fastprompt_loss_graph,
}
# The providers that stand for fastprompt in the "every method, on each path" target (eager paths).
PATH_PROVIDERS = ("fastprompt-eager", "fastprompt-shared", "fastprompt-concat")


# ---------------------------------------------------------------------------------------------------------
# the reference and the check
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Reference:
    """fp32 results on the first batch, and (half precision) PEFT (SDPA)'s own errors in the run dtype."""

    loss: float
    grads: dict[str, torch.Tensor]                 # CPU fp32, by parameter name
    base_loss: float                               # the backbone alone: LoRA at initialisation
    bar: dict[str, float] = field(default_factory=dict)   # quantity -> PEFT's error ("loss", "grad")


def loss_and_grads(runner: Runner, batch: Batch, rows_per_chunk: int | None = None) -> tuple[float, dict]:
    """The batch loss and the trainable parameters' gradients (CPU fp32), computed `rows_per_chunk` rows
    at a time (None: all at once) and weighted by rows, which equals the whole batch because every row
    has the same number of labels. Leaves the gradients cleared."""
    n = len(batch)
    chunk = rows_per_chunk or n
    total = 0.0
    for start in range(0, n, chunk):
        part = batch.rows(start, start + chunk)
        loss = runner.loss(part) * (len(part) / n)
        loss.backward()
        total += loss.item()
    grads = {name: p.grad.detach().float().cpu() for name, p in runner.params.items() if p.grad is not None}
    for p in runner.params.values():
        p.grad = None
    return total, grads


def reference(base: nn.Module, method: Method, batch: Batch, dtype: torch.dtype,
              seed: int = 0) -> tuple[Reference, dict]:
    """(Reference, prompt state): PEFT (SDPA) on `base`'s weights in fp32, one row at a time (any batch fits),
    with PEFT's own seeded initialisation of the prompt, which every provider then loads."""
    torch.manual_seed(seed)
    runner = peft_prompt("sdpa")(_backbone_copy(base, "sdpa", torch.float32), method, None)
    runner.module.float()   # PEFT's prompt encoder; the backbone is fp32 already
    # Rounded to the run's dtype and back: the reference starts from the values every provider loads.
    prompt = runner.module.prompt_encoder["default"]
    state = {k: v.detach().to(dtype).float() for k, v in prompt.state_dict().items()}
    prompt.load_state_dict(state)
    loss, grads = loss_and_grads(runner, batch, rows_per_chunk=1)
    with torch.no_grad():
        backbone = runner.module.get_base_model()
        base_loss = sum(backbone(input_ids=batch.input_ids[i:i + 1], labels=batch.labels[i:i + 1]).loss.item()
                        for i in range(len(batch))) / len(batch)
    ref = Reference(loss, grads, base_loss)
    del runner, backbone
    release_memory(batch.input_ids.device)
    if dtype != torch.float32:
        peft_half = peft_prompt("sdpa")(base, method, state)
        half_loss, half_grads = loss_and_grads(peft_half, batch, rows_per_chunk=1)
        ref.bar = {"loss": abs(half_loss - loss) / abs(loss),
                   "grad": max(relative_error(half_grads[n], g) for n, g in grads.items())}
        del peft_half
        release_memory(batch.input_ids.device)
    return ref, state


def tolerance(dtype: torch.dtype, bar: float | None) -> float:
    """Allowed relative error: RTOL[dtype]; in half precision at least PEFT's own error x1.25 + 1e-3."""
    if dtype == torch.float32 or bar is None:
        return RTOL[dtype]
    return max(RTOL[dtype], 1.25 * bar + 1e-3)


def check(provider: str, runner: Runner, batch: Batch, ref: Reference, dtype: torch.dtype) -> dict:
    """Errors and tolerances of the provider's loss and gradients on the first batch against the fp32
    reference; raises WrongOutput (naming the quantity) when one is over its tolerance."""
    if runner.step is not None:
        loss = float(runner.step(batch, 0.0))
        grads = {name: p.grad.detach().float().cpu() for name, p in runner.params.items() if p.grad is not None}
        for p in runner.params.values():
            p.grad = None
    else:
        loss, grads = loss_and_grads(runner, batch)
    expected = ref.loss if runner.has_prompt else ref.base_loss
    result = {"loss_rel_err": abs(loss - expected) / abs(expected),
              "loss_tolerance": tolerance(dtype, ref.bar.get("loss")), "grad_rel_err": None, "grad_tolerance": None}
    if runner.has_prompt:
        if sorted(grads) != sorted(ref.grads):
            raise WrongOutput(f"{provider}: gradients for {sorted(grads)}, the reference has {sorted(ref.grads)}")
        result["grad_rel_err"] = max(relative_error(grads[n], g) for n, g in ref.grads.items())
        result["grad_tolerance"] = tolerance(dtype, ref.bar.get("grad"))
    for quantity in ("loss", "grad"):
        error, tol = result[f"{quantity}_rel_err"], result[f"{quantity}_tolerance"]
        if error is not None and not error <= tol:
            raise WrongOutput(f"{provider}: {quantity} differs from the fp32 reference (relative error "
                              f"{error:.2e} > {tol:.2e}); refusing to report its speed")
    return result


# ---------------------------------------------------------------------------------------------------------
# one case, the suite
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    warmup: int = 5
    steps: int = 20
    peak_flops: float | None = None   # measured FLOP/s for the MFU; `run` measures it when None


def training_step(runner: Runner, batch: Batch, optimizer: torch.optim.Optimizer) -> Callable[[], object]:
    """One optimizer step of `runner` on `batch` at learning rate LR: its own whole step where it has one
    (a CUDA graph's replay; `optimizer` unused), else loss, backward and `optimizer`'s step."""
    if runner.step is not None:
        return lambda: runner.step(batch, LR)

    def step():
        runner.loss(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure(runners: dict[str, Runner], batch: Batch, settings: Settings) -> dict[str, dict | Exception]:
    """Per runner: step time (median, p20, p80 ms; the runners' steps interleaved, `time_interleaved_ms`),
    CUDA peak MB of one step, and MB of activations saved for backward; or the exception it raised."""
    optimizers = {name: torch.optim.AdamW(list(r.params.values()), lr=LR) for name, r in runners.items()}
    steps = {name: training_step(runners[name], batch, optimizers[name]) for name in runners}
    timings = time_interleaved_ms(steps, settings.device, warmup=settings.warmup, reps=settings.steps)
    results: dict[str, dict | Exception] = {}
    for name, timing in timings.items():
        if isinstance(timing, Exception):
            results[name] = timing
            continue
        runner = runners[name]
        try:
            peak = peak_memory_mb(steps[name], settings.device) if runner.eager_loss is None else None
            traced = runner.eager_loss or runner.loss
            saved = saved_bytes(lambda: traced(batch).backward(), exclude=list(runner.module.parameters()))
        except Exception as error:  # reported in the provider's row
            results[name] = error
            continue
        finally:
            optimizers[name].zero_grad(set_to_none=True)
        results[name] = {"step_ms": timing["ms"], "step_ms_p20": timing["ms_p20"], "step_ms_p80": timing["ms_p80"],
                         "peak_mb": peak, "saved_mb": saved.activation_bytes / 2**20}
    return results


def bench_case(base: nn.Module, case: Case, settings: Settings, providers: dict[str, Builder],
               log=print) -> list[dict]:
    """One row per provider for `case` on `base` (see the module docstring); never raises for a provider:
    a refused, out-of-memory, failed or not applicable provider gets a row with its status and error."""
    shape = model_shape(base)
    flops = train_step_flops(shape, batch=case.batch, seq_len=case.seq_len, num_virtual=case.method.num_virtual,
                             prompt_entries=case.method.prompt_entries)
    lora_flops = train_step_flops(shape, batch=case.batch, seq_len=case.seq_len, num_virtual=0, prompt_entries=0)
    datasheet = peak_flops(device_name(settings.device), settings.dtype)
    common = case_columns(case, settings.dtype, shape)
    batch = Batch.random(case, shape["vocab"], settings.device)
    try:
        ref, state = reference(base, case.method, batch, settings.dtype)
    except Exception as error:  # no reference, no check: every provider of the case is reported failed
        status, message = failure_status(error)
        return [result_row(common, provider=name, status=status, error=f"reference: {message}")
                for name in providers]

    # Build and check every provider first, then time those that passed together (interleaved), so that
    # their ratios see the same machine load.
    rows: dict[str, dict] = {}
    runners: dict[str, Runner] = {}
    checked: dict[str, dict] = {}
    setup_peak_mb: dict[str, float | None] = {}
    for name, build in providers.items():
        try:
            made: dict = {}

            def build_and_check():   # a graph is captured by its check's step: its memory is taken here
                made["runner"] = build(base, case.method, state)
                made["checked"] = check(name, made["runner"], batch, ref, settings.dtype)

            setup_peak_mb[name] = peak_memory_mb(build_and_check, settings.device)
            runners[name], checked[name] = made["runner"], made["checked"]
        except NotApplicable as reason:
            rows[name] = result_row(common, provider=name, status="n/a", error=str(reason))
        except WrongOutput as error:
            rows[name] = result_row(common, provider=name, status="refused", error=str(error))
        except Exception as error:  # OOM, or a failure: reported in the row, the next provider runs
            status, message = failure_status(error)
            rows[name] = result_row(common, provider=name, status=status, error=message)
    try:
        measured = measure(runners, batch, settings) if runners else {}
    except Exception as error:  # e.g. out of memory holding the optimizers: every checked provider reports it
        measured = dict.fromkeys(runners, error)
    for name, result in measured.items():
        if isinstance(result, Exception):
            status, message = failure_status(result)
            rows[name] = result_row(common, provider=name, status=status, error=message)
            continue
        step_flops = flops if runners[name].has_prompt else lora_flops
        if runners[name].eager_loss is not None:   # a graph: its pool, filled at capture
            result = {**result, "peak_mb": setup_peak_mb[name]}
        rows[name] = result_row(common, provider=name, status="ok", **checked[name], **result,
                                tokens_per_s=case.batch * case.seq_len / (result["step_ms"] / 1e3),
                                flops_per_step=step_flops,
                                **_mfu(step_flops, result["step_ms"], settings.peak_flops, datasheet))
    del runners, measured
    release_memory(settings.device)
    for name in providers:
        row = rows[name]
        log(f"training {case.model} {case.method.label} B{case.batch} T{case.seq_len} {name}: {row['status']}"
            + (f" {row['step_ms']:.1f} ms/step" if row["status"] == "ok" else f" ({row['error']})"))
    return [rows[name] for name in providers]


def _mfu(flops: int, step_ms: float, measured: float | None, datasheet: float | None) -> dict:
    """The row's MFU columns: against the measured peak and against the datasheet's (None where unknown)."""
    def tflops(peak):
        return None if peak is None else peak / 1e12

    return {"peak_tflops_measured": tflops(measured), "mfu": mfu(flops, step_ms, measured),
            "peak_tflops_datasheet": tflops(datasheet), "mfu_datasheet": mfu(flops, step_ms, datasheet)}


def training_cases(models: list[str], methods: tuple[Method, ...], batch: int, seq_len: int,
                   sweep_seq_lens: tuple[int, ...] = (), sweep_batches: tuple[int, ...] = (),
                   sweep_num_virtual: tuple[int, ...] = ()) -> list[Case]:
    """The main table (every model x method at batch x seq_len), then the sweeps of SWEEP_METHOD on the
    first model: sequence length at `batch`, batch at `seq_len`, virtual tokens (P) at `batch` x `seq_len`.
    Raises ValueError for a case longer than its model's positions (GPT-2: 1024, virtual tokens included)."""
    cases = [Case(m, method, batch, seq_len) for m in models for method in methods]
    cases += [Case(models[0], SWEEP_METHOD, batch, t, "seq_len") for t in sweep_seq_lens]
    cases += [Case(models[0], SWEEP_METHOD, b, seq_len, "batch") for b in sweep_batches]
    cases += [Case(models[0], replace(SWEEP_METHOD, num_virtual=p), batch, seq_len, "num_virtual")
              for p in sweep_num_virtual]
    for case in cases:
        limit = max_positions(case.model)
        if limit is not None and case.seq_len + case.method.num_virtual > limit:
            raise ValueError(f"seq_len={case.seq_len} with {case.method.num_virtual} virtual tokens exceeds "
                             f"{case.model}'s {limit} positions; choose a shorter --seq-len")
    return cases


def run(cases: list[Case], settings: Settings, providers: dict[str, Builder] | None = None, log=print) -> list[dict]:
    """Rows of every case (models built once each, in settings.dtype on settings.device), with the ratios
    to PEFT (SDPA) of tokens/s, peak memory and saved activations added. The device's peak FLOP/s is
    measured once here unless settings carries one."""
    providers = PROVIDERS if providers is None else providers
    if settings.peak_flops is None:
        settings = replace(settings, peak_flops=measured_peak_flops(settings.device, settings.dtype))
    by_case: dict[int, list[dict]] = {}
    for model_name in dict.fromkeys(c.model for c in cases):  # each model built once, rows in case order
        base = build_model(model_name, settings.dtype, settings.device)
        for i, case in enumerate(cases):
            if case.model == model_name:
                by_case[i] = bench_case(base, case, settings, providers, log)
        del base
        release_memory(settings.device)
    rows = [row for i in sorted(by_case) for row in by_case[i]]
    return add_ratios(rows, group_by=CASE_KEYS, baseline=BASELINE, metrics=RATIO_METRICS)


def case_columns(case: Case, dtype: torch.dtype, shape: dict) -> dict:
    """The columns every row of `case` shares (suite, CASE_KEYS, model_shape)."""
    return dict(suite="training", model=case.model, method=case.method.label,
                num_virtual_tokens=case.method.num_virtual, n_tasks=case.method.n_tasks, batch=case.batch,
                seq_len=case.seq_len, sweep=case.sweep, dtype=str(dtype).removeprefix("torch."), model_shape=shape)


def result_row(common: dict, **values) -> dict:
    """A row with every key of ROW_KEYS (None where not measured)."""
    return {**dict.fromkeys(ROW_KEYS), **common, **values}

