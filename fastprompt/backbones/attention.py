"""fastprompt's attention implementation, registered in transformers' attention-function registry.

A backbone layer calls it like any attention function; what to do comes in the forward kwarg
`fastprompt_ctx` (an `AttentionContext`):
- "capture": ordinary causal attention over the prompt tokens, keeping each layer's keys and values
  (after rotary embedding) for the bank. This is the prompt pass of the shared-prefix path.
- "prefix": each row attends to its task's prefix from the bank, then to its own keys
  (`fastprompt.ops.prefix_attention`), optionally writing and reading a preallocated key/value cache.
- "packed": the shared-prefix training forward in one backbone pass. The decoder sees one sequence
  [1, n·P + B·T]: the n distinct prompts (P tokens each), then the B rows (T tokens each). The prompts
  attend causally within themselves, and each row reads its task's prompt keys/values of this same layer as
  its prefix. One pass instead of a prompt pass plus a row pass halves the per-layer launches (the GPU step
  is host-bound at T=128) for the same arithmetic. Two forms (`fastprompt.path_choice.PACKED_FORMS`): every
  layer splits its queries/keys/values there and calls prefix attention twice ("split"), or, when the
  context carries the sequence's block mask (`packed_attention_mask`), runs one SDPA call over the whole
  sequence ("masked": all pairs computed, at the host cost of one call).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from fastprompt.ops import prefix_attention, prefix_attention_unchecked

ATTENTION_NAME = "fastprompt"


@dataclass
class KVCache:
    """Preallocated per-layer keys/values of the rows' own tokens: [B, Hkv, max_len, D] each.

    Two ways to write a forward's T new keys/values (`write`):
    - `write_at` None (generation, prefill, training): at [length, length + T), then attention reads
      [0, length + T). `length` is a Python int, so the read's shape follows it.
    - `write_at` a 0-dim int64 tensor on the cache's device (decode steps that a CUDA graph can replay):
      T must be 1; the key goes to column `write_at` (an `index_copy_`, whose index is read on the device)
      and attention reads the cache tensors whole, [0, max_len). Shapes and addresses then do not depend on
      where the write lands, and nothing is read back on the host; the caller's key_padding_mask, not the
      read range, must hide every column that is not the row's (the causal test, aligned to the window's
      end, hides nothing with T = 1).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0  # positions already written (write_at None)
    write_at: torch.Tensor | None = None  # 0-dim int64 device tensor: the column a decode step writes

    @staticmethod
    def nbytes(n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
               dtype: torch.dtype) -> int:
        """Bytes `allocate` takes with the same arguments (keys and values of every layer)."""
        return 2 * n_layers * batch * n_kv_heads * max_len * head_dim * dtype.itemsize

    @classmethod
    def allocate(cls, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> "KVCache":
        shape = (batch, n_kv_heads, max_len, head_dim)
        # Zeros, not torch.empty: with `write_at` attention reads the whole cache, unwritten columns
        # included. The mask gives those a zero weight, but 0 * NaN is NaN, so stale memory holding a NaN
        # or an inf would reach the output; zeros keep every read finite.
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)])

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer `layer`'s new key/value [B, Hkv, T, D] and return the keys/values attention reads,
        [B, Hkv, S, D] (S = length + T, or max_len with write_at)."""
        keys, values = self.keys[layer], self.values[layer]
        if self.write_at is None:
            start, stop = self.length, self.length + key.shape[2]
            keys[:, :, start:stop] = key
            values[:, :, start:stop] = value
            return keys[:, :, :stop], values[:, :, :stop]
        if key.shape[2] != 1:
            raise ValueError(f"KVCache.write_at writes one position per row (decode); got {key.shape[2]} new "
                             f"positions: use `length` for prefill")
        index = self.write_at.view(1)
        keys.index_copy_(2, index, key.to(keys.dtype))
        values.index_copy_(2, index, value.to(values.dtype))
        return keys, values


class Captures:
    """Per-layer keys/values recorded by the prompt pass: `keys[layer]`, `values[layer]`, each
    [n, Hkv, P, D].

    A plain object, not a dataclass or dict: wrappers that rebuild a layer's tensor arguments (FSDP2
    maps them through torch's pytree utilities) leave it as it is, so every copy of the context records
    into the same place.
    """

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}


@dataclass
class AttentionContext:
    """What fastprompt's attention does in one forward of the backbone."""

    mode: str  # "capture" or "prefix"
    prefix_k: list[torch.Tensor] | None = None  # per layer [n_bank, Hkv, P, D]
    prefix_v: list[torch.Tensor] | None = None
    bank_rows: torch.Tensor | None = None  # [B] int64: row b reads bank entry bank_rows[b]
    key_padding_mask: torch.Tensor | None = None  # [B, S] over the row's own keys (cache included)
    cache: KVCache | None = None
    backend: str | None = None
    captured: Captures | None = None  # mode "capture": where the layers record their keys/values
    prefix_bias: torch.Tensor | None = None  # [B, P] float added to each row's prefix scores (serving:
    # -1e9 on the padding of a prefix shorter than the bank's P), 0 over the row's own keys
    packed: tuple[int, int, int, int] | None = None  # mode "packed": (n prompts, P, B rows, T)
    packed_mask: torch.Tensor | None = None  # mode "packed", masked form: `packed_attention_mask`'s [N, N]
    # Planned calls (`fastprompt.planner.ForwardPlan`): the route ("kernel" or "sdpa") of the rows' prefix
    # attention and of the split form's prompt call. Set, the layers call `prefix_attention_unchecked` on it
    # (the planner vouched for the arguments once a forward); None, the public op checks and routes itself.
    row_route: str | None = None
    prompt_route: str | None = None


