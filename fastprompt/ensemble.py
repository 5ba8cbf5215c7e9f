"""Prompt ensembling (Lester et al.): several prompts for one task scored in one batch.

Each input row is repeated once per prompt (adapter), every (row, prompt) pair runs in a single
mixed-adapter batch, and each candidate answer is scored by its log-likelihood.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def score_choices(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  choices: list[list[int]], adapter_names: list[str]) -> torch.Tensor:
    """Log-likelihood of each choice after each input under each prompt: [n_prompts, B, n_choices].

    input_ids [B, T] right-padded (attention_mask [B, T], 1 = token); choices: token ids of each
    candidate answer (e.g. the verbalizer of each class); adapter_names: the ensemble's adapters.
    A choice's score is the sum of its tokens' log-probabilities (use `mean_log_prob` to compare
    choices of different lengths).
    """
    if not choices or any(len(c) == 0 for c in choices):
        raise ValueError("choices must be a non-empty list of non-empty token-id lists")
    if not adapter_names:
        raise ValueError("adapter_names must name at least one adapter")
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    lengths = attention_mask.sum(1)
    E, C, L = len(adapter_names), len(choices), max(len(c) for c in choices)
    # One row per (prompt, input, choice): the input, then the choice, right-padded.
    rows = torch.zeros(E, B, C, T + L, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros_like(rows)
    targets = torch.full_like(rows, -100)
    for b in range(B):
        n = int(lengths[b])
        for c, choice in enumerate(choices):
            ids = torch.tensor(choice, dtype=input_ids.dtype, device=input_ids.device)
            rows[:, b, c, :n] = input_ids[b, :n]
            rows[:, b, c, n:n + len(ids)] = ids
            mask[:, b, c, :n + len(ids)] = 1
            targets[:, b, c, n:n + len(ids)] = ids
    names = [name for name in adapter_names for _ in range(B * C)]
    out = model(input_ids=rows.flatten(0, 2), attention_mask=mask.flatten(0, 2), adapter_names=names)
    log_probs = F.log_softmax(out.logits[:, :-1].float(), dim=-1)
    shifted = targets.flatten(0, 2)[:, 1:]
    token_scores = log_probs.gather(-1, shifted.clamp(min=0)[..., None])[..., 0] * (shifted != -100)
    return token_scores.sum(-1).view(E, B, C)


def mean_log_prob(scores: torch.Tensor, choices: list[list[int]]) -> torch.Tensor:
    """Per-token mean of `score_choices` scores, for choices of different lengths."""
    return scores / torch.tensor([len(c) for c in choices], dtype=scores.dtype, device=scores.device)


def combine_predictions(scores: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """Ensemble prediction [B] from per-prompt scores [n_prompts, B, n_choices].

    how="mean": the choice with the highest mean log-probability over prompts; how="vote": the
    majority vote of the prompts' own predictions (ties go to the lower choice index).
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must have shape [n_prompts, B, n_choices], got {tuple(scores.shape)}")
    if how == "mean":
        return scores.mean(0).argmax(-1)
    if how == "vote":
        votes = F.one_hot(scores.argmax(-1), scores.shape[-1]).sum(0)  # [B, n_choices]
        return votes.argmax(-1)
    raise ValueError(f"how must be 'mean' or 'vote', got {how!r}")
