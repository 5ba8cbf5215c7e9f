"""Pure-PyTorch references: the definition of correct for every op, and the CPU fallback.

Written for clarity, not speed. Every function computes in fp32 and returns the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    bank_rows: torch.Tensor,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention in which each batch row first sees its prefix from the bank, then its own keys.

    q: [B, Hq, T, D]; k, v: [B, Hkv, S, D] (the row's own keys; when causal S >= T, S > T in decoding with
    a cache);
    prefix_k, prefix_v: [n_bank, Hkv, P, D] (P may be 0); bank_rows: [B] int64 in [0, n_bank);
    key_padding_mask: [B, S] bool, True = attend. Hq must be a multiple of Hkv (grouped-query attention).
    bias: optional finite float [B or 1, Hq or 1, T or 1, P + S] over [prefix ; own keys], added to the
    scaled scores (broadcast over size-1 dimensions).
    Causal masking is aligned to the end: query i sees own keys j <= i + S - T. The prefix is always
    visible; masked keys stay masked whatever their bias. A query that sees no key at all (P = 0 and every
    own key masked) returns zeros, never NaN. Returns [B, Hq, T, D] in q's dtype.
    """
    B, Hq, T, D = q.shape
    S, Hkv, P = k.shape[2], k.shape[1], prefix_k.shape[2]
    keys = torch.cat([prefix_k[bank_rows], k], dim=2).float()
    values = torch.cat([prefix_v[bank_rows], v], dim=2).float()

    own_visible = torch.ones(B, 1, T, S, dtype=torch.bool, device=q.device)
    if causal:
        query_pos = torch.arange(T, device=q.device)[:, None] + (S - T)
        own_visible = own_visible & (torch.arange(S, device=q.device)[None, :] <= query_pos)
    if key_padding_mask is not None:
        own_visible = own_visible & key_padding_mask.bool()[:, None, None, :]
    visible = torch.cat([own_visible.new_ones(B, 1, T, P), own_visible], dim=-1)

    # A query that sees nothing would softmax over an empty set (NaN): let it see everything, then
    # zero its output, which keeps its gradients finite (zero) too.
    sees_something = visible.any(dim=-1, keepdim=True)
    attn_mask = visible | ~sees_something
    if bias is not None:
        attn_mask = torch.where(attn_mask, bias.float(), float("-inf"))
    out = F.scaled_dot_product_attention(q.float(), keys, values, attn_mask=attn_mask, scale=scale,
                                         enable_gqa=Hq != Hkv)
    return (out * sees_something).to(q.dtype)


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
    bank_rows: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Embed tokens and place each row's prompt (its row of the prompt bank) among them.

    input_ids: [B, T] int64; embedding_weight: [V, d]; prompts: [n_bank, P, d] (P may be 0);
    bank_rows: [B] int64 in [0, n_bank).
    positions: optional [B, L] int64 map from output position to its source: a value p >= 0 is the
    input token input_ids[b, p]; a value p < 0 is virtual token -p - 1 of the row's prompt. Default: the
    prompt first, then the tokens (L = P + T).
    Returns [B, L, d] in embedding_weight's dtype.
    """
    P = prompts.shape[1]
    tokens = embedding_weight.detach()[input_ids]                          # [B, T, d]; frozen
    row_prompts = rows_of(prompts, bank_rows).to(embedding_weight.dtype)   # [B, P, d]
    sources = torch.cat([row_prompts, tokens], dim=1)                      # [B, P + T, d]
    if positions is None:       # the default layout is the sources themselves
        return sources
    # One gather from [prompt ; tokens] per row: it never indexes an empty prompt (P = 0 is just the tokens).
    index = torch.where(positions < 0, -positions - 1, positions + P)
    return torch.gather(sources, 1, index[..., None].expand(-1, -1, tokens.shape[-1]))


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


def rows_of(bank: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """bank[rows] ([n, ...] indexed by rows [B]); a one-row bank is expanded instead (every valid row index
    is 0): a view whose backward is a sum, not a gather with a scatter-add backward."""
    return bank.expand(rows.shape[0], *bank.shape[1:]) if bank.shape[0] == 1 else bank[rows]


def default_positions(batch: int, n_virtual: int, n_tokens: int, device) -> torch.Tensor:
    """The `positions` map of a prompt placed before the tokens: [-1, ..., -P, 0, ..., T - 1] per row."""
    row = torch.cat([-torch.arange(1, n_virtual + 1, device=device), torch.arange(n_tokens, device=device)])
    return row[None].expand(batch, -1)


# ----------------------------------------------------------------------------------------------------------
# Frozen-backbone ops: fused LM-head cross-entropy, norms and activations (fastprompt.ops.linear_cross_entropy,
# fastprompt.ops.norms). Frozen weights: these references are plain autograd, the ops return no weight grads.
# ----------------------------------------------------------------------------------------------------------
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of the logits hidden @ weight.T (+ bias) against labels, with the [N, V] logits.

    hidden: [N, d] or [B, T, d] (flattened to N = B * T); weight: [V, d]; bias: optional [V]; labels: [N]
    (or [B, T]) int64, each in [0, V) or == ignore_index. reduction: "mean" (over the tokens whose label is
    not ignore_index; 0 when there is none, where F.cross_entropy gives NaN), "sum", or "none" ([N], 0 at
    ignored tokens). Computed in fp32; returns fp32.
    """
    h = hidden.reshape(-1, hidden.shape[-1]).float()
    logits = h @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    labels = labels.reshape(-1)
    losses = torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (labels != ignore_index).sum().clamp_min(1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LlamaRMSNorm (also Mistral, Qwen2, Qwen3 and Qwen3's q/k norms): x [..., d], weight [d].

    weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype); the dtype of weight * x (x's
    dtype when weight has it).
    """
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """nn.LayerNorm over the last dimension: x [..., d]; weight, bias [d]. Computed in fp32, x's dtype."""
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, as Llama's MLP computes it: silu in fp32 rounded to the input dtype, then the
    product (rounded to the input dtype). gate, up: the same shape and dtype."""
    silu = torch.nn.functional.silu(gate.float()).to(gate.dtype)
    return (silu.float() * up.float()).to(gate.dtype)


def gelu(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GELU in fp32, x's dtype. approximate="tanh": GPT-2's gelu_new,
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); "none": 0.5 x (1 + erf(x / sqrt(2)))."""
    xf = x.float()
    if approximate == "tanh":
        y = 0.5 * xf * (1.0 + torch.tanh(0.7978845608028654 * (xf + 0.044715 * xf.pow(3))))
    else:
        y = 0.5 * xf * (1.0 + torch.erf(xf * 0.7071067811865476))
    return y.to(x.dtype)
