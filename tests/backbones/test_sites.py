"""Li & Liang's prefixes on encoder-decoders (prefix_sites: the encoder's self-attention, the decoder's
cross-attention and self-attention) against a plain-PyTorch reference that concatenates keys by hand."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache, EncoderDecoderCache

import fastprompt
from fastprompt.config import PREFIX_SITES
from fastprompt.seq2seq import cache_argument
from tests.backbones.tiny_bidirectional import P, batch, greedy_through_forward, targets, tiny
from tests.helpers import assert_close

REFERENCE = "fastprompt_test_reference"


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, reference=None,
                        position_bias=None, **kwargs):
    """Eager attention over [the row's prefix ; the module's keys], every mask and bias built by hand."""
    site, layer = reference.sites[module]
    B, H, T, D = query.shape
    keys, values = key, value
    if site in reference.prefix:
        prefix_k, prefix_v = reference.prefix[site][layer]
        keys, values = torch.cat([prefix_k, key], dim=2), torch.cat([prefix_v, value], dim=2)
    n_prefix, S = keys.shape[2] - key.shape[2], keys.shape[2]
    scores = query.float() @ keys.float().transpose(2, 3) * scaling
    if position_bias is not None and site != "cross":  # T5's self-attentions
        if n_prefix:  # the prefix sits just before the tokens: keys at 0..S-1, queries from S - T on
            scores = scores + reference.bias_modules[site].compute_bias(T, S, past_seen_tokens=S - T)
        else:  # the decoder's prefix is in transformers' cache, which the bias already covers
            scores = scores + position_bias
    visible = torch.ones(B, 1, T, S, dtype=torch.bool)
    padding = reference.padding.get(site)
    if padding is not None:
        visible[..., n_prefix:] &= padding.bool()[:, None, None, :]
    if site == "decoder":
        visible &= torch.ones(T, S, dtype=torch.bool).tril(S - T)
    weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return (weights @ values.float()).to(query.dtype).transpose(1, 2), None


AttentionInterface.register(REFERENCE, reference_attention)


def _sites_of(model):
    """attention module → (site, layer), and the modules owning T5's relative position bias."""
    encoder, decoder = model.get_encoder(), model.get_decoder()
    if hasattr(encoder, "block"):  # T5
        sites = {b.layer[0].SelfAttention: ("encoder", i) for i, b in enumerate(encoder.block)}
        sites.update({b.layer[0].SelfAttention: ("decoder", i) for i, b in enumerate(decoder.block)})
        sites.update({b.layer[1].EncDecAttention: ("cross", i) for i, b in enumerate(decoder.block)})
        return sites, {"encoder": encoder.block[0].layer[0].SelfAttention}
    sites = {layer.self_attn: ("encoder", i) for i, layer in enumerate(encoder.layers)}
    sites.update({layer.self_attn: ("decoder", i) for i, layer in enumerate(decoder.layers)})
    sites.update({layer.encoder_attn: ("cross", i) for i, layer in enumerate(decoder.layers)})
    return sites, {}


def reference_logits(model, weight, sites, ids, mask, decoder_ids, decoder_mask=None):
    """Logits [B, T_dec, V] with the prefix parameter `weight` [P, n_sites · L · 2 · H · D] laid out as
    fastprompt documents it: per site (in PREFIX_SITES order) L layers of (keys, values), PEFT's views."""
    config = model.config
    L, H = config.num_hidden_layers, config.num_attention_heads
    D = config.d_model // H
    B = len(ids)
    slots = weight.view(P, -1, H, D).permute(1, 2, 0, 3)  # [n_sites · L · 2, H, P, D]
    prefix = {}
    for s, site in enumerate([s for s in PREFIX_SITES if s in sites]):
        prefix[site] = [tuple(slots[2 * (s * L + i) + j][None].expand(B, -1, -1, -1) for j in (0, 1))
                        for i in range(L)]
    module_sites, bias_modules = _sites_of(model)
    padding = {"encoder": mask, "cross": mask}
    kwargs = {}
    if "decoder" in prefix:  # as PEFT: transformers' cache holds the decoder's prefix
        cache = DynamicCache()
        for i, (k, v) in enumerate(prefix.pop("decoder")):
            cache.update(k, v, i)
        kwargs[cache_argument(type(model))] = EncoderDecoderCache(cache, DynamicCache())
        decoder_mask = torch.ones(B, decoder_ids.shape[1], dtype=torch.long) if decoder_mask is None else decoder_mask
        decoder_mask = torch.cat([torch.ones(B, P, dtype=torch.long), decoder_mask], dim=1)
    padding["decoder"] = decoder_mask
    reference = SimpleNamespace(sites=module_sites, prefix=prefix, padding=padding, bias_modules=bias_modules)
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values()
    previous = [(c, c._attn_implementation) for c in configs]
    try:
        for c, _ in previous:
            c._attn_implementation = REFERENCE
        return model(input_ids=ids, decoder_input_ids=decoder_ids, use_cache=False, reference=reference,
                     **kwargs).logits
    finally:
        for c, impl in previous:
            c._attn_implementation = impl


