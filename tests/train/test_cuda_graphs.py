"""CudaGraphLoss on a machine without CUDA: it refuses a model off CUDA with a message that says what to do.
Its replays are tested natively in tests/gpu/test_cuda_graphs_native.py."""

import pytest

import fastprompt
from fastprompt.train import CudaGraphLoss
from tests.tiny_models import tiny_model


def test_refuses_a_model_off_cuda():
    model = fastprompt.get_peft_model(tiny_model("llama"), fastprompt.PromptTuningConfig(num_virtual_tokens=4))
    with pytest.raises(ValueError, match="CudaGraphLoss needs the model on a CUDA device, got cpu"):
        CudaGraphLoss(model)
