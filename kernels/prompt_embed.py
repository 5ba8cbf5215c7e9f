"""Fused prompt embedding: embed tokens and place each row's soft prompt among them, in one pass.

Kernels:
- `_embed_fwd_kernel`: writes the final sequence [B, L, d] once. Each output position is either a token
  (a row of the frozen embedding table) or a virtual token of the row's task prompt. The prompt comes from a
  bank [n_tasks, P, d] (IS_MPT=False) or, for MPT, is computed in-kernel per virtual token as
  shared[i] * sum_j task_cols[k, i, j] * task_rows[k, j] (IS_MPT=True): never materialised per row.
- `_prompt_grad_kernel`: d prompt [n_tasks, P, d] = the sum of the output gradient over every (row, position)
  that reads virtual token i of task k. One program per (task, virtual token, d-block) walks a sorted list of
  source positions in a fixed order: deterministic, no atomics.

Launchers (tensors in, tensors out; no autograd): `prompt_embed_fwd`, `mpt_prompt_embed_fwd`,
`mpt_prompts_fwd`, `prompt_grad`. Each accepts an optional `out` buffer, and `blocks` to override the
heuristic's tile, (BLOCK_N, BLOCK_D) or (BLOCK_R, BLOCK_D): tests use small tiles to cover several d-blocks
and several loop iterations under the interpreter.

Cost of the deterministic backward: the host builds the sorted source list with torch ops (one stable sort of
B*L int64 keys, B*P with the default layout, plus a searchsorted over n_tasks*P+1 keys; no host sync), and the
kernel reads each virtual position's gradient row once and writes the prompt gradient once. The only
imbalance is that a program's loop length is the number of uses of its (task, token): a task used by every
row of a large batch gives programs that loop over B rows (in tiles of BLOCK_R rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl



# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["n_rows", "L", "T"])
def _embed_fwd_kernel(
    out_ptr,        # [B, L, d]   output, any float dtype
    ids_ptr,        # [B, T]      int64/int32 token ids
    emb_ptr,        # [V, d]      frozen embedding table
    pos_ptr,        # [B, L]      int64/int32 positions map (read only when HAS_POS)
    task_ptr,       # [B]         int64/int32 task of each row
    prm_ptr,        # IS_MPT=False: prompts [n_tasks, P, d]; IS_MPT=True: shared [P, d]
    cols_ptr,       # [n_tasks, P, R] (IS_MPT only)
    rows_ptr,       # [n_tasks, R, d] (IS_MPT only)
    n_rows, L, T, P, d, R,
    HAS_POS: tl.constexpr,
    IS_MPT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)     # flat output position b * L + l
    row_ok = n < n_rows
    b = n // L
    l = n - b * L
    if HAS_POS:
        p = tl.load(pos_ptr + n, mask=row_ok, other=0).to(tl.int64)
    else:
        p = tl.where(l < P, -l - 1, l - P)                        # the prompt first, then the tokens
    is_virt = row_ok & (p < 0)
    is_tok = row_ok & (p >= 0)

    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    tok_mask = is_tok[:, None] & col_ok[None, :]
    virt_mask = is_virt[:, None] & col_ok[None, :]

    # tokens: a row of the embedding table (int64 offsets: V * d may exceed 2**31)
    tok = tl.load(ids_ptr + b * T + tl.where(is_tok, p, 0), mask=is_tok, other=0).to(tl.int64)
    emb = tl.load(emb_ptr + tok[:, None] * d + cols[None, :], mask=tok_mask, other=0.0)

    # virtual tokens: token i of the row's task k
    i = tl.where(is_virt, -p - 1, 0)
    k = tl.load(task_ptr + b, mask=is_virt, other=0).to(tl.int64)
    if IS_MPT:
        low_rank = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for j in range(R):
            c = tl.load(cols_ptr + (k * P + i) * R + j, mask=is_virt, other=0.0).to(tl.float32)
            w = tl.load(rows_ptr + (k * R + j)[:, None] * d + cols[None, :], mask=virt_mask, other=0.0)
            low_rank += c[:, None] * w.to(tl.float32)
        shared = tl.load(prm_ptr + i[:, None] * d + cols[None, :], mask=virt_mask, other=0.0)
        # the reference rounds the prompt to shared's dtype, then to the output's
        prompt = (shared.to(tl.float32) * low_rank).to(prm_ptr.dtype.element_ty)
    else:
        prompt = tl.load(prm_ptr + (k * P + i)[:, None] * d + cols[None, :], mask=virt_mask, other=0.0)

    out_ty = out_ptr.dtype.element_ty
    val = tl.where(is_virt[:, None], prompt.to(out_ty), emb.to(out_ty))
    tl.store(out_ptr + n[:, None] * d + cols[None, :], val, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _prompt_grad_kernel(
    dprm_ptr,       # [n_tasks * P, d] prompt gradient, any float dtype (fp32 accumulation)
    dout_ptr,       # [B * L, d]       output gradient
    src_ptr,        # [n_src]          int64 flat output positions, sorted by (task, virtual token)
    offs_ptr,       # [n_tasks * P + 1] int64 start of each (task, virtual token) in src
    d,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    q = tl.program_id(0).to(tl.int64)                            # k * P + i
    pid_d = tl.program_id(1)
    start = tl.load(offs_ptr + q).to(tl.int32)                   # counts are < B * L < 2**31
    end = tl.load(offs_ptr + q + 1).to(tl.int32)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j0 in range(start, end, BLOCK_R):                         # fixed order: deterministic
        idx = j0 + tl.arange(0, BLOCK_R)
        ok = idx < end
        src = tl.load(src_ptr + idx, mask=ok, other=0)
        g = tl.load(dout_ptr + src[:, None] * d + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(g.to(tl.float32), axis=0)
    tl.store(dprm_ptr + q * d + cols, acc.to(dprm_ptr.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------------------------------------
# block-size heuristics (keyed on d; larger tiles under the interpreter, which runs each program in Python)
# ----------------------------------------------------------------------------------------------------------
def _fwd_config(d: int, n_rows: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps) for the forward kernel."""
    if device.type != "cuda":
        return min(128, triton.next_power_of_2(max(n_rows, 1))), triton.next_power_of_2(d), 4
    block_d = min(triton.next_power_of_2(d), 1024)
    block_n = max(1, 4096 // block_d)                  # about 4096 elements per program
    return block_n, block_d, 8 if block_n * block_d >= 4096 else 4


def _grad_config(d: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for the gradient kernel."""
    if device.type != "cuda":
        return 32, triton.next_power_of_2(d), 4
    block_d = min(triton.next_power_of_2(d), 512)
    block_r = max(1, 2048 // block_d)
    return block_r, block_d, 4


# ----------------------------------------------------------------------------------------------------------
# launcher helpers: no argument checks (fastprompt.ops.prompt_embed checks once per call); an `out` buffer is
# the caller's to shape
# ----------------------------------------------------------------------------------------------------------
def _out(out, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device) if out is None else out


def _check_blocks(blocks) -> None:
    if blocks is not None and (len(blocks) != 2 or any(b < 1 or b & (b - 1) for b in blocks)):
        raise ValueError(f"blocks must be two powers of two, got {blocks}")


def _launch_fwd(out, input_ids, embedding_weight, positions, task_ids, prm, cols, rows, B, T, L, P, d, R,
                is_mpt: bool, blocks) -> torch.Tensor:
    _check_blocks(blocks)
    n_rows = B * L
    if n_rows == 0 or d == 0:
        return out
    block_n, block_d, warps = _fwd_config(d, n_rows, out.device)
    if blocks is not None:
        block_n, block_d = blocks
    grid = (triton.cdiv(n_rows, block_n), triton.cdiv(d, block_d))
    _embed_fwd_kernel[grid](
        out, input_ids, embedding_weight, positions if positions is not None else task_ids, task_ids,
        prm, cols, rows, n_rows, L, T, P, d, R,
        HAS_POS=positions is not None, IS_MPT=is_mpt, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
    )
    return out


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------
def prompt_embed_fwd(input_ids: torch.Tensor, embedding_weight: torch.Tensor, prompts: torch.Tensor,
                     task_ids: torch.Tensor, positions: torch.Tensor | None = None,
                     out: torch.Tensor | None = None,
                     blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """Embed tokens and place each row's task prompt among them; returns `out` [B, L, d].

    input_ids: [B, T] int64/int32; embedding_weight: [V, d] fp32/bf16/fp16; prompts: [n_tasks, P, d]
    fp32/bf16/fp16 (may differ from the table's dtype); task_ids: [B] int64/int32; positions: None (the
    prompt first, L = P + T) or [B, L] int64/int32 (p >= 0: input token p; p < 0: virtual token -p - 1).
    out: optional [B, L, d] buffer in embedding_weight's dtype. All contiguous, on one device. Nothing is
    checked here (the public op checks shapes, dtypes and, on CPU, index ranges). blocks: optional
    (BLOCK_N, BLOCK_D) override of the heuristic (output positions x columns per program).
    """
    B, T = input_ids.shape
    P, d = prompts.shape[1:]
    L = P + T if positions is None else positions.shape[1]
    out = _out(out, (B, L, d), embedding_weight.dtype, embedding_weight.device)
    return _launch_fwd(out, input_ids, embedding_weight, positions, task_ids, prompts, prompts, prompts,
                       B, T, L, P, d, 1, is_mpt=False, blocks=blocks)


def mpt_prompt_embed_fwd(input_ids: torch.Tensor, embedding_weight: torch.Tensor, shared: torch.Tensor,
                         task_cols: torch.Tensor, task_rows: torch.Tensor, task_ids: torch.Tensor,
                         positions: torch.Tensor | None = None,
                         out: torch.Tensor | None = None,
                         blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """`prompt_embed_fwd` with row b's prompt = shared ∘ (task_cols[k] @ task_rows[k]), k = task_ids[b],
    computed in the kernel per output virtual token (never materialised per row).

    shared: [P, d]; task_cols: [n_tasks, P, r] (r >= 1); task_rows: [n_tasks, r, d]; fp32/bf16/fp16, any
    mix. The prompt is computed in fp32, rounded to shared's dtype (as the reference does), then to the
    output's. Other arguments and `out` [B, L, d] (embedding_weight's dtype) as in `prompt_embed_fwd`.
    """
    B, T = input_ids.shape
    P, d = shared.shape
    r = task_cols.shape[2]
    L = P + T if positions is None else positions.shape[1]
    out = _out(out, (B, L, d), embedding_weight.dtype, embedding_weight.device)
    return _launch_fwd(out, input_ids, embedding_weight, positions, task_ids, shared, task_cols, task_rows,
                       B, T, L, P, d, r, is_mpt=True, blocks=blocks)


def mpt_prompts_fwd(shared: torch.Tensor, task_cols: torch.Tensor, task_rows: torch.Tensor,
                    task_ids: torch.Tensor, out: torch.Tensor | None = None,
                    blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """The MPT prompts of the given tasks: out [n, P, d] (shared's dtype) = shared ∘ (task_cols[k] @
    task_rows[k]) for k in task_ids [n] int64/int32. The forward kernel with no tokens (T = 0, L = P)."""
    P, d = shared.shape
    r = task_cols.shape[2]
    n = task_ids.shape[0]
    out = _out(out, (n, P, d), shared.dtype, shared.device)
    # no tokens (T = 0): the id and embedding pointers are never read; pass task_ids and shared in their place
    return _launch_fwd(out, task_ids, shared, None, task_ids, shared, task_cols, task_rows,
                       n, 0, P, P, d, r, is_mpt=True, blocks=blocks)


def virtual_sources(task_ids: torch.Tensor, n_tasks: int, n_virtual: int, length: int,
                    positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Host-side index for the deterministic backward (torch ops, no host sync).

    Returns (src, offsets): src [n_src] int64 flat output positions b * L + l that read a virtual token,
    sorted by (task, virtual token) and, within one, by position (a stable sort); offsets
    [n_tasks * P + 1] int64, so that the positions reading virtual token i of task k are
    src[offsets[k * P + i] : offsets[k * P + i + 1]].
    """
    device = task_ids.device
    B, P = task_ids.shape[0], n_virtual
    # unsqueeze/take rather than indexing: tensor indexing cannot run on the fake CUDA tensors of aot_compile
    tasks = task_ids.to(torch.int64).unsqueeze(1)
    if positions is None:                                            # the prompt at positions 0..P-1
        virt = torch.arange(P, device=device)
        dest = tasks * P + virt
        src = torch.arange(B, device=device).unsqueeze(1) * length + virt
    else:
        p = positions.to(torch.int64)
        dest = torch.where(p < 0, tasks * P + (-p - 1), n_tasks * P)  # tokens sort after every slot
        src = torch.arange(B * length, device=device).view(B, length)
    dest, order = torch.sort(dest.reshape(-1), stable=True)
    src = torch.take(src, order)
    offsets = torch.searchsorted(dest, torch.arange(n_tasks * P + 1, device=device))
    return src, offsets.to(torch.int64).contiguous()


def prompt_grad(grad_out: torch.Tensor, task_ids: torch.Tensor, n_tasks: int, n_virtual: int,
                positions: torch.Tensor | None = None, out: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float32, blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """Gradient of a prompt bank: out [n_tasks, P, d] (`dtype`, fp32 accumulation), where out[k, i] sums
    grad_out[b, l] over every row b with task k and position l holding virtual token i. A task no row uses
    gets zeros. Deterministic (fixed summation order, no atomics).

    grad_out: [B, L, d] fp32/bf16/fp16, contiguous; task_ids: [B] int64/int32; positions: None (the prompt
    at positions 0..P-1) or [B, L] int64/int32 as in `prompt_embed_fwd`. blocks: optional (BLOCK_R,
    BLOCK_D) override (source rows per loop step x columns per program).
    """
    device = grad_out.device
    B, L, d = grad_out.shape
    _check_blocks(blocks)
    out = _out(out, (n_tasks, n_virtual, d), dtype, device)
    if out.numel() == 0:
        return out
    src, offsets = virtual_sources(task_ids, n_tasks, n_virtual, L, positions)
    if src.numel() == 0:                                              # no position reads a virtual token
        return out.zero_()
    block_r, block_d, warps = _grad_config(d, device)
    if blocks is not None:
        block_r, block_d = blocks
    grid = (n_tasks * n_virtual, triton.cdiv(d, block_d))
    _prompt_grad_kernel[grid](out, grad_out, src, offsets, d, BLOCK_R=block_r, BLOCK_D=block_d,
                              num_warps=warps)
    return out