def _model(family, sites, seed=4, **kwargs):
    model = fastprompt.get_peft_model(tiny(family, **kwargs), fastprompt.PrefixTuningConfig(num_virtual_tokens=P,
                                                                                            prefix_sites=sites))
    torch.manual_seed(seed)
    with torch.no_grad():
        model.prompt_sources["default"].embedding.weight.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("sites", [["encoder"], ["cross"], ["encoder", "decoder", "cross"]])
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_prefix_sites_equal_reference(family, sites):
    model = _model(family, sites)
    ids, mask = batch(length=5, padding="left")  # a source shorter than the target: fewer cross keys than queries
    labels, decoder_mask = targets(length=7)
    decoder_ids = model.base_model.prepare_decoder_input_ids_from_labels(labels=labels)
    actual = model(ids, mask, labels=labels, decoder_attention_mask=decoder_mask)
    actual.loss.backward()
    weight = model.prompt_sources["default"].embedding.weight
    assert weight.shape == (P, len(sites) * model.backbone.num_layers * 2 * 32)
    reference_weight = weight.detach().clone().requires_grad_()
    logits = reference_logits(model.base_model, reference_weight, sites, ids, mask, decoder_ids, decoder_mask)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    assert_close("logits", actual.logits, logits, 1e-5)
    assert_close("loss", actual.loss, loss, 1e-5)
    assert_close("grad prefix", weight.grad, reference_weight.grad, 1e-4)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_prefix_sites_generate_equals_greedy_reference(family):
    sites = ["encoder", "decoder", "cross"]
    model = _model(family, sites)
    ids, mask = batch(padding="left")
    weight = model.prompt_sources["default"].embedding.weight.detach()
    start = model.base_model.config.decoder_start_token_id
    expected = greedy_through_forward(
        lambda i, m, d: reference_logits(model.base_model, weight, sites, i, m, d), ids, mask, start, 5)
    actual = model.generate(ids, mask, max_new_tokens=5)
    assert torch.equal(actual, expected[:, :actual.shape[1]]), f"\n{actual}\n!=\n{expected}"


def test_prefix_sites_mixed_batch_rows_equal_rows_alone():
    model = _model("t5", ["encoder", "decoder", "cross"])
    model.add_adapter("other", fastprompt.PrefixTuningConfig(num_virtual_tokens=P, prefix_sites=["cross", "encoder",
                                                                                                 "decoder"]))
    with torch.no_grad():
        model.prompt_sources["other"].embedding.weight.normal_(0.0, 0.5)
    ids, mask = batch(padding="right")
    labels, decoder_mask = targets()
    names = ["other", "default", "other"]
    with torch.no_grad():
        mixed = model(ids, mask, labels=labels, decoder_attention_mask=decoder_mask, adapter_names=names).logits
        for row, name in enumerate(names):
            one = slice(row, row + 1)
            alone = model(ids[one], mask[one], labels=labels[one], decoder_attention_mask=decoder_mask[one],
                          adapter_names=[name]).logits
            assert_close(f"row {row}", mixed[one], alone, 1e-5)


@pytest.mark.parametrize("family, sites", [("bart", ["encoder", "cross"]), ("t5", ["encoder", "decoder", "cross"])])
def test_prefix_sites_through_the_triton_interpreter_equal_torch(family, sites):
    """T5's self-attentions take the kernel's bias input: [prefix bias ; relative position bias]."""
    outputs = {}
    for backend in ("torch", "triton"):
        model = _model(family, sites, layers=1)
        model.backend = backend
        ids, mask = batch(length=5)
        labels, decoder_mask = targets(length=7)
        out = model(ids, mask, labels=labels, decoder_attention_mask=decoder_mask)
        out.loss.backward()
        outputs[backend] = (out.logits, model.prompt_sources["default"].embedding.weight.grad)
    assert_close("logits", outputs["triton"][0], outputs["torch"][0], 1e-4)
    assert_close("grad prefix", outputs["triton"][1], outputs["torch"][1], 1e-4)


def test_prefix_sites_only_on_encoder_decoders():
    with pytest.raises(ValueError, match="prefix_sites"):
        fastprompt.get_peft_model(tiny("bert"), fastprompt.PrefixTuningConfig(num_virtual_tokens=P,
                                                                              prefix_sites=["encoder"]))
    with pytest.raises(ValueError, match="prefix_sites"):
        fastprompt.PrefixTuningConfig(num_virtual_tokens=P, prefix_sites=["encoder", "self"])
