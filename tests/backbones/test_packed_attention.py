"""The packed pass's block mask (`packed_attention_mask`, the masked form of mode "packed") against the rule
it encodes, written out position by position."""

import pytest
import torch

from fastprompt.backbones.attention import packed_attention_mask


def _expected(n, P, B, T, bank_rows, key_padding_mask):
    """visible[q, k] by the definition: prompt i causal within itself; row b sees prompt bank_rows[b]
    whole, then its own keys causally, unless padded."""
    N = n * P + B * T
    visible = torch.zeros(N, N, dtype=torch.bool)
    for i in range(n):
        for a in range(P):
            for c in range(a + 1):
                visible[i * P + a, i * P + c] = True
    for b in range(B):
        for t in range(T):
            q = n * P + b * T + t
            task = int(bank_rows[b])
            visible[q, task * P:(task + 1) * P] = True
            for u in range(t + 1):
                if key_padding_mask is None or key_padding_mask[b, u]:
                    visible[q, n * P + b * T + u] = True
    return visible


@pytest.mark.parametrize("n, P, B, T, rows, padded", [
    (1, 3, 2, 4, [0, 0], False),
    (2, 3, 3, 4, [1, 0, 1], True),
    (3, 1, 2, 5, [2, 2], True),
])
def test_mask_follows_the_packed_layout(n, P, B, T, rows, padded):
    bank_rows = torch.tensor(rows)
    key_padding_mask = None
    if padded:
        key_padding_mask = torch.ones(B, T, dtype=torch.bool)
        key_padding_mask[0, -2:] = False       # right padding
        key_padding_mask[-1, :1] = False       # left padding
    mask = packed_attention_mask(n, P, B, T, bank_rows, key_padding_mask, torch.float32)
    assert mask.shape == (n * P + B * T,) * 2 and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, float("-inf")}
    assert torch.equal(mask == 0, _expected(n, P, B, T, bank_rows, key_padding_mask))
    assert (mask == 0).any(dim=1).all(), "a query sees no key"
