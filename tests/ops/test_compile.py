"""torch.compile(fullgraph=True) through every op, forward and backward, equals eager, and so does a whole
training step of a tiny Llama; the custom ops' registrations pass torch.library.opcheck; prefix attention's
route between the kernel and SDPA.

The compiled runs use the "aot_eager" backend: AOTAutograd traces the forward and the backward through
the custom ops' fake kernels and registered autograd (what fullgraph needs), without Inductor's C++
compile, which would take minutes on the CPU. Any graph break fails (fullgraph=True).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fastprompt import ops
from fastprompt.ops import reference
from tests.helpers import DEVICE, RTOL, assert_close

# the modules (fastprompt.ops re-exports functions of the same names)
PA, PE, NORMS, LCE = (importlib.import_module(f"fastprompt.ops.{name}")
                      for name in ("prefix_attention", "prompt_embed", "norms", "linear_cross_entropy"))
BACKENDS = ["torch", "triton"]


def _randn(*shape, seed, dtype=torch.float32, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_(requires_grad)


def _attention_case(backend, P=5, padded=True, bias=False):
    B, Hq, Hkv, T, D = 3, 4, 2, 7, 16
    q, k, v = _randn(B, Hq, T, D, seed=0), _randn(B, Hkv, T, D, seed=1), _randn(B, Hkv, T, D, seed=2)
    pk, pv = _randn(2, Hkv, P, D, seed=3), _randn(2, Hkv, P, D, seed=4)
    rows = torch.tensor([1, 0, 1], device=DEVICE)
    mask = None
    if padded:
        mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
        mask[1, -2:] = False
    b = _randn(1, Hq, T, P + T, seed=5, requires_grad=False) if bias else None
    return (lambda q, k, v, pk, pv: ops.prefix_attention(q, k, v, pk, pv, rows, key_padding_mask=mask, bias=b,
                                                         backend=backend)), (q, k, v, pk, pv)


def _norm_cases(backend):
    x, g, u = _randn(3, 5, 24, seed=0), _randn(3, 5, 24, seed=1), _randn(3, 5, 24, seed=2)
    w, b = _randn(24, seed=3, requires_grad=False), _randn(24, seed=4, requires_grad=False)
    return {
        "rms_norm": (lambda x: ops.rms_norm(x, w, 1e-6, backend=backend), (x,)),
        "layer_norm": (lambda x: ops.layer_norm(x, w, b, 1e-5, backend=backend), (x,)),
        "swiglu": (lambda g, u: ops.swiglu(g, u, backend=backend), (g, u)),
        "gelu": (lambda x: ops.gelu(x, backend=backend), (x,)),
        "gelu-erf": (lambda x: ops.gelu(x, "none", backend=backend), (x,)),
    }


def _prompt_cases(backend):
    B, T, P, d, n_tasks, r = 3, 6, 4, 24, 3, 2
    ids = torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    emb = _randn(50, d, seed=1, requires_grad=False)
    rows = torch.tensor([2, 0, 2], device=DEVICE)
    entries = torch.tensor([2, 0], device=DEVICE)  # made here: a host-to-device copy inside a case would sync
    positions = torch.cat([torch.arange(T)[:2], -torch.arange(1, P + 1), torch.arange(2, T)]).expand(B, -1).to(DEVICE)
    shared, cols, trows = _randn(P, d, seed=2), _randn(n_tasks, P, r, seed=3), _randn(n_tasks, r, d, seed=4)
    return {
        "prompt_embed": (lambda p: ops.prompt_embed(ids, emb, p, rows, backend=backend),
                         (_randn(n_tasks, P, d, seed=5),)),
        "prompt_embed-positions": (lambda p: ops.prompt_embed(ids, emb, p, rows, positions=positions, backend=backend),
                                   (_randn(n_tasks, P, d, seed=5),)),
        "mpt_prompt_embed": (lambda s, c, t: ops.mpt_prompt_embed(ids, emb, s, c, t, rows, backend=backend),
                             (shared, cols, trows)),
        "mpt_prompts": (lambda s, c, t: ops.mpt_prompts(s, c, t, entries, backend=backend),
                        (shared, cols, trows)),
    }


def _cases(backend):
    cases = {"prefix_attention": _attention_case(backend),
             "prefix_attention-P0-unpadded": _attention_case(backend, P=0, padded=False),
             "prefix_attention-bias": _attention_case(backend, padded=False, bias=True)}
    return {**cases, **_norm_cases(backend), **_prompt_cases(backend)}


def _forward_backward(fn, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, out.dtype)
    out.backward(grad)
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile_equals_eager(backend):
    """Each op in a function compiled with fullgraph=True (a graph break raises): the same output and
    gradients as eager, with either backend (triton: the kernels through the interpreter)."""
    torch._dynamo.reset()
    for name, (fn, inputs) in _cases(backend).items():
        want_out, want_grads = _forward_backward(fn, inputs)
        got_out, got_grads = _forward_backward(torch.compile(fn, fullgraph=True, backend="aot_eager"), inputs)
        assert_close(f"{name} out", got_out, want_out, RTOL[torch.float32])
        for i, (got, want) in enumerate(zip(got_grads, want_grads)):
            assert (got is None) == (want is None), f"{name} d input {i}"
            if want is not None:
                assert_close(f"{name} d input {i}", got, want, RTOL[torch.float32])


def test_custom_op_registrations_pass_opcheck():
    """Schema, fake kernel and autograd registration of every custom op (torch.library.opcheck; the fused
    loss with each reduction), on the PyTorch implementations where an op has one and the kernels
    (interpreter) otherwise."""
    x, w = _randn(6, 24, seed=0), _randn(24, seed=1, requires_grad=False)
    torch.library.opcheck(NORMS._norm.op, (x, w, None, 1e-6, True, False))
    torch.library.opcheck(NORMS._activation.op, ("swiglu", x, _randn(6, 24, seed=2), False))
    torch.library.opcheck(NORMS._activation_backward.op, ("gelu", x.detach(), x.detach(), None, False))
    ids = torch.tensor([[1, 4, 2], [0, 3, 3]], device=DEVICE)
    emb = _randn(5, 24, seed=3, requires_grad=False)
    rows = torch.tensor([1, 0], device=DEVICE)
    torch.library.opcheck(PE._prompt_embed.op, (ids, emb, _randn(2, 2, 24, seed=4), rows, None),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    q, k = _randn(2, 2, 3, 16, seed=5), _randn(2, 1, 3, 16, seed=6)
    pk = _randn(2, 1, 2, 16, seed=7)
    torch.library.opcheck(PA._kernel_fwd.op, (q, k, k, pk, pk, rows, None, None, True, 0.25),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    labels = torch.tensor([3, -100, 0, 10, 7], device=DEVICE)
    for reduction, with_grad in ((0, True), (1, True), (2, False)):   # none, mean, sum (ATen's codes)
        torch.library.opcheck(LCE._lce.op, (_randn(5, 24, seed=8), _randn(11, 24, seed=9, requires_grad=False), None,
                                            labels, -100, reduction, 2, with_grad, False),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ----------------------------------------------------------------------------------------------------
# the route between the Triton kernel and SDPA on concatenated keys (CUDA only; the rule is pure)
# ----------------------------------------------------------------------------------------------------
TRAIN = dict(grouped=False, causal=True, has_padding_mask=False, has_bias=False)


@pytest.mark.parametrize("case, want", [
    (dict(T=512, S=512, P=0), "sdpa"),                    # measured 1.8x faster
    (dict(T=2048, S=2048, P=0), "sdpa"),                  # 2.0x
    (dict(T=2048, S=2048, P=100), "sdpa"),                # 1.27x
    (dict(T=512, S=512, P=100), "kernel"),                # 1.05x, less than the copy costs
    (dict(T=1, S=700, P=100), "kernel"),                  # decode: split-KV kernel
    (dict(T=16, S=16, P=0), "kernel"),
    (dict(T=2048, S=2048, P=0, has_padding_mask=True), "kernel"),
    (dict(T=2048, S=2048, P=0, has_bias=True), "kernel"),
    (dict(T=2048, S=2048, P=0, causal=False), "kernel"),  # not measured
    (dict(T=2048, S=2048, P=100, compiling=True), "kernel"),   # CausalBias breaks the graph
    (dict(T=2048, S=2048, P=0, compiling=True), "sdpa"),       # is_causal needs no CausalBias
])
def test_attention_route_picks_as_measured(case, want):
    assert PA.attention_route(**{**TRAIN, **case}) == want


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("P", [0, 6])
@pytest.mark.parametrize("S", [9, 13], ids=["S=T", "S>T"])
def test_both_routes_give_the_same_outputs_and_gradients(S, P, padded):
    """The kernel (interpreter) and SDPA on concatenated keys, with each of its causal masks (lower-right
    CausalBias, what CUDA takes, and the dense one), against the reference: outputs and all five gradients."""
    B, Hq, Hkv, T, D = 3, 4, 2, 9, 16
    inputs = (_randn(B, Hq, T, D, seed=0), _randn(B, Hkv, S, D, seed=1), _randn(B, Hkv, S, D, seed=2),
              _randn(3, Hkv, P, D, seed=3), _randn(3, Hkv, P, D, seed=4))
    rows = torch.tensor([2, 0, 2], device=DEVICE)
    mask = None
    if padded:
        mask = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
        mask[0, :3] = False
    want_out, want_grads = _forward_backward(
        lambda *t: reference.prefix_attention(*t, rows, key_padding_mask=mask), inputs)
    routes = {"kernel": lambda *t: ops.prefix_attention(*t, rows, key_padding_mask=mask, backend="triton")}
    for lower_right in (True, False):
        routes[f"sdpa lower_right_bias={lower_right}"] = (
            lambda *t, lr=lower_right: PA.sdpa_on_concatenated_keys(*t, rows, key_padding_mask=mask,
                                                                    lower_right_bias=lr))
    for name, fn in routes.items():
        out, grads = _forward_backward(fn, inputs)
        assert_close(f"{name} out", out, want_out, RTOL[torch.float32])
        for i, (got, want) in enumerate(zip(grads, want_grads)):
            assert_close(f"{name} d input {i}", got, want, RTOL[torch.float32])


@pytest.mark.parametrize("method, backend", [("prefix_tuning", "triton"), ("prompt_tuning", "torch"),
                                             ("mpt", "triton")])
def test_fullgraph_compile_of_a_training_step(method, backend):
    """A whole training step of a tiny Llama (padded batch) compiled with fullgraph=True: the same loss and
    prompt gradients as eager. Fails on a graph break anywhere in the step, the model's code included."""
    import fastprompt
    from tests.tiny_models import batch, tiny_model

    config = {"prefix_tuning": lambda: fastprompt.PrefixTuningConfig(num_virtual_tokens=6),
              "prompt_tuning": lambda: fastprompt.PromptTuningConfig(num_virtual_tokens=6),
              "mpt": lambda: fastprompt.MultitaskPromptTuningConfig(num_virtual_tokens=5, num_tasks=3,
                                                                    num_ranks=2)}[method]()
    model = fastprompt.get_peft_model(tiny_model("llama"), config, backend=backend)
    ids, mask, labels = batch(3, 9)
    extra = {"task_ids": torch.tensor([2, 0, 2])} if method == "mpt" else {}

    def step(ids, mask, labels):
        return model(input_ids=ids, attention_mask=mask, labels=labels, **extra).loss

    results = []
    torch._dynamo.reset()
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        model.zero_grad()
        loss = fn(ids, mask, labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.prompt_sources.named_parameters()}))
    (want_loss, want_grads), (loss, grads) = results
    assert_close("loss", loss, want_loss, RTOL[torch.float32])
    assert sorted(grads) == sorted(want_grads) and grads
    for name, grad in grads.items():
        assert_close(f"d {name}", grad, want_grads[name], RTOL[torch.float32])
