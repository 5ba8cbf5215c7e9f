"""The engine's key/value cache: one preallocated slot per row, a common write offset, and the sizes a
decode step reads of it.

`SlotCache` holds, per layer, keys and values `[max_slots, Hkv, cache_len, D]` in the model's dtype on its
device, and the common write offset `L` (a Python int): every active row ends at `L`, row `i` holding its
`length_i` tokens at `[L - length_i, L)`. Which slot holds which row, and each row's length, is the engine's
business; the cache only moves and zeroes slots and hands out views of them as `fastprompt.backbones.KVCache`.

Isolation: a row reads its whole key window, masked columns included, and a masked NaN still poisons
`0 * value`. So the buffers start as zeros, a new row's slot is zeroed (`zero_slots`), and a slot takes its
new occupant's whole slot (`move_slot`), never only its tokens.

The buffers are allocated once and never replaced, so a CUDA graph of a decode step may bake in their
addresses (`fastprompt.serve.cuda_graphs`).

`batch_buckets` and `key_window` give the two Python ints a bucketed decode step depends on: the batch of
slots `[0, nb)` it runs, and the key window `[0, R)` of the cache it reads.
"""

from __future__ import annotations

import torch

from fastprompt.backbones import KVCache

MIN_KEY_WINDOW = 16  # the smallest key window a decode step reads (fewer, larger buckets at short lengths)


class SlotCache:
    """Keys and values of `num_layers` layers, each `[max_slots, num_kv_heads, cache_len, head_dim]` of
    `dtype` on `device`, zero-filled; `L`, the common write offset, starts at 0."""

    def __init__(self, num_layers: int, max_slots: int, num_kv_heads: int, cache_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (max_slots, num_kv_heads, cache_len, head_dim)
        # Zeros, not empty: masked cache positions are multiplied by a zero probability, which must stay 0.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.cache_len = cache_len
        self.L = 0

    def buffers(self) -> list[torch.Tensor]:
        """Every layer's keys, then every layer's values."""
        return self.keys + self.values

    def zero_slots(self, slot: int, k: int) -> None:
        """Zero slots [slot, slot + k) in every layer: what an earlier occupant or a pad row left there must not
        reach a new row (0 * NaN is NaN)."""
        for buf in self.buffers():
            buf[slot:slot + k].zero_()

    def move_slot(self, dst: int, src: int) -> None:
        """Copy the whole of slot `src` into slot `dst` (all columns: the old occupant's leftovers, NaN if its
        adapter overflowed, would otherwise sit under the moved row's mask)."""
        for buf in self.buffers():
            buf[dst].copy_(buf[src])

    def rebase(self, n: int, longest: int, new_L: int) -> None:
        """Move the last `longest` columns before L of slots [0, n) to end at `new_L` (one block copy per layer),
        and make new_L the write offset. Nothing is copied when longest is 0 or new_L == L."""
        if longest and new_L != self.L:
            for buf in self.buffers():
                block = buf[:n, :, self.L - longest:self.L].clone()
                buf[:n, :, new_L - longest:new_L] = block
        self.L = new_L

    def prefill_view(self, slot: int, k: int, T: int) -> KVCache:
        """A KVCache (length 0) over slots [slot, slot + k) and columns [L - T, L): a prefill of k rows of T
        tokens writes there."""
        L = self.L
        return KVCache([key[slot:slot + k, :, L - T:L] for key in self.keys],
                       [value[slot:slot + k, :, L - T:L] for value in self.values], length=0)

    def decode_view(self, nb: int, window: int, offset: torch.Tensor) -> KVCache:
        """A KVCache over slots [0, nb) and columns [0, window) that writes at column `offset` (an int64 device
        scalar, offset < window): no address or shape here depends on the offset."""
        return KVCache([k[:nb, :, :window] for k in self.keys], [v[:nb, :, :window] for v in self.values],
                       write_at=offset)


def batch_buckets(max_slots: int) -> list[int]:
    """The batch sizes a decode step runs at: powers of two below max_slots, then max_slots."""
    sizes = [1 << i for i in range(max_slots.bit_length()) if 1 << i < max_slots]
    return sizes + [max_slots]


def key_window(offset: int, cache_len: int) -> int:
    """The key window [0, R) a decode step writing column `offset` reads: offset + 1 rounded up to a power
    of two, at least MIN_KEY_WINDOW, at most cache_len (offset < cache_len)."""
    return min(cache_len, max(MIN_KEY_WINDOW, 1 << offset.bit_length()))
