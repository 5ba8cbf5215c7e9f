"""Fused prompt embedding (prompt tuning, P-tuning templates, MPT): Triton kernels vs the references.

Every output and every gradient (prompts; shared, task_cols, task_rows) is compared with the reference run
in fp32 on the same inputs upcast. Under TRITON_INTERPRET=1 (CPU) the shapes stay small but odd.
"""

from __future__ import annotations

import pytest
import torch

from fastprompt import ops
from fastprompt.kernels import prompt_embed as K
from fastprompt.ops import reference
from tests.helpers import DEVICE, RTOL, assert_close, nan_like

# (B, T, P, d, n_tasks, task_ids): a task used by no row and one used by several rows, then one prompt for
# every row (prompt tuning; in the default layout its gradient is one sum over the rows).
SHAPES = [
    pytest.param(3, 13, 7, 40, 4, [2, 0, 2], id="B3-T13-P7-d40"),
    pytest.param(5, 6, 3, 72, 3, [0, 2, 0, 2, 2], id="B5-T6-P3-d72"),
    pytest.param(4, 9, 5, 48, 1, [0, 0, 0, 0], id="B4-T9-P5-d48-one-prompt"),
]
# (embedding dtype, prompt-parameter dtype); the last is fp32 prompts on a bf16 model
DTYPES = [
    pytest.param(torch.float32, torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-emb-fp32-prompt"),
]
LAYOUTS = ["prefix", "template"]
VOCAB = 61


def _rtol(*dtypes: torch.dtype) -> float:
    return max(RTOL[dt] for dt in dtypes)


def _template(B: int, T: int, P: int, seed: int = 1) -> torch.Tensor:
    """P-tuning-like layouts [B, T + P]: tokens, then virtual tokens in a shuffled order with one of them
    missing and another repeated, then the rest of the tokens; the split point differs per row."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(B):
        virt = (torch.randperm(P, generator=gen) + 1).tolist()
        if P > 1:
            virt[-1] = virt[0]                           # virtual token virt[0] twice, the last one never
        split = (b * 5 + 1) % (T + 1)
        rows.append(list(range(split)) + [-v for v in virt] + list(range(split, T)))
    return torch.tensor(rows, dtype=torch.int64, device=DEVICE)


def _tokens(B, T, d, n_tasks, task_ids, emb_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (B, T), generator=gen).to(DEVICE)
    weight = torch.randn(VOCAB, d, generator=gen).to(DEVICE, emb_dtype)
    return input_ids, weight, torch.tensor(task_ids, dtype=torch.int64, device=DEVICE), gen


def _grad_leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _upcast_leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().requires_grad_(True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("emb_dtype, prm_dtype", DTYPES)
@pytest.mark.parametrize("B, T, P, d, n_tasks, task_ids", SHAPES)
def test_prompt_embed(B, T, P, d, n_tasks, task_ids, emb_dtype, prm_dtype, layout):
    input_ids, weight, task_ids, gen = _tokens(B, T, d, n_tasks, task_ids, emb_dtype)
    prompts = torch.randn(n_tasks, P, d, generator=gen).to(DEVICE, prm_dtype)
    positions = _template(B, T, P) if layout == "template" else None
    L = T + P

    weight_leaf, prompts_leaf = _grad_leaf(weight), _grad_leaf(prompts)
    out = ops.prompt_embed(input_ids, weight_leaf, prompts_leaf, task_ids, positions=positions,
                           backend="triton")
    ref_prompts = _upcast_leaf(prompts)
    ref = reference.prompt_embed(input_ids, weight.float(), ref_prompts, task_ids, positions=positions)
    assert out.shape == (B, L, d) and out.dtype == emb_dtype
    rtol = _rtol(emb_dtype, prm_dtype)
    assert_close("out", out, ref, rtol)

    grad_out = torch.randn(B, L, d, generator=gen).to(DEVICE, emb_dtype)
    out.backward(grad_out)
    ref.backward(grad_out.float())
    assert prompts_leaf.grad.dtype == prm_dtype
    assert_close("d prompts", prompts_leaf.grad, ref_prompts.grad, rtol)
    assert weight_leaf.grad is None, "the frozen embedding table must get no gradient"


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("emb_dtype, prm_dtype", DTYPES)
@pytest.mark.parametrize("B, T, P, d, n_tasks, task_ids", SHAPES)
def test_mpt_prompt_embed(B, T, P, d, n_tasks, task_ids, emb_dtype, prm_dtype, layout, rank):
    input_ids, weight, task_ids, gen = _tokens(B, T, d, n_tasks, task_ids, emb_dtype)
    shared = torch.randn(P, d, generator=gen).to(DEVICE, prm_dtype)
    task_cols = torch.randn(n_tasks, P, rank, generator=gen).to(DEVICE, prm_dtype)
    task_rows = torch.randn(n_tasks, rank, d, generator=gen).to(DEVICE, prm_dtype)
    positions = _template(B, T, P, seed=2) if layout == "template" else None
    L = T + P

    weight_leaf = _grad_leaf(weight)
    params = [_grad_leaf(t) for t in (shared, task_cols, task_rows)]
    out = ops.mpt_prompt_embed(input_ids, weight_leaf, *params, task_ids, positions=positions,
                               backend="triton")
    ref_params = [_upcast_leaf(t) for t in (shared, task_cols, task_rows)]
    ref = reference.mpt_prompt_embed(input_ids, weight.float(), *ref_params, task_ids, positions=positions)
    assert out.shape == (B, L, d) and out.dtype == emb_dtype
    rtol = _rtol(emb_dtype, prm_dtype)
    assert_close("out", out, ref, rtol)

    grad_out = torch.randn(B, L, d, generator=gen).to(DEVICE, emb_dtype)
    out.backward(grad_out)
    ref.backward(grad_out.float())
    for name, leaf, ref_leaf in zip(("d shared", "d task_cols", "d task_rows"), params, ref_params):
        assert leaf.grad.dtype == prm_dtype, name
        assert_close(name, leaf.grad, ref_leaf.grad, rtol)
    assert weight_leaf.grad is None, "the frozen embedding table must get no gradient"


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mpt_prompts(dtype, rank):
    P, d, n_tasks = 5, 40, 4
    gen = torch.Generator().manual_seed(3)
    shared, task_cols, task_rows = (torch.randn(*s, generator=gen).to(DEVICE, dtype)
                                    for s in ((P, d), (n_tasks, P, rank), (n_tasks, rank, d)))
    task_ids = torch.tensor([3, 0, 3], dtype=torch.int64, device=DEVICE)   # a task twice, two never
    params = [_grad_leaf(t) for t in (shared, task_cols, task_rows)]
    out = ops.mpt_prompts(*params, task_ids, backend="triton")
    ref_params = [_upcast_leaf(t) for t in (shared, task_cols, task_rows)]
    ref = reference.mpt_prompts(*ref_params, task_ids)
    assert out.shape == (3, P, d) and out.dtype == dtype
    assert_close("prompts", out, ref, RTOL[dtype])
    grad_out = torch.randn(3, P, d, generator=gen).to(DEVICE, dtype)
    out.backward(grad_out)
    ref.backward(grad_out.float())
    for name, leaf, ref_leaf in zip(("d shared", "d task_cols", "d task_rows"), params, ref_params):
        assert_close(name, leaf.grad, ref_leaf.grad, RTOL[dtype])


def test_positions_expanded_default_layout():
    """An explicit (expanded, non-contiguous) default positions map gives the default result."""
    B, T, P, d, n_tasks = 3, 13, 7, 40, 4
    input_ids, weight, task_ids, gen = _tokens(B, T, d, n_tasks, [2, 0, 2], torch.float32)
    prompts = _grad_leaf(torch.randn(n_tasks, P, d, generator=gen).to(DEVICE))
    positions = reference.default_positions(B, P, T, DEVICE)
    assert not positions.is_contiguous()
    out = ops.prompt_embed(input_ids, weight, prompts, task_ids, positions=positions, backend="triton")
    ref = reference.prompt_embed(input_ids, weight, prompts, task_ids)
    assert_close("out", out, ref, RTOL[torch.float32])


def test_int32_indices_and_no_virtual_tokens():
    """int32 ids, task ids and positions; a layout with no virtual token gives a zero prompt gradient."""
    B, T, P, d, n_tasks = 3, 13, 7, 40, 4
    input_ids, weight, task_ids, gen = _tokens(B, T, d, n_tasks, [2, 0, 2], torch.float32)
    prompts = _grad_leaf(torch.randn(n_tasks, P, d, generator=gen).to(DEVICE))
    positions = _template(B, T, P)
    out = ops.prompt_embed(input_ids.int(), weight, prompts, task_ids.int(), positions=positions.int(),
                           backend="triton")
    ref = reference.prompt_embed(input_ids, weight, prompts, task_ids, positions=positions)
    assert_close("out", out, ref, RTOL[torch.float32])
    tokens_only = torch.arange(T, device=DEVICE).flip(0)[None].expand(B, -1)
    out = ops.prompt_embed(input_ids, weight, prompts, task_ids, positions=tokens_only, backend="triton")
    assert_close("out", out, weight[input_ids.flip(1)], RTOL[torch.float32])
    out.sum().backward()
    assert torch.equal(prompts.grad, torch.zeros_like(prompts))


@pytest.mark.parametrize("layout", ["prefix", "tokens-reversed"])
def test_no_virtual_tokens_both_backends(layout):
    """P = 0: the output is the embeddings alone, on both backends; the (empty) prompt gradient agrees."""
    B, T, d, n_tasks = 3, 11, 24, 2
    input_ids, weight, task_ids, _ = _tokens(B, T, d, n_tasks, [1, 0, 1], torch.float32)
    positions = None if layout == "prefix" else torch.arange(T, device=DEVICE).flip(0)[None].expand(B, -1)
    want = weight[input_ids] if positions is None else weight[input_ids.flip(1)]
    grads = {}
    for backend in ("torch", "triton"):
        prompts = torch.randn(n_tasks, 0, d, device=DEVICE, requires_grad=True)
        out = ops.prompt_embed(input_ids, weight, prompts, task_ids, positions=positions, backend=backend)
        assert_close(f"{backend} out", out, want, RTOL[torch.float32])
        (grads[backend],) = torch.autograd.grad(out, prompts, torch.randn_like(out))
    assert grads["torch"].shape == grads["triton"].shape == (n_tasks, 0, d)


@pytest.mark.parametrize("op", ["mpt_prompt_embed", "mpt_prompts"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mpt_rank_zero_is_refused(op, backend):
    B, T, P, d, n_tasks = 2, 5, 3, 8, 2
    input_ids, weight, task_ids, gen = _tokens(B, T, d, n_tasks, [0, 1], torch.float32)
    shared = torch.randn(P, d, generator=gen).to(DEVICE)
    task_cols, task_rows = torch.randn(n_tasks, P, 0).to(DEVICE), torch.randn(n_tasks, 0, d).to(DEVICE)
    with pytest.raises(ValueError, match=r"task_cols .* and task_rows .* must have rank r >= 1, got r=0"):
        if op == "mpt_prompts":
            ops.mpt_prompts(shared, task_cols, task_rows, task_ids, backend=backend)
        else:
            ops.mpt_prompt_embed(input_ids, weight, shared, task_cols, task_rows, task_ids, backend=backend)


@pytest.mark.parametrize("param", ["prompts", "shared", "task_cols", "task_rows"])
def test_prompt_parameters_on_another_device_are_named(param):
    """A prompt parameter on another device (here "meta") is refused by name before any kernel runs."""
    B, T, P, d, n_tasks, rank = 2, 5, 3, 8, 2, 2
    input_ids, weight, task_ids, gen = _tokens(B, T, d, n_tasks, [0, 1], torch.float32)
    params = {"prompts": torch.randn(n_tasks, P, d, generator=gen), "shared": torch.randn(P, d, generator=gen),
              "task_cols": torch.randn(n_tasks, P, rank, generator=gen),
              "task_rows": torch.randn(n_tasks, rank, d, generator=gen)}
    params = {name: t.to("meta" if name == param else DEVICE) for name, t in params.items()}
    message = rf"one device.*'{param}': device\(type='meta'\)"
    mpt = (params["shared"], params["task_cols"], params["task_rows"])
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=message):
            if param == "prompts":
                ops.prompt_embed(input_ids, weight, params["prompts"], task_ids, backend=backend)
            else:
                ops.mpt_prompt_embed(input_ids, weight, *mpt, task_ids, backend=backend)
        if param != "prompts":
            with pytest.raises(ValueError, match=message):
                ops.mpt_prompts(*mpt, task_ids, backend=backend)


def check_launchers(B, T, P, d, vocab, n_tasks, rank, row_tasks, dtype, layouts=("prefix", "template"), seed=0):
    """Every launcher (prompt tuning, MPT, MPT prompts alone, the prompt gradient) against the reference, into
    NaN-filled outputs: every element must be written, a task no row uses gets a zero gradient. Shared with
    the native GPU test at model sizes (tests/gpu)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (B, T), generator=gen).to(DEVICE)
    weight = torch.randn(vocab, d, generator=gen).to(DEVICE, dtype)
    task_ids = torch.tensor(row_tasks, dtype=torch.int64, device=DEVICE)
    unused = sorted(set(range(n_tasks)) - set(row_tasks))
    prompts = torch.randn(n_tasks, P, d, generator=gen).to(DEVICE, dtype)
    shared = torch.randn(P, d, generator=gen).to(DEVICE, dtype)
    task_cols = torch.randn(n_tasks, P, rank, generator=gen).to(DEVICE, dtype)
    task_rows = torch.randn(n_tasks, rank, d, generator=gen).to(DEVICE, dtype)
    rtol = RTOL[dtype]
    for layout in layouts:
        positions = _template(B, T, P) if layout == "template" else None
        L = T + P
        out = K.prompt_embed_fwd(input_ids, weight, prompts, task_ids, positions, out=nan_like((B, L, d), dtype))
        ref = reference.prompt_embed(input_ids, weight.float(), prompts.float(), task_ids, positions=positions)
        assert_close("prompt_embed out", out, ref, rtol)
        out = K.mpt_prompt_embed_fwd(input_ids, weight, shared, task_cols, task_rows, task_ids, positions,
                                     out=nan_like((B, L, d), dtype))
        ref = reference.mpt_prompt_embed(input_ids, weight.float(), shared.float(), task_cols.float(),
                                         task_rows.float(), task_ids, positions=positions)
        assert_close("mpt_prompt_embed out", out, ref, rtol)

        grad_out = torch.randn(B, L, d, generator=gen).to(DEVICE, dtype)
        grad = K.prompt_grad(grad_out, task_ids, n_tasks, P, positions, out=nan_like((n_tasks, P, d), dtype),
                             dtype=dtype)
        leaf = _upcast_leaf(prompts)
        reference.prompt_embed(input_ids, weight.float(), leaf, task_ids, positions=positions).backward(
            grad_out.float())
        assert_close("prompt grad", grad, leaf.grad, rtol)
        assert torch.all(grad[unused] == 0), "tasks no row uses must get zero gradient"

    ids = torch.tensor([row_tasks[-1], row_tasks[0], row_tasks[-1]], device=DEVICE)
    out = K.mpt_prompts_fwd(shared, task_cols, task_rows, ids, out=nan_like((3, P, d), dtype))
    ref = reference.mpt_prompts(shared.float(), task_cols.float(), task_rows.float(), ids)
    assert_close("mpt_prompts out", out, ref, rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_launchers_write_every_element(dtype):
    check_launchers(B=3, T=13, P=7, d=40, vocab=VOCAB, n_tasks=4, rank=3, row_tasks=[2, 0, 2], dtype=dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiles_smaller_than_the_data(layout):
    """Tiles smaller than the data: several d-blocks (the last one partial), row tiles straddling two rows,
    and several iterations of the gradient loop (a task read by 4 rows, 2 at a time)."""
    B, T, P, d, n_tasks, rank = 5, 6, 3, 40, 3, 3
    input_ids, weight, task_ids, gen = _tokens(B, T, d, n_tasks, [2, 2, 0, 2, 2], torch.float32)
    prompts = torch.randn(n_tasks, P, d, generator=gen).to(DEVICE)
    shared = torch.randn(P, d, generator=gen).to(DEVICE)
    task_cols = torch.randn(n_tasks, P, rank, generator=gen).to(DEVICE)
    task_rows = torch.randn(n_tasks, rank, d, generator=gen).to(DEVICE)
    positions = _template(B, T, P) if layout == "template" else None
    rtol = RTOL[torch.float32]
    out = K.prompt_embed_fwd(input_ids, weight, prompts, task_ids, positions, blocks=(4, 16),
                             out=nan_like((B, T + P, d), torch.float32))
    assert_close("out", out, reference.prompt_embed(input_ids, weight, prompts, task_ids, positions=positions),
                 rtol)
    out = K.mpt_prompt_embed_fwd(input_ids, weight, shared, task_cols, task_rows, task_ids, positions,
                                 blocks=(8, 16), out=nan_like((B, T + P, d), torch.float32))
    ref = reference.mpt_prompt_embed(input_ids, weight, shared, task_cols, task_rows, task_ids,
                                     positions=positions)
    assert_close("mpt out", out, ref, rtol)
    grad_out = torch.randn(B, T + P, d, generator=gen).to(DEVICE)
    grad = K.prompt_grad(grad_out, task_ids, n_tasks, P, positions, blocks=(2, 16),
                         out=nan_like((n_tasks, P, d), torch.float32))
    leaf = _grad_leaf(prompts)
    reference.prompt_embed(input_ids, weight, leaf, task_ids, positions=positions).backward(grad_out)
    assert_close("prompt grad", grad, leaf.grad, rtol)


def test_backward_is_deterministic():
    B, T, P, d, n_tasks = 5, 6, 3, 72, 3
    input_ids, weight, task_ids, gen = _tokens(B, T, d, n_tasks, [0, 2, 0, 2, 2], torch.bfloat16)
    grad_out = torch.randn(B, T + P, d, generator=gen).to(DEVICE, torch.bfloat16)
    positions = _template(B, T, P)
    first = K.prompt_grad(grad_out, task_ids, n_tasks, P, positions)
    second = K.prompt_grad(grad_out, task_ids, n_tasks, P, positions)
    assert torch.equal(first, second)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_public_ops_name_the_bad_argument(backend):
    """The ops check their arguments once, before either backend (the launchers trust them), naming each."""
    B, T, P, d, n_tasks = 2, 5, 3, 8, 2
    input_ids, weight, task_ids, gen = _tokens(B, T, d, n_tasks, [0, 1], torch.float32)
    prompts = torch.randn(n_tasks, P, d, generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="prompts must have d=8"):
        ops.prompt_embed(input_ids, weight, prompts[:, :, :-1], task_ids, backend=backend)
    with pytest.raises(ValueError, match="input_ids must be an int64"):
        ops.prompt_embed(input_ids.float(), weight, prompts, task_ids, backend=backend)
    with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {VOCAB}\)"):
        ops.prompt_embed(input_ids + VOCAB, weight, prompts, task_ids, backend=backend)
    with pytest.raises(ValueError, match=r"bank_rows must have shape \[B=2\]"):
        ops.prompt_embed(input_ids, weight, prompts, task_ids[:1], backend=backend)
    with pytest.raises(ValueError, match=r"bank_rows must lie in \[0, 2\)"):
        ops.prompt_embed(input_ids, weight, prompts, task_ids + n_tasks, backend=backend)
    with pytest.raises(ValueError, match=r"task_ids must have shape \[B=2\]"):
        ops.mpt_prompt_embed(input_ids, weight, prompts[0], torch.randn(n_tasks, P, 2).to(DEVICE),
                             torch.randn(n_tasks, 2, d).to(DEVICE), task_ids[:1], backend=backend)
    with pytest.raises(ValueError, match="positions must have shape"):
        ops.prompt_embed(input_ids, weight, prompts, task_ids, positions=torch.zeros(B, 4, 2).long().to(DEVICE),
                         backend=backend)
    with pytest.raises(ValueError, match=r"positions must lie in \[-3, 5\)"):
        ops.prompt_embed(input_ids, weight, prompts, task_ids, positions=torch.full((B, 4), 5, device=DEVICE),
                         backend=backend)
    with pytest.raises(ValueError, match="task_rows"):
        ops.mpt_prompt_embed(input_ids, weight, prompts[0], torch.randn(n_tasks, P, 2).to(DEVICE),
                             torch.randn(n_tasks, 3, d).to(DEVICE), task_ids, backend=backend)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\)"):
        ops.mpt_prompts(prompts[0], torch.randn(n_tasks, P, 2).to(DEVICE), torch.randn(n_tasks, 2, d).to(DEVICE),
                        torch.tensor([2], device=DEVICE), backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("mpt", [False, True], ids=["prompt", "mpt"])
def test_large_shapes_native(mpt):
    """A model-sized batch on the GPU (B8, T512, P100, d4096, bf16, 5 tasks, templated positions)."""
    B, T, P, d, n_tasks, rank = 8, 512, 100, 4096, 5, 4
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 32000, (B, T), generator=gen).to(DEVICE)
    weight = torch.randn(32000, d, generator=gen).to(DEVICE, torch.bfloat16)
    task_ids = torch.tensor([0, 3, 3, 1, 0, 3, 1, 1], device=DEVICE)
    positions = _template(B, T, P)
    grad_out = torch.randn(B, T + P, d, generator=gen).to(DEVICE, torch.bfloat16)
    if mpt:
        params = [torch.randn(*s, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
                  for s in ((P, d), (n_tasks, P, rank), (n_tasks, rank, d))]
        run = lambda ps, backend, w: ops.mpt_prompt_embed(input_ids, w, *ps, task_ids, positions=positions,
                                                          backend=backend)
    else:
        params = [torch.randn(n_tasks, P, d, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()]
        run = lambda ps, backend, w: ops.prompt_embed(input_ids, w, *ps, task_ids, positions=positions,
                                                      backend=backend)
    out = run(params, "triton", weight)
    ref_params = [_upcast_leaf(p) for p in params]
    ref = run(ref_params, "torch", weight.float())
    assert_close("out", out, ref, RTOL[torch.bfloat16])
    out.backward(grad_out)
    ref.backward(grad_out.float())
    for i, (p, rp) in enumerate(zip(params, ref_params)):
        assert_close(f"grad {i}", p.grad, rp.grad, RTOL[torch.bfloat16])
