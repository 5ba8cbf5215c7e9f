"""Public ops: embed tokens and place each row's soft prompt among them in one pass.

One module holds the ops: their checks (shape checks cached per new shape, index ranges on CPU tensors
only, see `fastprompt.ops._checks`), the dispatch (the Triton kernels of `fastprompt.kernels.prompt_embed`,
or the reference `fastprompt.ops.reference`, plain autograd), and the kernels as custom ops
(`fastprompt::prompt_embed`, `fastprompt::mpt_prompt_embed`, `fastprompt::mpt_prompts`, and their backward
`fastprompt::prompt_grad`; torch.library, with fake kernels and autograd; in eager mode the same functions run
through an autograd.Function, `fastprompt.ops._registry`), so that torch.compile(fullgraph=True) traces them.

Gradients flow to the prompt parameters only: prompts (summed per task), or MPT's shared, task_cols and
task_rows. The embedding table is frozen and gets no gradient (even if it requires one); ids get none.
Backward cost: one deterministic kernel reduces the output gradient of every virtual position into a
per-task prompt gradient [n_tasks, P, d] (fp32 accumulation; a stable sort of the positions with torch ops,
no host sync, no atomics); one prompt in the default layout (prompt tuning) takes a single fp32 sum over the
rows instead. For MPT the parameter gradients then come from that [n_tasks, P, d] fp32 tensor
with a few small torch ops (two batched matmuls of rank r, one elementwise product and a sum over tasks):
sizes that do not depend on the batch. Double backward is not supported.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastprompt.ops import reference
from fastprompt.ops._checks import (
    cached, check_float, check_index_dtype, check_index_values, check_rank, check_same_device, spec)
from fastprompt.ops._dispatch import resolve_backend
from fastprompt.ops._registry import autograd_op, plain_op, public_op


@public_op
def prompt_embed(
    input_ids: torch.Tensor,
    embedding_weight: torch.Tensor,
    prompts: torch.Tensor,
    bank_rows: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Row b = [prompts[bank_rows[b]] ; E[input_ids[b]]] (or the layout `positions` gives).

    Shapes: input_ids [B, T] int64 (or int32); embedding_weight [V, d] fp32/bf16/fp16 (frozen: no
    gradient); prompts [n_bank, P, d] fp32/bf16/fp16, the prompt bank; bank_rows [B] int64 (or int32), the
    bank row each batch row reads; positions [B, L] int64 (or int32), where p >= 0 takes input token p and
    p < 0 takes virtual token -p - 1 (default: prompt first, L = P + T). Index ranges are checked on CPU
    tensors only (on CUDA a check would sync).
    Returns [B, L, d] in embedding_weight's dtype; differentiable in `prompts` (gradients summed per bank
    row).

    Example::

        embeds = prompt_embed(input_ids, model.get_input_embeddings().weight, bank, bank_rows)
    """
    _check_prompt_embed(*_token_specs(input_ids, embedding_weight, bank_rows, positions, "bank_rows"),
                        spec("prompts", prompts, "[n_bank, P, d]"))
    _check_token_values(input_ids, embedding_weight, bank_rows, positions, "bank_rows", prompts.shape[0],
                        prompts.shape[1], "rows of prompts")
    return _embed(input_ids, embedding_weight, prompts, bank_rows, positions,
                  resolve_backend(backend, embedding_weight))


@public_op
def prompt_embed_unchecked(input_ids, embedding_weight, prompts, bank_rows, *, positions=None,
                           backend: str) -> torch.Tensor:
    """`prompt_embed` with no checks, on a resolved backend ("triton" or "torch"): for a caller that
    validated the token ids and bank rows itself (a PromptModel forward: its input checks and its routing).
    Arguments and result as in `prompt_embed`."""
    return _embed(input_ids, embedding_weight, prompts, bank_rows, positions, backend)


