"""Prompt ensembling: every prompt scores every input and choice in one mixed batch."""

import pytest
import torch
import torch.nn.functional as F

import fastprompt
from tests.tiny_models import batch, tiny_model


def _ensemble():
    torch.manual_seed(0)
    model = fastprompt.get_peft_model(tiny_model("gpt2"), fastprompt.PromptTuningConfig(num_virtual_tokens=3), "p0")
    for name in ("p1", "p2"):
        model.add_adapter(name, fastprompt.PromptTuningConfig(num_virtual_tokens=3))
    return model


def test_scores_equal_per_prompt_log_likelihood():
    model = _ensemble()
    ids, mask, _ = batch(batch_size=2, padding="right")
    choices = [[5], [7, 9]]
    scores = fastprompt.score_choices(model, ids, mask, choices, ["p0", "p1", "p2"])
    assert scores.shape == (3, 2, 2)
    for e, name in enumerate(["p0", "p1", "p2"]):
        model.set_adapter(name)
        for b in range(2):
            n = int(mask[b].sum())
            for c, choice in enumerate(choices):
                seq = torch.cat([ids[b, :n], torch.tensor(choice)])[None]
                with torch.no_grad():
                    log_probs = F.log_softmax(model(input_ids=seq).logits[0].float(), -1)
                expected = sum(log_probs[n - 1 + i, tok] for i, tok in enumerate(choice))
                assert torch.allclose(scores[e, b, c], expected, atol=1e-4)


def test_combine_predictions():
    scores = torch.tensor([[[0.0, -0.1]], [[0.0, -0.1]], [[-5.0, 0.0]]])  # 3 prompts, 1 input, 2 choices
    assert fastprompt.combine_predictions(scores, "vote").tolist() == [0]   # prompts vote 0, 0, 1
    assert fastprompt.combine_predictions(scores, "mean").tolist() == [1]   # means -1.67 vs -0.07
    mean = fastprompt.mean_log_prob(torch.tensor([[[-2.0, -3.0]]]), [[1, 2], [3]])
    assert mean.tolist() == [[[-1.0, -3.0]]]
    with pytest.raises(ValueError, match="how must be 'mean' or 'vote'"):
        fastprompt.combine_predictions(scores, "max")
