"""Kernel launches per training step, counted on the CPU: what an eager step makes the host issue on CUDA,
and what the Trainer's default step (one CUDA graph per batch shape, `CudaGraphStep`) issues instead.

    python -m bench.step_launches                                  # Llama-3.2-1B shape, B8 T128, P100
    python -m bench.step_launches --model tiny-llama --out /tmp/launches.json

Why: at soft-prompt sizes a step is host-bound on a fast GPU (H200, 2026-12-04, prompt tuning P100 on the
shared-prefix path, T128: ~2,200 launches and 129 ms of host time per step for 18.7 ms of GPU work;
../shared/measurements/2026-12-04-h200/prof4.log). The host pays for every launch of an eager step; a
graph replays them all for one. And every launch the graph holds still costs the GPU a few microseconds
(issue 25's fusions: fewer kernels and copies per layer), so both counts matter.

No GPU is needed. The model lives on the meta device (shapes and strides, no storage, and autograd, which
fake CUDA tensors lack in a CPU-only torch build) and is taken for CUDA wherever fastprompt or PyTorch
chooses by device (`meta_as_cuda`):
- tensors' `is_cuda` is true on meta, so every fastprompt op takes its Triton kernel; the kernels'
  launches are recorded, not run (the launchers see an sm_90 GPU with 132 SMs);
- AdamW is built as on CUDA: foreach, and for the graphed step capturable with its learning rate a tensor;
- the model's plan takes its path (auto: by cost) and attention route as on CUDA;
- autocast is off (the step runs in the model's dtype, bf16);
- scaled-dot-product attention, which on meta would decompose into its math path, is a stand-in counted
  as CUDA runs it (flash or memory-efficient attention): one launch forward, three backward.

A launch is a Triton kernel or an aten op that launches a CUDA kernel: everything but allocations, views
and metadata (`NO_LAUNCH`). cuBLAS may split a matmul into more than one kernel and a foreach op launches
one kernel per group of tensors, so the counts are lower bounds of what the GPU profile shows. Providers
(bench/training.py's): `peft-sdpa` and `fastprompt-eager` (path auto; `-shared`, `-concat`: that path) step
eagerly (loss, backward, the bench's AdamW);
`fastprompt` is the default (`CudaGraphStep`): its row gives the host's launches per step once captured,
and the launches the captured step holds. Prints a table; --out writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
from datetime import date
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that launch nothing on CUDA: allocations, views, metadata
NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view",
             "reshape", "as_strided", "t", "transpose", "permute", "expand", "squeeze", "unsqueeze", "slice",
             "select", "split", "split_with_sizes", "unbind", "detach", "alias", "unflatten", "flatten",
             "_reshape_alias", "view_as", "lift_fresh", "is_same_size", "sym_size", "sym_stride", "sym_numel",
             "sym_storage_offset", "device", "promote_types", "dim", "is_contiguous", "result_type"}
COPIES = ("aten.copy_", "aten.clone", "aten.cat", "aten._to_copy", "aten.fill_", "aten.zero_", "aten.zeros",
          "aten.new_zeros", "aten.zeros_like", "aten.slice_backward", "aten.select_backward")
PROVIDERS = ("peft-sdpa", "fastprompt-eager", "fastprompt-shared", "fastprompt-concat", "fastprompt")
DEFAULT_PROVIDERS = ("peft-sdpa", "fastprompt-eager", "fastprompt")
SDPA_LAUNCHES = {"forward": 1, "backward": 3}   # flash attention's on CUDA: dO.O, the main kernel, dQ's convert


class Launches:
    """Launch counters by name ("aten.mm", "triton._fwd_kernel", "sdpa.forward", "graph.replay",
    "sync.host_read"); `into(c)` makes `c` the counter that launches go to while its context is open (none
    is counted outside one)."""

    def __init__(self):
        self.current: list[collections.Counter] = []

    def add(self, name: str, n: int = 1) -> None:
        if self.current:
            self.current[-1][name] += n

    @contextlib.contextmanager
    def into(self, counter: collections.Counter):
        self.current.append(counter)
        try:
            yield counter
        finally:
            self.current.pop()


class _AtenLaunches(TorchDispatchMode):
    def __init__(self, launches: Launches):
        super().__init__()
        self.launches = launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        # A host read (.item(), bool(t), .tolist(), .cpu()): on CUDA the host waits for the GPU here. A meta
        # tensor has no value: 1 (True) is what the steps counted here read (an all-ones attention mask),
        # zeros what they copy (task ids: task 0).
        if name == "_local_scalar_dense" and args[0].device.type == "meta":
            self.launches.add("sync.host_read")
            return True if args[0].dtype == torch.bool else 1
        to = (kwargs or {}).get("device")
        if name == "_to_copy" and args[0].device.type == "meta" and to is not None and torch.device(to).type != "meta":
            self.launches.add("sync.host_read")
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype, device=kwargs["device"])
        if name not in NO_LAUNCH:
            self.launches.add(f"aten.{name}")
        return func(*args, **(kwargs or {}))


def _sdpa_stand_in(launches: Launches):
    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            launches.add("sdpa.forward", SDPA_LAUNCHES["forward"])
            ctx.shapes = (q, k, v)
            return q.new_empty(*q.shape[:-1], v.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            launches.add("sdpa.backward", SDPA_LAUNCHES["backward"])
            return tuple(t.new_empty(t.shape) for t in ctx.shapes)

    def sdpa(query, key, value, *args, **kwargs):
        return Attention.apply(query, key, value)
    return sdpa


class _MetaRecorder:
    """CudaGraphStep's recorder on meta: capture runs the step once into a counter of its own (what the graph
    holds); a replay is one launch."""

    device_type = "meta"

    def __init__(self, launches: Launches, captured: collections.Counter):
        self.launches, self.captured = launches, captured

    def pool(self):
        return None

    def side_stream(self):
        return contextlib.nullcontext()

    def record(self, body, pool):
        with self.launches.into(self.captured):
            body()
        launches = self.launches

        class Graph:
            def replay(self):
                launches.add("graph.replay")
        return Graph()


def _adamw_as_on_cuda(params, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """`fastprompt.train.adamw_for_graphs` as it is on CUDA (capturable, foreach, the learning rate a tensor),
    for meta parameters (AdamW's constructor reads the learning rate's value: made on the CPU, then moved)."""
    optimizer = torch.optim.AdamW(params, lr=torch.tensor(float(lr)), weight_decay=weight_decay, capturable=True,
                                  foreach=True)
    lr_tensor = torch.full((), float(lr), device="meta")
    for group in optimizer.param_groups:
        group["lr"] = lr_tensor
    return optimizer


def _as_on_cuda(choose):
    """`choose(..., device_type)` (a cost model of fastprompt.path_choice) asked about CUDA for meta."""
    return lambda *args: choose(*args[:-1], "cuda" if args[-1] == "meta" else args[-1])


@contextlib.contextmanager
def meta_as_cuda(launches: Launches, captured: collections.Counter):
    """Meta tensors taken for CUDA tensors, launches recorded into `launches` (see the module docstring)."""
    # every kernel module imported before TRITON_INTERPRET reads as off below: the kind of kernel object
    # (interpreted or compiled) is fixed at import, and all must be the one kind whose launch is patched
    from fastprompt.kernels import linear_cross_entropy, norms, prompt_embed  # noqa: F401
    from fastprompt.kernels import prefix_attention as PA
    from fastprompt import planner
    from fastprompt.train import cuda_graphs, optim

    kernel_class = type(PA._fwd_kernel)
    route = planner.prefix_attention_route
    is_autocast_enabled = torch.is_autocast_enabled

    def run(self, *args, grid, warmup, **kwargs):
        launches.add(f"triton.{self.fn.__name__}")

    with contextlib.ExitStack() as stack:
        for patch in (
                mock.patch.object(kernel_class, "run", run),
                mock.patch.object(PA, "_sm_count", lambda index: 132), mock.patch.object(PA, "_arch", lambda index: 90),
                mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}),
                mock.patch.object(torch.Tensor, "is_cuda", property(lambda t: t.device.type in ("cuda", "meta"))),
                mock.patch.object(torch, "is_autocast_enabled",
                                  lambda *a: False if a and a[0] == "meta" else is_autocast_enabled(*a)),
                mock.patch("torch.optim.adam._get_capturable_supported_devices",
                           lambda supports_xla=True: ["cuda", "meta"]),
                # the model's plan chooses its path and attention route by device: as on CUDA
                mock.patch.object(planner, "path_costs", _as_on_cuda(planner.path_costs)),
                mock.patch.object(planner, "prefix_attention_route",
                                  lambda backend, cuda, **sizes: route(backend, True, **sizes)),
                mock.patch.object(F, "scaled_dot_product_attention", _sdpa_stand_in(launches)),
                mock.patch.object(optim, "adamw_for_graphs", _adamw_as_on_cuda),
                mock.patch.object(cuda_graphs, "RECORDER", _MetaRecorder(launches, captured))):
            stack.enter_context(patch)
        with _AtenLaunches(launches):
            yield


def count_step(model_name: str, method, provider: str, batch: int, seq_len: int, layers: int | None = None) -> dict:
    """Launches of one steady-state training step of `provider` (a bench/training.py provider) on `method`:
    {"host": Counter, "graph": Counter or None}. `layers` overrides the model's depth."""
    from bench import models, training

    launches, captured = Launches(), collections.Counter()
    with meta_as_cuda(launches, captured):
        config = models.CONFIGS[model_name]()
        if layers is not None:
            config.num_hidden_layers = layers
        with mock.patch.dict(models.CONFIGS, {model_name: lambda: config}):
            base = models.build_model(model_name, torch.bfloat16, torch.device("meta"))
        runner = training.PROVIDERS[provider](base, method, None)
        data = training.Batch.random(training.Case(model_name, method, batch, seq_len), 100, torch.device("meta"))
        optimizer = torch.optim.AdamW(list(runner.params.values()), lr=training.LR, foreach=True)  # as on CUDA
        step = training.training_step(runner, data, optimizer)
        step()                                   # first step: optimizer state made, the graph captured
        host = collections.Counter()
        with launches.into(host):
            step()
    return {"host": host, "graph": captured if runner.step is not None else None}


