"""Generation for PromptModel: the prompt's keys/values come from the bank, the rows' own keys from a
preallocated cache, and every row of a mixed-task batch decodes in the same step.

Positions follow PEFT's generate: virtual-token methods number the virtual tokens 0..P-1 and the
row's tokens from P on, padding included; prefix tuning numbers each row's real tokens from P on
(padding skipped), as the prefix is a cache of length P.
"""

from __future__ import annotations

import os

import torch

from fastprompt.backbones import AttentionContext, KVCache
from fastprompt.inputs import check_generate_inputs


def sample_next(logits: torch.Tensor, *, do_sample: bool, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: greedy, or sampling with temperature, top-k and top-p."""
    if not do_sample:
        return logits.argmax(dim=-1)
    # Shift the maximum to 0 before dividing: a tiny temperature then sends the other logits to -inf (near
    # greedy), never the top one to inf and the softmax to NaN; a temperature that underflows fp32 is clamped.
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest set reaching top_p, at least one
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation on `device` can still take, in bytes: the GPU's free memory plus what torch's
    caching allocator holds unused; on the CPU, the kernel's MemAvailable. None where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_cache_fits(max_new_tokens: int, input_length: int, per_token_bytes: int, device: torch.device) -> None:
    """Refuse, before allocating, a KV cache of input_length + max_new_tokens positions at `per_token_bytes`
    each that `device` cannot hold: a ValueError naming max_new_tokens and the most that fits, instead of the
    allocator's error (or the OOM killer) mid-way."""
    available = available_bytes(device)
    cache_bytes = (input_length + max_new_tokens) * per_token_bytes
    if available is None or cache_bytes <= available:
        return
    most = max(available // per_token_bytes - input_length, 0)
    raise ValueError(f"max_new_tokens={max_new_tokens} needs a {cache_bytes / 2**30:.1f} GiB KV cache but {device} "
                     f"has {available / 2**30:.1f} GiB available; at most about {most} new tokens fit for this "
                     f"batch")


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stopping_setup(gen_config, eos_token_id, pad_token_id, seed, generator, device):
    """(eos ids, pad id, generator) of a generate call: the arguments where given, else the model's
    generation config; pad falls back to the first EOS id, then 0; a generator seeded with `seed` on
    `device` when only a seed is given."""
    eos = _token_ids(eos_token_id if eos_token_id is not None else getattr(gen_config, "eos_token_id", None))
    pad = pad_token_id if pad_token_id is not None else getattr(gen_config, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if eos else 0)
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    return eos, pad, generator


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None, task_ids=None,
             adapter_names=None, max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             generator: torch.Generator | None = None, eos_token_id=None, pad_token_id=None) -> torch.Tensor:
    """input_ids [B, T] (left padding for batches), attention_mask [B, T] → [B, T + n] token ids, n <=
    max_new_tokens. Rows that emit an EOS are padded with pad_token_id until every row has finished."""
    check_generate_inputs(model, input_ids, task_ids, adapter_names, seed, pad_token_id)
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    backbone = model.backbone
    device = backbone.device
    input_ids = input_ids.to(device)
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask must have shape [B={B}, T={T}], got {tuple(attention_mask.shape)}")
    mask = attention_mask.to(device).bool()
    gen_config = getattr(backbone.model, "generation_config", None)
    eos, pad, generator = stopping_setup(gen_config, eos_token_id, pad_token_id, seed, generator, device)

    plan = model.plan(B, task_ids, adapter_names)
    keys, values, _ = model.bank_kv(plan)
    P = plan.num_virtual_tokens
    limit, window = backbone.max_positions, backbone.sliding_window
    if limit is not None and P + T - 1 + max(max_new_tokens - 1, 0) >= limit:
        raise ValueError(f"max_new_tokens={max_new_tokens} after {P} virtual and {T} input tokens needs position "
                         f"ids past the model's {limit} learned positions; at most {max(limit - P - T + 1, 0)}")
    if window is not None and P + T + max(max_new_tokens - 1, 0) > window:
        raise ValueError(f"max_new_tokens={max_new_tokens} after {P} virtual and {T} input tokens would attend "
                         f"past the model's sliding_window={window}, which prefix attention does not apply; at "
                         f"most {max(window - P - T + 1, 0)}")
    if plan.kind == "kv":
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0) + P
    else:
        positions = torch.arange(P, P + T, device=device)[None].expand(B, T)
    per_token = KVCache.nbytes(backbone.num_layers, B, backbone.num_kv_heads, 1, backbone.head_dim, backbone.dtype)
    check_cache_fits(max_new_tokens, T, per_token, device)
    cache = KVCache.allocate(backbone.num_layers, B, backbone.num_kv_heads, T + max_new_tokens,
                             backbone.head_dim, backbone.dtype, device)
    ctx = AttentionContext("prefix", keys, values, plan.bank_rows, key_padding_mask=mask, cache=cache,
                           backend=model.backend)
    tokens, step_ids = [], input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        hidden = backbone.hidden_states(input_ids=step_ids, position_ids=positions, ctx=ctx)
        cache.length += step_ids.shape[1]
        logits = backbone.lm_head(hidden[:, -1])
        next_ids = sample_next(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                               generator=generator)
        next_ids = torch.where(finished, torch.full_like(next_ids, pad), next_ids)
        tokens.append(next_ids)
        if eos:
            finished |= torch.isin(next_ids, torch.tensor(eos, device=device))
            if bool(finished.all()):
                break
        step_ids = next_ids[:, None]
        positions = positions[:, -1:] + 1
        ctx.key_padding_mask = torch.cat([ctx.key_padding_mask, mask.new_ones(B, 1)], dim=1)
    new = torch.stack(tokens, dim=1) if tokens else input_ids.new_empty(B, 0)
    return torch.cat([input_ids, new], dim=1)