def fastprompt_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask, scaling: float | None = None,
                         dropout: float = 0.0, fastprompt_ctx: AttentionContext | None = None, **kwargs):
    """query [B, Hq, T, D], key/value [B, Hkv, T, D] → ([B, T, Hq, D], None), as transformers expects.

    Attention-probability dropout is not applied: the backbone is frozen and the shared-prefix path
    is defined as equal to concatenation without backbone dropout.
    """
    if fastprompt_ctx is None:
        raise RuntimeError("fastprompt attention was called without a fastprompt_ctx; call the model "
                           "through fastprompt.PromptModel")
    layer = module.layer_idx
    ctx = fastprompt_ctx
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # Under autocast the projections run in the autocast dtype while rotary embeddings and the
        # bank may not: bring every operand to one dtype.
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if ctx.mode == "capture":
        ctx.captured.keys[layer], ctx.captured.values[layer] = key, value
        n, hkv, _, d = key.shape
        empty = key.new_empty(n, hkv, 0, d)
        no_task = torch.zeros(n, dtype=torch.long, device=key.device)
        out = prefix_attention(query, key, value, empty[:1], empty[:1], no_task, causal=True,
                               scale=scaling, backend=ctx.backend)
    elif ctx.mode == "prefix":
        windowed_read = ctx.cache is not None and ctx.cache.write_at is not None
        if ctx.cache is not None:
            key, value = ctx.cache.write(layer, key, value)
        P, S = ctx.prefix_k[layer].shape[2], key.shape[2]
        window = kwargs.get("sliding_window")
        if window is not None and not windowed_read and P + S > window:
            # Exact only while every key lies inside the window (a serving engine's decode step reads a
            # padded window and checks each request's length instead).
            raise ValueError(f"this model's attention has sliding_window={window}, which fastprompt's prefix "
                             f"attention does not apply: {P} prefix + {S} own keys must be <= {window}")
        bias = None
        if ctx.prefix_bias is not None:
            own = ctx.prefix_bias.new_zeros(ctx.prefix_bias.shape[0], S)
            bias = torch.cat([ctx.prefix_bias, own], dim=1)[:, None, None, :]
        out = _prefix_attention(ctx, ctx.row_route, query, key, value, ctx.prefix_k[layer].to(query.dtype),
                                ctx.prefix_v[layer].to(query.dtype), ctx.bank_rows,
                                key_padding_mask=ctx.key_padding_mask, scale=scaling, bias=bias)
    elif ctx.mode == "packed":
        return _packed_attention(query, key, value, ctx, scaling, kwargs.get("sliding_window")), None
    else:
        raise ValueError(f"AttentionContext.mode must be 'capture', 'prefix' or 'packed', got {ctx.mode!r}")
    return out.transpose(1, 2), None


