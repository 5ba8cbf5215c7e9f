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


# The two graph breaks PyTorch itself places in a step: Dynamo stops at Tensor.backward() and compiled autograd
# traces the backward as a graph of its own; torch.optim breaks around every optimizer step
# (`torch._dynamo.graph_break()` in Optimizer's `_use_grad`, pytorch/pytorch#104053). Anything else would be ours.
PYTORCH_BREAKS = ("Unsupported Tensor.backward() call", "Call to `torch._dynamo.graph_break()`")


@pytest.mark.parametrize("family, method, path", [
    ("llama", "prefix", "auto"),          # the prefix bank, its gradient through the attention kernel's reference
    ("gpt2", "mpt", "shared_prefix"),     # MPT's task prompts, routed on the device
])
def test_whole_training_step_compiles_and_equals_eager(family, method, path):
    """The whole step the Trainer runs (what CudaGraphStep captures): forward with the fused loss, backward,
    gradient clipping and AdamW with its learning rate a tensor (`adamw_for_graphs`), under torch.compile with
    compiled autograd. Every part runs compiled; the only graph breaks are PyTorch's own; from the second step
    on nothing recompiles (the first step creates AdamW's state); three compiled steps follow the eager ones."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    from fastprompt.train import adamw_for_graphs

    def run(compiled: bool):
        model, inputs, params = _setup(family, method, path)
        optimizer = adamw_for_graphs(params, 1e-2, 0.01)

        def step(ids, mask, task_ids):
            for p in params:
                p.grad = None
            loss = model(input_ids=ids, attention_mask=mask, labels=ids, task_ids=task_ids).loss
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
            optimizer.step()
            return loss.detach(), grad_norm

        if not compiled:
            return [step(*inputs) for _ in range(3)], params, None
        torch._dynamo.reset()
        counters.clear()
        counter = CompileCounterWithBackend("aot_eager")
        frames, results = [], []
        with torch._dynamo.config.patch(compiled_autograd=True):   # read when torch.compile wraps the step
            compiled_step = torch.compile(step, backend=counter)
            for _ in range(3):
                results.append(compiled_step(*inputs))
                frames.append(counter.frame_count)
        return results, params, (frames, dict(counters["graph_break"]), counters["compiled_autograd"]["captures"])

    eager, eager_params, _ = run(compiled=False)
    compiled, compiled_params, (frames, breaks, backward_captures) = run(compiled=True)
    assert breaks and all(reason.startswith(PYTORCH_BREAKS) for reason in breaks), breaks
    assert backward_captures >= 1                 # the backward ran as compiled autograd's graph, not eagerly
    assert frames[1] == frames[2] > 0, frames     # step 3 reused step 2's graphs
    for (loss, norm), (expected_loss, expected_norm) in zip(compiled, eager):
        torch.testing.assert_close(loss, expected_loss)
        torch.testing.assert_close(norm, expected_norm)
    for p, expected in zip(compiled_params, eager_params):
        torch.testing.assert_close(p, expected)
