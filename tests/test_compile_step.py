"""torch.compile(fullgraph=True) of a training step on tiny Llama and GPT-2 (CPU): the model's forward has no
graph break on any path (no host sync, no data-dependent Python), its backward reaches the prompt parameters,
and the compiled step equals eager.

backend="aot_eager": Dynamo captures the whole forward and AOTAutograd traces the joint forward + backward
graph, which is what "free of graph breaks" and "traceable ops" mean; inductor would add a C++ compile per
graph on the CPU (minutes on two cores) and test inductor rather than fastprompt.
"""

import pytest
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt.methods import MultitaskPromptTuningConfig, PrefixTuningConfig, PromptTuningConfig
from tests.tiny_models import tiny_model

CONFIGS = {
    "prompt_tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "mpt": lambda: MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, num_tasks=3),
}


def _setup(family, method, path):
    torch.manual_seed(0)
    model = fastprompt.get_peft_model(tiny_model(family), CONFIGS[method](), path=path)
    ids = torch.randint(3, 100, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding on one row: the key padding mask travels through the graph
    task_ids = torch.tensor([0, 2, 1]) if method == "mpt" else None
    params = [p for p in model.parameters() if p.requires_grad]
    return model, (ids, mask, task_ids), params


def _compiled_equals_eager(step, inputs, params):
    eager = step(*inputs)
    eager_grads = torch.autograd.grad(eager, params)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*inputs)
    grads = torch.autograd.grad(compiled, params)
    torch.testing.assert_close(compiled, eager)
    for grad, expected in zip(grads, eager_grads):
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("family, method, path", [
    ("llama", "prompt_tuning", "shared_prefix"),   # the packed pass
    ("gpt2", "prompt_tuning", "concat"),
    ("llama", "prefix", "auto"),                   # the bank of parameters
    ("gpt2", "mpt", "shared_prefix"),              # task ids routed on the device, mixed tasks
])
def test_model_forward_compiles_whole_and_equals_eager(family, method, path):
    """Hidden states through the model's forward, then the LM head and a plain cross-entropy: the model's
    part of a training step in one graph."""
    model, inputs, params = _setup(family, method, path)

    def step(ids, mask, task_ids):
        hidden, last_virtual = model.hidden_states(input_ids=ids, attention_mask=mask, task_ids=task_ids)
        logits = model.backbone.lm_head(hidden[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    _compiled_equals_eager(step, inputs, params)


@pytest.mark.parametrize("family, path", [("llama", "shared_prefix"), ("gpt2", "concat")])
def test_training_step_with_the_fused_loss_compiles_whole_and_equals_eager(family, path):
    """The training forward as a Trainer calls it: labels in, the fused LM-head loss out."""
    model, inputs, params = _setup(family, "prompt_tuning", path)

    def step(ids, mask, task_ids):
        return model(input_ids=ids, attention_mask=mask, labels=ids, task_ids=task_ids).loss

    _compiled_equals_eager(step, inputs, params)
