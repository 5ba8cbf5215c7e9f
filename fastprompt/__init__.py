"""fastprompt: a performance-first runtime for soft-prompt methods on frozen transformer backbones."""

__version__ = "0.1.0"