def _packed_attention(query, key, value, ctx: AttentionContext, scaling, window) -> torch.Tensor:
    """Mode "packed": query [1, Hq, n·P + B·T, D], key/value [1, Hkv, n·P + B·T, D] → [1, n·P + B·T, Hq, D].

    The first n·P positions are the n prompts (causal among their own P tokens), the rest the B rows, each
    reading prompt `ctx.bank_rows[b]`'s keys/values as its prefix. The splits are views; the outputs meet in
    one concatenation.
    """
    n, P, B, T = ctx.packed
    if window is not None and P + T > window:
        raise ValueError(f"this model's attention has sliding_window={window}, which fastprompt's prefix "
                         f"attention does not apply: {P} prefix + {T} own keys must be <= {window}")
    if ctx.packed_mask is not None:
        # The masked form: one call, the mask's dtype is the computation's (fp32 on the CPU, as the op's
        # PyTorch path computes half dtypes).
        dtype = ctx.packed_mask.dtype
        out = F.scaled_dot_product_attention(query.to(dtype), key.to(dtype), value.to(dtype),
                                             attn_mask=ctx.packed_mask, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
        return out.to(query.dtype).transpose(1, 2)
    split = n * P

    def parts(t):     # [1, H, n·P + B·T, D] -> prompts [n, H, P, D], rows [B, H, T, D]
        # One split per tensor (its backward is one concatenation), not two slices (each a zero-filled
        # full-size gradient in the backward).
        prompt, row = t.squeeze(0).split([split, B * T], dim=1)
        return prompt.unflatten(1, (n, P)).transpose(0, 1), row.unflatten(1, (B, T)).transpose(0, 1)

    (prompt_q, row_q), (prompt_k, row_k), (prompt_v, row_v) = parts(query), parts(key), parts(value)
    # No prefix for the prompts: a fresh empty bank (a slice of prompt_k would carry autograd history and
    # make the op concatenate it).
    empty = prompt_k.new_zeros(1, prompt_k.shape[1], 0, prompt_k.shape[3])
    prompt_out = _prefix_attention(ctx, ctx.prompt_route, prompt_q, prompt_k, prompt_v, empty, empty,
                                   ctx.bank_rows.new_zeros(n), scale=scaling)
    row_out = _prefix_attention(ctx, ctx.row_route, row_q, row_k, row_v, prompt_k, prompt_v, ctx.bank_rows,
                                key_padding_mask=ctx.key_padding_mask, scale=scaling)
    Hq, D = query.shape[1], query.shape[3]
    return torch.cat([prompt_out.transpose(1, 2).reshape(1, split, Hq, D),
                      row_out.transpose(1, 2).reshape(1, B * T, Hq, D)], dim=1)


def _prefix_attention(ctx: AttentionContext, route: str | None, *args, **kwargs) -> torch.Tensor:
    """Causal prefix attention of a layer: on the planned route, unchecked, or through the public op."""
    if route is not None:
        return prefix_attention_unchecked(*args, route=route, causal=True, **kwargs)
    return prefix_attention(*args, causal=True, backend=ctx.backend, **kwargs)


def packed_attention_mask(n: int, P: int, B: int, T: int, bank_rows: torch.Tensor,
                          key_padding_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask [N, N] (N = n·P + B·T; 0 where a query sees a key, -inf elsewhere; `dtype`) of a
    packed sequence (mode "packed"): prompt i's tokens see prompt i's keys causally; row b's tokens see all
    of prompt bank_rows[b]'s keys, then their own row's keys causally, except where key_padding_mask [B, T]
    (True = attend) hides them. Every query sees at least its own prompt's first key, so no row is empty.
    Built with tensor ops on bank_rows' device (no host read), once per forward: every layer uses it."""
    device = bank_rows.device
    split = n * P
    index = torch.arange(split + B * T, device=device)
    is_row = index >= split
    row_index = (index - split).clamp_min(0)
    # each position's segment (prompts 0..n-1, rows n..n+B-1), its place in it, and the prompt it reads
    segment = torch.where(is_row, n + row_index // T, index // P)
    place = torch.where(is_row, row_index % T, index % P)
    prompt = torch.where(is_row, bank_rows[row_index // T], segment)
    own = (segment[:, None] == segment[None, :]) & (place[:, None] >= place[None, :])
    reads_prompt = is_row[:, None] & ~is_row[None, :] & (prompt[:, None] == segment[None, :])
    visible = own | reads_prompt
    if key_padding_mask is not None:
        keys = torch.cat([torch.ones(split, dtype=torch.bool, device=device), key_padding_mask.reshape(-1)])
        visible = visible & keys[None, :]
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))


AttentionInterface.register(ATTENTION_NAME, fastprompt_attention)
