"""Pure-PyTorch references: the definition of correct for every op, and the CPU fallback.

Written for clarity, not speed. Every function computes in fp32 and returns the input dtype.
"""

from __future__ import annotations

import torch


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    task_ids: torch.Tensor,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention in which each batch row first sees its task's prefix, then its own keys.

    q: [B, Hq, T, D]; k, v: [B, Hkv, S, D] (the row's own keys, S >= T: S > T in decoding with a cache);
    prefix_k, prefix_v: [n_tasks, Hkv, P, D] (P may be 0); task_ids: [B] int64 in [0, n_tasks);
    key_padding_mask: [B, S] bool, True = attend. Hq must be a multiple of Hkv (grouped-query attention).
    Causal masking is aligned to the end: query i sees own keys j <= i + S - T. The prefix is always
    visible. A query that sees no key at all (P = 0 and every own key masked) returns zeros, never NaN.
    Returns [B, Hq, T, D] in q's dtype.
    """
    B, Hq, T, D = q.shape
    S, Hkv, P = k.shape[2], k.shape[1], prefix_k.shape[2]
    scale = D**-0.5 if scale is None else scale
    keys = torch.cat([prefix_k[task_ids], k], dim=2).float().repeat_interleave(Hq // Hkv, dim=1)
    values = torch.cat([prefix_v[task_ids], v], dim=2).float().repeat_interleave(Hq // Hkv, dim=1)
    scores = torch.einsum("bhtd,bhsd->bhts", q.float(), keys) * scale

    own_visible = torch.ones(B, 1, T, S, dtype=torch.bool, device=q.device)
    if causal:
        query_pos = torch.arange(T, device=q.device)[:, None] + (S - T)
        own_visible = own_visible & (torch.arange(S, device=q.device)[None, :] <= query_pos)
    if key_padding_mask is not None:
        own_visible = own_visible & key_padding_mask.bool()[:, None, None, :]
    visible = torch.cat([own_visible.new_ones(B, 1, T, P), own_visible], dim=-1)

    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with nothing visible: zeros
    return torch.einsum("bhts,bhsd->bhtd", probs, values).to(q.dtype)


def mpt_prompts(shared: torch.Tensor, task_cols: torch.Tensor, task_rows: torch.Tensor,
                task_ids: torch.Tensor) -> torch.Tensor:
    """MPT task prompts: shared ∘ (task_cols[k] @ task_rows[k]) for each k in task_ids.

    shared: [P, d]; task_cols: [n_tasks, P, r]; task_rows: [n_tasks, r, d]; task_ids: [n] int64.
    Returns [n, P, d] in shared's dtype.
    """
    low_rank = torch.bmm(task_cols[task_ids].float(), task_rows[task_ids].float())
    return (shared.float()[None] * low_rank).to(shared.dtype)


def prompt_embed(
    input_ids: torch.Tensor,
    embedding_weight: torch.Tensor,
    prompts: torch.Tensor,
    task_ids: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Embed tokens and place each row's task prompt among them.

    input_ids: [B, T] int64; embedding_weight: [V, d]; prompts: [n_tasks, P, d]; task_ids: [B] int64.
    positions: optional [B, L] int64 map from output position to its source: a value p >= 0 is the
    input token input_ids[b, p]; a value p < 0 is virtual token -p - 1 of the row's prompt. Default: the
    prompt first, then the tokens (L = P + T).
    Returns [B, L, d] in embedding_weight's dtype.
    """
    B, T = input_ids.shape
    P = prompts.shape[1]
    if positions is None:
        positions = default_positions(B, P, T, input_ids.device)
    tokens = embedding_weight.detach()[input_ids]                          # [B, T, d]; frozen
    row_prompts = prompts[task_ids].to(embedding_weight.dtype)             # [B, P, d]
    is_virtual = positions < 0
    token_index = positions.clamp(min=0)
    virtual_index = (-positions - 1).clamp(min=0)
    from_tokens = torch.gather(tokens, 1, token_index[..., None].expand(-1, -1, tokens.shape[-1]))
    from_prompt = torch.gather(row_prompts, 1, virtual_index[..., None].expand(-1, -1, tokens.shape[-1]))
    return torch.where(is_virtual[..., None], from_prompt, from_tokens)


def mpt_prompt_embed(
    input_ids: torch.Tensor,
    embedding_weight: torch.Tensor,
    shared: torch.Tensor,
    task_cols: torch.Tensor,
    task_rows: torch.Tensor,
    task_ids: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """`prompt_embed` with row b's prompt = shared ∘ (task_cols[k] @ task_rows[k]), k = task_ids[b].

    shared: [P, d]; task_cols: [n_tasks, P, r]; task_rows: [n_tasks, r, d]; other arguments and the
    result as in `prompt_embed`.
    """
    all_tasks = torch.arange(task_cols.shape[0], device=task_cols.device)
    prompts = mpt_prompts(shared, task_cols, task_rows, all_tasks)
    return prompt_embed(input_ids, embedding_weight, prompts, task_ids, positions=positions)


def default_positions(batch: int, n_virtual: int, n_tokens: int, device) -> torch.Tensor:
    """The `positions` map of a prompt placed before the tokens: [-1, ..., -P, 0, ..., T - 1] per row."""
    row = torch.cat([-torch.arange(1, n_virtual + 1, device=device), torch.arange(n_tokens, device=device)])
    return row[None].expand(batch, -1)
