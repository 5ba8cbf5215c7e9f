"""Public ops: embed tokens and place each row's soft prompt among them in one pass."""

from __future__ import annotations

import torch

from fastprompt.ops import reference
from fastprompt.ops._checks import check_float, check_index, check_rank, check_same_device
from fastprompt.ops._dispatch import resolve_backend


def prompt_embed(
    input_ids: torch.Tensor,
    embedding_weight: torch.Tensor,
    prompts: torch.Tensor,
    task_ids: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Row b = [prompts[task_ids[b]] ; E[input_ids[b]]] (or the layout `positions` gives).

    Shapes: input_ids [B, T] int64; embedding_weight [V, d] (frozen: no gradient); prompts
    [n_tasks, P, d]; task_ids [B] int64; positions [B, L] int64, where p >= 0 takes input token p and
    p < 0 takes virtual token -p - 1 (default: prompt first, L = P + T). Returns [B, L, d] in
    embedding_weight's dtype; differentiable in `prompts` (gradients summed per task).

    Example::

        embeds = prompt_embed(input_ids, model.get_input_embeddings().weight, bank, task_ids)
    """
    check_rank("prompts", prompts, 3, "[n_tasks, P, d]")
    _check_tokens(input_ids, embedding_weight, task_ids, positions, prompts=prompts)
    check_float("prompts", prompts)
    if prompts.shape[2] != embedding_weight.shape[1]:
        raise ValueError(f"prompts must have d={embedding_weight.shape[1]} (the embedding width), got "
                         f"{tuple(prompts.shape)}")
    check_index("task_ids", task_ids, prompts.shape[0], "rows of prompts")
    _check_positions(positions, input_ids.shape[1], prompts.shape[1], input_ids.shape[0])
    if resolve_backend(backend, embedding_weight) == "triton":
        from fastprompt.ops._prompt_embed_triton import prompt_embed_triton

        return prompt_embed_triton(input_ids, embedding_weight, prompts, task_ids, positions=positions)
    return reference.prompt_embed(input_ids, embedding_weight, prompts, task_ids, positions=positions)


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

    Shapes: shared [P, d]; task_cols [n_tasks, P, r]; task_rows [n_tasks, r, d]; the rest as in
    `prompt_embed`. Differentiable in shared, task_cols and task_rows.
    """
    check_rank("shared", shared, 2, "[P, d]")
    check_rank("task_cols", task_cols, 3, "[n_tasks, P, r]")
    check_rank("task_rows", task_rows, 3, "[n_tasks, r, d]")
    _check_tokens(input_ids, embedding_weight, task_ids, positions, shared=shared, task_cols=task_cols,
                  task_rows=task_rows)
    P, d = shared.shape
    n_tasks, _, r = task_cols.shape
    if d != embedding_weight.shape[1]:
        raise ValueError(f"shared must have d={embedding_weight.shape[1]}, got {tuple(shared.shape)}")
    if task_cols.shape[1] != P:
        raise ValueError(f"task_cols must have shape [n_tasks, P={P}, r], got {tuple(task_cols.shape)}")
    if task_rows.shape != (n_tasks, r, d):
        raise ValueError(f"task_rows must have shape [{n_tasks}, {r}, {d}], got {tuple(task_rows.shape)}")
    _check_rank_factors(task_cols)
    for name, t in (("shared", shared), ("task_cols", task_cols), ("task_rows", task_rows)):
        check_float(name, t)
    check_index("task_ids", task_ids, n_tasks, "MPT tasks")
    _check_positions(positions, input_ids.shape[1], P, input_ids.shape[0])
    if resolve_backend(backend, embedding_weight) == "triton":
        from fastprompt.ops._prompt_embed_triton import mpt_prompt_embed_triton

        return mpt_prompt_embed_triton(input_ids, embedding_weight, shared, task_cols, task_rows,
                                       task_ids, positions=positions)
    return reference.mpt_prompt_embed(input_ids, embedding_weight, shared, task_cols, task_rows,
                                      task_ids, positions=positions)


def mpt_prompts(shared, task_cols, task_rows, task_ids, *, backend: str | None = None) -> torch.Tensor:
    """The prompts of the given MPT tasks only: [n, P, d] = shared ∘ (task_cols[k] @ task_rows[k]).

    For the shared-prefix path, which needs the prompts of the batch's distinct tasks, not of each row.
    """
    check_rank("shared", shared, 2, "[P, d]")
    check_rank("task_cols", task_cols, 3, "[n_tasks, P, r]")
    check_rank("task_rows", task_rows, 3, "[n_tasks, r, d]")
    check_rank("task_ids", task_ids, 1, "[n]")
    check_same_device(shared=shared, task_cols=task_cols, task_rows=task_rows, task_ids=task_ids)
    for name, t in (("shared", shared), ("task_cols", task_cols), ("task_rows", task_rows)):
        check_float(name, t)
    n_tasks, P, r = task_cols.shape
    if shared.shape[0] != P or task_rows.shape != (n_tasks, r, shared.shape[1]):
        raise ValueError(f"shared [P, d], task_cols [n_tasks, P, r] and task_rows [n_tasks, r, d] disagree: "
                         f"{tuple(shared.shape)}, {tuple(task_cols.shape)}, {tuple(task_rows.shape)}")
    _check_rank_factors(task_cols)
    check_index("task_ids", task_ids, n_tasks, "MPT tasks")
    if resolve_backend(backend, shared) == "triton":
        from fastprompt.ops._prompt_embed_triton import mpt_prompts_triton

        return mpt_prompts_triton(shared, task_cols, task_rows, task_ids)
    return reference.mpt_prompts(shared, task_cols, task_rows, task_ids)


def _check_tokens(input_ids, embedding_weight, task_ids, positions, **prompt_params: torch.Tensor) -> None:
    """Check the token-side arguments, and that they and `prompt_params` (by name) share one device."""
    check_rank("input_ids", input_ids, 2, "[B, T]")
    check_rank("embedding_weight", embedding_weight, 2, "[V, d]")
    check_rank("task_ids", task_ids, 1, "[B]")
    check_float("embedding_weight", embedding_weight)
    check_same_device(input_ids=input_ids, embedding_weight=embedding_weight, task_ids=task_ids,
                      positions=positions, **prompt_params)
    if task_ids.shape[0] != input_ids.shape[0]:
        raise ValueError(f"task_ids must have shape [B={input_ids.shape[0]}], got {tuple(task_ids.shape)}")
    check_index("input_ids", input_ids, embedding_weight.shape[0], "the vocabulary")


def _check_rank_factors(task_cols: torch.Tensor) -> None:
    # r = 0 is an empty product (an all-zero prompt) that the Triton kernel cannot tile: reject it in
    # the public op, so both backends refuse it alike.
    if task_cols.shape[2] < 1:
        raise ValueError(f"task_cols [n_tasks, P, r] and task_rows [n_tasks, r, d] must have rank r >= 1, got "
                         f"r={task_cols.shape[2]}")


def _check_positions(positions, n_tokens: int, n_virtual: int, batch: int) -> None:
    if positions is None:
        return
    check_rank("positions", positions, 2, "[B, L]")
    if positions.shape[0] != batch or positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"positions must be an int64 tensor [B={batch}, L], got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if positions.is_cuda:  # as check_index: no host sync on CUDA
        return
    if positions.numel() and (int(positions.max()) >= n_tokens or int(positions.min()) < -n_virtual):
        raise ValueError(f"positions must lie in [-{n_virtual}, {n_tokens}) (virtual tokens, then input "
                         f"tokens), got values in [{int(positions.min())}, {int(positions.max())}]")
