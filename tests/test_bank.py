"""The serving bank (`fastprompt.bank.PrefixBank`): groups packed per layer in their order, shorter prefixes
zero-padded and hidden by the bias, buffers grown in place, a remove re-packing what is left."""

from __future__ import annotations

import pytest
import torch

from fastprompt.bank import PREFIX_PAD_BIAS, PrefixBank

LAYERS, HKV, D = 3, 2, 4


def prefix(entries: int, P: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return ([torch.randn(entries, HKV, P, D, generator=generator) for _ in range(LAYERS)],
            [torch.randn(entries, HKV, P, D, generator=generator) for _ in range(LAYERS)])


def test_groups_are_packed_in_order_with_padding_hidden_by_the_bias():
    bank = PrefixBank()
    groups = {"a": prefix(1, 3, 0), "mpt": prefix(2, 5, 1), "b": prefix(1, 5, 2)}
    for name, (keys, values) in groups.items():
        bank.add(name, keys, values)
    assert bank.offsets == {"a": 0, "mpt": 1, "b": 3} and bank.num_entries == 4 and bank.num_virtual_tokens == 5
    assert bank.entry_lengths.tolist() == [3, 5, 5, 5]
    for layer in range(LAYERS):
        for side, stored in ((0, bank.keys), (1, bank.values)):
            assert stored[layer].shape == (4, HKV, 5, D)
            assert torch.equal(stored[layer][0, :, :3], groups["a"][side][layer][0])
            assert torch.equal(stored[layer][0, :, 3:], torch.zeros(HKV, 2, D))   # finite padding
            assert torch.equal(stored[layer][1:3], groups["mpt"][side][layer])
            assert torch.equal(stored[layer][3:], groups["b"][side][layer])
    expected_bias = torch.zeros(4, 5)
    expected_bias[0, 3:] = PREFIX_PAD_BIAS
    assert torch.equal(bank.prefix_bias, expected_bias)


def test_growth_writes_in_place_and_remove_repacks():
    bank = PrefixBank()
    versions = []
    for i, name in enumerate("abcd"):
        bank.add(name, *prefix(1, 4, i))
        versions.append(bank.version)
    pointer = bank.keys[0].data_ptr()
    bank.add("e", *prefix(1, 4, 9))     # capacity 4 -> 8: a new buffer, the old rows copied once
    grown = bank.keys[0].data_ptr()
    bank.add("f", *prefix(1, 4, 10))    # room left: written in place
    assert bank.keys[0].data_ptr() == grown != pointer and bank.prefix_bias is None
    assert versions == sorted(set(versions))
    bank.remove("b")
    assert bank.offsets == {"a": 0, "c": 1, "d": 2, "e": 3, "f": 4}
    assert torch.equal(bank.values[1][1], prefix(1, 4, 2)[1][1][0])
    bank.add("wide", *prefix(1, 6, 11))  # wider than the bank: every entry re-padded to 6
    assert bank.num_virtual_tokens == 6 and bank.keys[0].shape == (6, HKV, 6, D)
    assert bank.prefix_bias[:5, 4:].eq(PREFIX_PAD_BIAS).all() and not bank.prefix_bias[5].any()
    for name in list(bank.groups):
        bank.remove(name)
    assert bank.keys is None and bank.prefix_bias is None and bank.num_virtual_tokens is None


def test_a_name_is_added_once():
    bank = PrefixBank()
    bank.add("a", *prefix(1, 2, 0))
    with pytest.raises(ValueError, match="'a' is already in the bank"):
        bank.add("a", *prefix(1, 2, 1))
    assert bank.num_entries == 1


@pytest.mark.parametrize("P", [4, 6], ids=["into-spare-rows", "wider-repack"])
def test_a_group_that_does_not_fit_leaves_the_bank_as_it_was(P):
    bank = PrefixBank()
    bank.add("a", *prefix(1, 4, 0))
    bank.add("b", *prefix(1, 4, 1))
    before = (dict(bank.offsets), bank.version, [t.clone() for t in bank.keys], bank.num_entries)
    keys, values = prefix(1, P, 2)
    with pytest.raises(RuntimeError):
        bank.add("bad", [k[..., :D - 1] for k in keys], [v[..., :D - 1] for v in values])  # another head dim
    assert "bad" not in bank.groups
    assert (dict(bank.offsets), bank.version, bank.num_entries) == (before[0], before[1], before[3])
    assert all(torch.equal(a, b) for a, b in zip(bank.keys, before[2]))
    bank.add("c", *prefix(1, 4, 3))
    assert bank.offsets == {"a": 0, "b": 1, "c": 2}