def _embed(input_ids, embedding_weight, prompts, bank_rows, positions, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _prompt_embed(input_ids, embedding_weight.detach(), prompts, bank_rows, positions)
    return reference.prompt_embed(input_ids, embedding_weight, prompts, bank_rows, positions=positions)


@public_op
def mpt_prompt_embed(
    input_ids: torch.Tensor,
    embedding_weight: torch.Tensor,
    shared: torch.Tensor,
    task_cols: torch.Tensor,
    task_rows: torch.Tensor,
    task_ids: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """`prompt_embed` with row b's prompt = shared ∘ (task_cols[k] @ task_rows[k]), k = task_ids[b].

    Shapes: shared [P, d]; task_cols [n_tasks, P, r] (r >= 1); task_rows [n_tasks, r, d]; fp32/bf16/fp16,
    any mix; the rest as in `prompt_embed`. Differentiable in shared, task_cols and task_rows.
    """
    token_specs = _token_specs(input_ids, embedding_weight, task_ids, positions, "task_ids")
    _check_mpt_prompt_embed(*token_specs, *_mpt_specs(shared, task_cols, task_rows))
    _check_token_values(input_ids, embedding_weight, task_ids, positions, "task_ids", task_cols.shape[0],
                        shared.shape[0], "MPT tasks")
    if resolve_backend(backend, embedding_weight) == "triton":
        return _mpt_prompt_embed(input_ids, embedding_weight.detach(), shared, task_cols,
                                                     task_rows, task_ids, positions)
    return reference.mpt_prompt_embed(input_ids, embedding_weight, shared, task_cols, task_rows,
                                      task_ids, positions=positions)


@public_op
def mpt_prompts(shared, task_cols, task_rows, task_ids, *, backend: str | None = None) -> torch.Tensor:
    """The prompts of the given MPT tasks only: [n, P, d] (shared's dtype) = shared ∘ (task_cols[k] @
    task_rows[k]) for k in task_ids [n] int64 (or int32); shared [P, d], task_cols [n_tasks, P, r],
    task_rows [n_tasks, r, d] as in `mpt_prompt_embed`.

    For the shared-prefix path, which needs the prompts of the batch's distinct tasks, not of each row.
    """
    _check_mpt_prompts(*_mpt_specs(shared, task_cols, task_rows), spec("task_ids", task_ids, "[n]"))
    check_index_values("task_ids", task_ids, 0, task_cols.shape[0], "MPT tasks")
    if resolve_backend(backend, shared) == "triton":
        return _mpt_prompts(shared, task_cols, task_rows, task_ids)
    return reference.mpt_prompts(shared, task_cols, task_rows, task_ids)


# ----------------------------------------------------------------------------------------------------------
# checks: shapes once per new shape (cached), index values per call on CPU tensors
# ----------------------------------------------------------------------------------------------------------
def _token_specs(input_ids, embedding_weight, rows, positions, rows_name: str):
    """rows: the [B] index of each row's prompt, named `rows_name` (bank_rows, or MPT's task_ids)."""
    return (spec("input_ids", input_ids, "[B, T]"), spec("embedding_weight", embedding_weight, "[V, d]"),
            spec(rows_name, rows, "[B]"), spec("positions", positions, "[B, L]"))


def _mpt_specs(shared, task_cols, task_rows):
    return (spec("shared", shared, "[P, d]"), spec("task_cols", task_cols, "[n_tasks, P, r]"),
            spec("task_rows", task_rows, "[n_tasks, r, d]"))


def _check_tokens(input_ids, embedding_weight, rows, positions, rows_name: str, **prompt_params) -> None:
    """The token-side Specs (rows: the prompt index, named `rows_name`), and that they and `prompt_params`
    (by name) share one device."""
    check_rank("input_ids", input_ids, 2, "[B, T]")
    check_rank("embedding_weight", embedding_weight, 2, "[V, d]")
    check_rank(rows_name, rows, 1, "[B]")
    check_float("embedding_weight", embedding_weight)
    check_index_dtype("input_ids", input_ids)
    check_index_dtype(rows_name, rows)
    check_same_device(input_ids=input_ids, embedding_weight=embedding_weight, **{rows_name: rows},
                      positions=positions, **prompt_params)
    B = input_ids.shape[0]
    if rows.shape[0] != B:
        raise ValueError(f"{rows_name} must have shape [B={B}], got {rows.shape}")
    if positions is not None:
        check_rank("positions", positions, 2, "[B, L]")
        if positions.shape[0] != B or positions.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"positions must be an int64 tensor [B={B}, L], got {positions.dtype} "
                             f"{positions.shape}")


def _check_mpt(shared, task_cols, task_rows) -> None:
    check_rank("shared", shared, 2, "[P, d]")
    check_rank("task_cols", task_cols, 3, "[n_tasks, P, r]")
    check_rank("task_rows", task_rows, 3, "[n_tasks, r, d]")
    n_tasks, P, r = task_cols.shape
    if shared.shape[0] != P or task_rows.shape != (n_tasks, r, shared.shape[1]):
        raise ValueError(f"shared [P, d], task_cols [n_tasks, P, r] and task_rows [n_tasks, r, d] disagree: "
                         f"{shared.shape}, {task_cols.shape}, {task_rows.shape}")
    # r = 0 is an empty product (an all-zero prompt) that the Triton kernel cannot tile: reject it in
    # the public op, so both backends refuse it alike.
    if r < 1:
        raise ValueError(f"task_cols [n_tasks, P, r] and task_rows [n_tasks, r, d] must have rank r >= 1, got "
                         f"r={r}")
    for name, s in (("shared", shared), ("task_cols", task_cols), ("task_rows", task_rows)):
        check_float(name, s)


@cached
def _check_prompt_embed(input_ids, embedding_weight, bank_rows, positions, prompts) -> None:
    check_rank("prompts", prompts, 3, "[n_bank, P, d]")
    _check_tokens(input_ids, embedding_weight, bank_rows, positions, "bank_rows", prompts=prompts)
    check_float("prompts", prompts)
    if prompts.shape[2] != embedding_weight.shape[1]:
        raise ValueError(f"prompts must have d={embedding_weight.shape[1]} (the embedding width), got "
                         f"{prompts.shape}")


@cached
def _check_mpt_prompt_embed(input_ids, embedding_weight, task_ids, positions, shared, task_cols, task_rows) -> None:
    _check_mpt(shared, task_cols, task_rows)
    _check_tokens(input_ids, embedding_weight, task_ids, positions, "task_ids", shared=shared,
                  task_cols=task_cols, task_rows=task_rows)
    if shared.shape[1] != embedding_weight.shape[1]:
        raise ValueError(f"shared must have d={embedding_weight.shape[1]}, got {shared.shape}")


@cached
def _check_mpt_prompts(shared, task_cols, task_rows, task_ids) -> None:
    check_rank("task_ids", task_ids, 1, "[n]")
    check_same_device(shared=shared, task_cols=task_cols, task_rows=task_rows, task_ids=task_ids)
    _check_mpt(shared, task_cols, task_rows)
    check_index_dtype("task_ids", task_ids)


def _check_token_values(input_ids, embedding_weight, rows, positions, rows_name: str, n_prompts: int,
                        n_virtual: int, what: str) -> None:
    check_index_values("input_ids", input_ids, 0, embedding_weight.shape[0], "the vocabulary")
    check_index_values(rows_name, rows, 0, n_prompts, what)
    if positions is not None:
        check_index_values("positions", positions, -n_virtual, input_ids.shape[1],
                           "virtual tokens, then input tokens")


# ----------------------------------------------------------------------------------------------------------
# the kernels as custom ops
# ----------------------------------------------------------------------------------------------------------
def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _embed_fake(input_ids, embedding_weight, n_virtual, positions):
    B, T = input_ids.shape
    L = n_virtual + T if positions is None else positions.shape[1]
    return embedding_weight.new_empty((B, L, embedding_weight.shape[1]))


def _prompt_embed_impl(input_ids: torch.Tensor, embedding_weight: torch.Tensor, prompts: torch.Tensor,
                       task_ids: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
    from fastprompt.kernels import prompt_embed as kernels

    return kernels.prompt_embed_fwd(input_ids.contiguous(), embedding_weight.contiguous(), prompts.contiguous(),
                                    task_ids.contiguous(), _contiguous(positions))


def _mpt_prompt_embed_impl(input_ids: torch.Tensor, embedding_weight: torch.Tensor, shared: torch.Tensor,
                           task_cols: torch.Tensor, task_rows: torch.Tensor, task_ids: torch.Tensor,
                           positions: Optional[torch.Tensor]) -> torch.Tensor:
    from fastprompt.kernels import prompt_embed as kernels

    return kernels.mpt_prompt_embed_fwd(input_ids.contiguous(), embedding_weight.contiguous(), shared.contiguous(),
                                        task_cols.contiguous(), task_rows.contiguous(), task_ids.contiguous(),
                                        _contiguous(positions))


def _mpt_prompts_impl(shared: torch.Tensor, task_cols: torch.Tensor, task_rows: torch.Tensor,
                      task_ids: torch.Tensor) -> torch.Tensor:
    from fastprompt.kernels import prompt_embed as kernels

    return kernels.mpt_prompts_fwd(shared.contiguous(), task_cols.contiguous(), task_rows.contiguous(),
                                   task_ids.contiguous())


def _prompt_grad_impl(grad_out: torch.Tensor, task_ids: torch.Tensor, n_tasks: int, n_virtual: int,
                      positions: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """d prompts [n_tasks, P, d] in `dtype`: the output gradient summed per (task, virtual token)."""
    if n_tasks == 1 and positions is None:
        # One prompt before every row: a sum over the rows of their first P positions, one reduction
        # launch (the kernel's route sorts the positions by task first: ten launches for the same sum).
        d_prompts = grad_out[:, :n_virtual].sum(0, keepdim=True, dtype=torch.float32)
        return d_prompts if dtype == torch.float32 else d_prompts.to(dtype)
    from fastprompt.kernels import prompt_embed as kernels

    return kernels.prompt_grad(grad_out.contiguous(), task_ids.contiguous(), n_tasks, n_virtual,
                               _contiguous(positions), dtype=dtype)


def _prompt_embed_setup(ctx, inputs, output):
    _, _, prompts, task_ids, positions = inputs
    ctx.save_for_backward(task_ids, positions)
    ctx.prompts_shape, ctx.prompts_dtype = prompts.shape, prompts.dtype


def _prompt_embed_grad(ctx, grad_out):
    task_ids, positions = ctx.saved_tensors
    d_prompts = None
    if ctx.needs_input_grad[2]:
        n_tasks, P, _ = ctx.prompts_shape
        d_prompts = _prompt_grad(grad_out, task_ids, n_tasks, P, positions, ctx.prompts_dtype)
    return None, None, d_prompts, None, None


def _mpt_setup(first_param: int):
    """setup_context of an MPT op whose (shared, task_cols, task_rows, task_ids) start at `first_param`."""
    def setup(ctx, inputs, output):
        shared, task_cols, task_rows, task_ids = inputs[first_param:first_param + 4]
        positions = inputs[first_param + 4] if len(inputs) > first_param + 4 else None
        ctx.save_for_backward(task_ids, shared, task_cols, task_rows, positions)
        ctx.first_param = first_param
    return setup


def _mpt_grad(ctx, grad_out):
    """d shared, d task_cols, d task_rows from the output gradient (None where not needed), placed among
    the op's inputs."""
    task_ids, shared, task_cols, task_rows, positions = ctx.saved_tensors
    first = ctx.first_param
    needs = ctx.needs_input_grad[first:first + 3]
    d_shared = d_cols = d_rows = None
    if any(needs):
        n_tasks, P, _ = task_cols.shape
        # g[k, i] = sum of the output gradient over the positions that read virtual token i of task k
        g = _prompt_grad(grad_out, task_ids, n_tasks, P, positions, torch.float32)
        s, c, r = shared.float(), task_cols.float(), task_rows.float()
        gs = g * s[None]                                                  # d low_rank [n_tasks, P, d]
        d_shared = (g * torch.bmm(c, r)).sum(0).to(shared.dtype) if needs[0] else None
        d_cols = torch.bmm(gs, r.transpose(1, 2)).to(task_cols.dtype) if needs[1] else None
        d_rows = torch.bmm(c.transpose(1, 2), gs).to(task_rows.dtype) if needs[2] else None
    grads = [None] * len(ctx.needs_input_grad)
    grads[first:first + 3] = d_shared, d_cols, d_rows
    return tuple(grads)


_prompt_grad = plain_op(
    "fastprompt::prompt_grad", _prompt_grad_impl,
    fake=lambda grad_out, task_ids, n_tasks, n_virtual, positions, dtype: grad_out.new_empty(
        (n_tasks, n_virtual, grad_out.shape[2]), dtype=dtype))
_prompt_embed = autograd_op(
    "fastprompt::prompt_embed", _prompt_embed_impl, setup=_prompt_embed_setup, backward=_prompt_embed_grad,
    fake=lambda input_ids, embedding_weight, prompts, task_ids, positions: _embed_fake(
        input_ids, embedding_weight, prompts.shape[1], positions))
# mpt_prompt_embed: (input_ids, embedding_weight, shared, task_cols, task_rows, task_ids, positions)
_mpt_prompt_embed = autograd_op(
    "fastprompt::mpt_prompt_embed", _mpt_prompt_embed_impl, setup=_mpt_setup(2), backward=_mpt_grad,
    fake=lambda input_ids, embedding_weight, shared, task_cols, task_rows, task_ids, positions: _embed_fake(
        input_ids, embedding_weight, shared.shape[0], positions))
# mpt_prompts: (shared, task_cols, task_rows, task_ids); its output [n, P, d] is all virtual positions: the
# default layout with no tokens
_mpt_prompts = autograd_op(
    "fastprompt::mpt_prompts", _mpt_prompts_impl, setup=_mpt_setup(0), backward=_mpt_grad,
    fake=lambda shared, task_cols, task_rows, task_ids: shared.new_empty((task_ids.shape[0], *shared.shape)))
