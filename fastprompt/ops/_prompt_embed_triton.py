"""Autograd Functions over the fused prompt-embedding kernels (fastprompt.kernels.prompt_embed).

The public ops in `fastprompt.ops.prompt_embed` validate arguments, then call the three functions here.
Gradients flow to the prompt parameters only: prompts (summed per task), or MPT's shared, task_cols and
task_rows. The embedding table is frozen and gets no gradient (even if it requires one); ids get none.

Backward cost: one deterministic kernel reduces the output gradient of every virtual position into a
per-task prompt gradient [n_tasks, P, d] (fp32 accumulation; a stable sort of the positions on the host,
no atomics). For MPT the parameter gradients then come from that [n_tasks, P, d] fp32 tensor with a few
small torch ops (two batched matmuls of rank r, one elementwise product and a sum over tasks): sizes that
do not depend on the batch. Double backward is not supported (once_differentiable).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fastprompt.kernels import prompt_embed as _k


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


class _PromptEmbed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_ids, embedding_weight, prompts, task_ids, positions):
        out = _k.prompt_embed_fwd(input_ids, embedding_weight, prompts, task_ids, positions)
        ctx.save_for_backward(task_ids, positions)
        ctx.prompts_shape = prompts.shape
        ctx.prompts_dtype = prompts.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        task_ids, positions = ctx.saved_tensors
        d_prompts = None
        if ctx.needs_input_grad[2]:
            n_tasks, P, _ = ctx.prompts_shape
            d_prompts = _k.prompt_grad(grad_out.contiguous(), task_ids, n_tasks, P, positions,
                                       dtype=ctx.prompts_dtype)
        return None, None, d_prompts, None, None


def _mpt_param_grads(ctx, grad_out, positions):
    """d shared, d task_cols, d task_rows from the output gradient (None where not needed)."""
    task_ids, shared, task_cols, task_rows = ctx.saved_tensors[:4]
    n_tasks, P, _ = task_cols.shape
    needs = ctx.needs_input_grad[ctx.first_param:ctx.first_param + 3]
    if not any(needs):
        return None, None, None
    # g[k, i] = sum of the output gradient over the positions that read virtual token i of task k
    g = _k.prompt_grad(grad_out.contiguous(), task_ids, n_tasks, P, positions, dtype=torch.float32)
    s, c, r = shared.float(), task_cols.float(), task_rows.float()
    gs = g * s[None]                                                  # d low_rank [n_tasks, P, d]
    d_shared = (g * torch.bmm(c, r)).sum(0).to(shared.dtype) if needs[0] else None
    d_cols = torch.bmm(gs, r.transpose(1, 2)).to(task_cols.dtype) if needs[1] else None
    d_rows = torch.bmm(c.transpose(1, 2), gs).to(task_rows.dtype) if needs[2] else None
    return d_shared, d_cols, d_rows


class _MPTPromptEmbed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_ids, embedding_weight, shared, task_cols, task_rows, task_ids, positions):
        out = _k.mpt_prompt_embed_fwd(input_ids, embedding_weight, shared, task_cols, task_rows, task_ids,
                                      positions)
        ctx.save_for_backward(task_ids, shared, task_cols, task_rows, positions)
        ctx.first_param = 2
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        positions = ctx.saved_tensors[4]
        d_shared, d_cols, d_rows = _mpt_param_grads(ctx, grad_out, positions)
        return None, None, d_shared, d_cols, d_rows, None, None


class _MPTPrompts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shared, task_cols, task_rows, task_ids):
        out = _k.mpt_prompts_fwd(shared, task_cols, task_rows, task_ids)
        ctx.save_for_backward(task_ids, shared, task_cols, task_rows)
        ctx.first_param = 0
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        # the output is [n, P, d] with every position virtual: the default layout with no tokens
        d_shared, d_cols, d_rows = _mpt_param_grads(ctx, grad_out, None)
        return d_shared, d_cols, d_rows, None


def prompt_embed_triton(input_ids, embedding_weight, prompts, task_ids, *, positions=None):
    """Triton path of `fastprompt.ops.prompt_embed` (arguments already validated there)."""
    return _PromptEmbed.apply(input_ids.contiguous(), embedding_weight.detach().contiguous(),
                              prompts.contiguous(), task_ids.contiguous(), _contiguous(positions))


def mpt_prompt_embed_triton(input_ids, embedding_weight, shared, task_cols, task_rows, task_ids, *,
                            positions=None):
    """Triton path of `fastprompt.ops.mpt_prompt_embed` (arguments already validated there)."""
    return _MPTPromptEmbed.apply(input_ids.contiguous(), embedding_weight.detach().contiguous(),
                                 shared.contiguous(), task_cols.contiguous(), task_rows.contiguous(),
                                 task_ids.contiguous(), _contiguous(positions))


def mpt_prompts_triton(shared, task_cols, task_rows, task_ids):
    """Triton path of `fastprompt.ops.mpt_prompts`."""
    return _MPTPrompts.apply(shared.contiguous(), task_cols.contiguous(), task_rows.contiguous(),
                             task_ids.contiguous())
