"""Model-family adapters (the only code that knows a family's internals) and fastprompt's attention."""

from fastprompt.backbones.attention import AttentionContext, KVCache
from fastprompt.backbones.base import Backbone, get_backbone, register_backbone, supported_model_types
from fastprompt.backbones import bart, bert, t5  # noqa: F401,E402  (register the non-causal families)
from fastprompt.backbones.sites import SiteBackbone, SiteContext

__all__ = ["AttentionContext", "Backbone", "KVCache", "SiteBackbone", "SiteContext", "get_backbone",
           "register_backbone", "supported_model_types"]
