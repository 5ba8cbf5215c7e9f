"""SPoT (Vu et al. 2022): soft prompts as task embeddings, task similarity, and prompt transfer.

A task's embedding is its tuned prompt [P, d]. Two similarities (both in [-1, 1]):
- "average": cosine of the average-pooled prompt tokens, cos(mean_i a_i, mean_j b_j);
- "per-token": the average cosine over every pair of tokens, 1/(Pa Pb) Σ_i Σ_j cos(a_i, b_j).
  It equals ⟨mean_i â_i, mean_j b̂_j⟩ with x̂ = x / ‖x‖, which is how it is computed (one matrix product
  for a whole similarity matrix).
Prompts may differ in length; tokens of zero norm count as cosine 0.

Transfer: rank the source tasks by their similarity to a target's embedding (a prompt briefly tuned on
the target), then start the target's prompt from the best source prompt, or from the average of the
top k (`transfer_prompt`).

    sources = {"sst": sst_prompt, "news": news_prompt}          # [P, d] tensors
    scores = similarity_matrix([target_prompt], list(sources.values()), "average")[0]
    order = rank_sources(dict(zip(sources, scores.tolist())))   # [(name, score), ...], best first
    start = transfer_prompt(sources, [name for name, _ in order], top_k=1)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METRICS = ("average", "per-token")


def task_embedding(prompt: torch.Tensor, metric: str = "average") -> torch.Tensor:
    """The vector [d] (fp32) whose dot products give `metric`'s similarity: the unit mean token for
    "average", the mean of the unit tokens for "per-token". prompt: [P, d], any float dtype."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if prompt.dim() != 2 or prompt.shape[0] == 0:
        raise ValueError(f"prompt must be [P, d] with P >= 1, got {tuple(prompt.shape)}")
    prompt = prompt.detach().float()
    if metric == "average":
        return F.normalize(prompt.mean(0), dim=0)
    return F.normalize(prompt, dim=-1).mean(0)


def similarity_matrix(rows: list[torch.Tensor], cols: list[torch.Tensor], metric: str = "average") -> torch.Tensor:
    """[len(rows), len(cols)] fp32 (CPU) similarities of each row prompt to each column prompt; every
    prompt is [P, d] (P may vary, d may not)."""
    if not rows or not cols:
        raise ValueError("rows and cols must each hold at least one prompt [P, d]")
    dims = {p.shape[-1] for p in [*rows, *cols]}
    if len(dims) != 1:
        raise ValueError(f"all prompts must share the embedding size d, got sizes {sorted(dims)}")
    left = torch.stack([task_embedding(p, metric).cpu() for p in rows])
    right = torch.stack([task_embedding(p, metric).cpu() for p in cols])
    return left @ right.T


def rank_sources(scores: dict[str, float]) -> list[tuple[str, float]]:
    """(source, similarity) pairs, most similar first (ties broken by name)."""
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def transfer_prompt(sources: dict[str, torch.Tensor], ranking: list[str], top_k: int = 1) -> torch.Tensor:
    """The target's starting prompt [P, d] (fp32): the first source of `ranking` (top_k=1, SPoT's best
    source) or the element-wise average of the first top_k sources' prompts, which must share [P, d]."""
    if not isinstance(top_k, int) or not 1 <= top_k <= len(ranking):
        raise ValueError(f"top_k must be an int in [1, {len(ranking)}] (ranked sources), got {top_k!r}")
    chosen = ranking[:top_k]
    unknown = [name for name in chosen if name not in sources]
    if unknown:
        raise ValueError(f"ranking names sources {unknown} that are not in sources ({sorted(sources)})")
    shapes = {tuple(sources[name].shape) for name in chosen}
    if len(shapes) != 1:
        raise ValueError(f"the top {top_k} source prompts differ in shape {sorted(shapes)}; an average needs "
                         "one num_virtual_tokens")
    return torch.stack([sources[name].detach().float().cpu() for name in chosen]).mean(0)
