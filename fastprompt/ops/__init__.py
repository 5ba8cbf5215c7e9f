"""Public ops. Each module holds one op's API, checks and autograd, and dispatches to its Triton kernel
(fastprompt.kernels, registered as torch.library custom ops) or to its PyTorch path (fastprompt.ops.reference
defines correct)."""

from fastprompt.ops.prefix_attention import prefix_attention
from fastprompt.ops.prompt_embed import mpt_prompt_embed, mpt_prompts, prompt_embed

__all__ = ["prefix_attention", "prompt_embed", "mpt_prompt_embed", "mpt_prompts"]
from fastprompt.ops.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from fastprompt.ops.norms import gelu, layer_norm, rms_norm, swiglu  # noqa: E402

__all__ += ["linear_cross_entropy", "rms_norm", "layer_norm", "swiglu", "gelu"]

# What the layers above use of the ops' machinery; they import ops by these names, never from its modules.
from fastprompt.ops._checks import check_index_values  # noqa: E402
from fastprompt.ops._dispatch import resolve_backend  # noqa: E402
from fastprompt.ops.prefix_attention import prefix_attention_route, prefix_attention_unchecked  # noqa: E402
from fastprompt.ops.prompt_embed import prompt_embed_unchecked  # noqa: E402
from fastprompt.ops.reference import default_positions, rows_of  # noqa: E402

__all__ += ["check_index_values", "resolve_backend", "default_positions", "rows_of", "prefix_attention_route",
            "prefix_attention_unchecked", "prompt_embed_unchecked"]