def row(model_name: str, method, provider: str, batch: int, seq_len: int) -> dict:
    """The table's row: launches per step on the host and on the GPU, per layer (the model counted again
    one layer shallower), the copies among them, the host's reads of tensor values (each a wait for the GPU)
    and the ten most launched ops."""
    from bench import models

    full = count_step(model_name, method, provider, batch, seq_len)
    depth = models.CONFIGS[model_name]().num_hidden_layers
    shallower = count_step(model_name, method, provider, batch, seq_len, layers=depth - 1)
    gpu, gpu_shallower = (full["graph"], shallower["graph"]) if full["graph"] is not None else \
        (full["host"], shallower["host"])
    return {"model": model_name, "method": method.label, "batch": batch, "seq_len": seq_len, "provider": provider,
            "host_launches": _launches(full["host"]), "gpu_launches": _launches(gpu),
            "gpu_launches_per_layer": _launches(gpu) - _launches(gpu_shallower),
            "copies": sum(gpu[name] for name in COPIES), "host_reads": full["host"]["sync.host_read"],
            "top": dict(gpu.most_common(10)),
            "date": date.today().isoformat(), "machine": f"{platform.machine()} CPU (counted, no GPU)",
            "torch": torch.__version__}


def _launches(counter: collections.Counter) -> int:
    return sum(n for name, n in counter.items() if not name.startswith("sync."))


def table(rows: list[dict]) -> str:
    lines = ["| method | provider | host launches / step | host reads | GPU launches / step | per layer | copies |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['method']} | {r['provider']} | {r['host_launches']} | {r['host_reads']} | "
              f"{r['gpu_launches']} | {r['gpu_launches_per_layer']} | {r['copies']} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    from bench import training

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-3.2-1b", choices=["llama-3.2-1b", "tiny-llama"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--methods", nargs="+", default=["prompt_tuning-P100", "prefix-P100", "mpt-P100"],
                        choices=[m.label for m in training.METHODS])
    parser.add_argument("--providers", nargs="+", default=list(DEFAULT_PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--out", type=Path, help="write the rows as a JSON list")
    args = parser.parse_args(argv)
    methods = {m.label: m for m in training.METHODS}
    rows = []
    for label in args.methods:
        for provider in args.providers:
            try:
                rows.append(row(args.model, methods[label], provider, args.batch, args.seq_len))
            except training.NotApplicable as reason:
                print(f"{label} {provider}: not applicable ({reason})")
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
