"""Model-family adapters (the only code that knows a family's internals) and fastprompt's attention."""

from fastprompt.backbones.attention import AttentionContext, KVCache
from fastprompt.backbones.base import Backbone, get_backbone, register_backbone, supported_model_types

__all__ = ["AttentionContext", "Backbone", "KVCache", "get_backbone", "register_backbone",
           "supported_model_types"]
