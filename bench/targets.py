"""The issue's targets, read off the training rows of one run (main table, prompt tuning P=100).

On a GPU: fastprompt's tokens/s >= 1.8x PEFT (SDPA)'s, its peak memory <= 0.5x at equal batch, its step
faster than PEFT LoRA r=16's, and MPT with mixed-task rows (4 tasks) at the speed of single-task prompt
tuning (taken as >= 0.95x its tokens/s). On a CPU: fastprompt's PyTorch path no slower than PEFT. A value
is None (and the target unjudged) where a provider did not produce a timing.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

HEADLINE = "prompt_tuning-P100"
MIXED = "mpt-P100"


@dataclass
class Target:
    model: str
    what: str
    value: float | None
    bound: float
    compare: str          # ">=" or "<="

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return {">=": operator.ge, "<=": operator.le}[self.compare](self.value, self.bound)

    def __str__(self) -> str:
        value = "n/a" if self.value is None else f"{self.value:.2f}x"
        verdict = {True: "met", False: "MISSED", None: "not measured"}[self.met]
        return f"{self.model}: {self.what} {value} (target {self.compare} {self.bound}x): {verdict}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def targets(rows: list[dict], device_type: str) -> list[Target]:
    """The targets that apply on `device_type` ("cuda" or "cpu"), per model with a prompt_tuning-P100 case
    in the main table (sweep None) of the training rows."""
    found = []
    main = [r for r in rows if r.get("suite") == "training" and r.get("sweep") is None and r["status"] == "ok"]
    for model in dict.fromkeys(r["model"] for r in main if r["method"] == HEADLINE):
        cell = {(r["method"], r["provider"]): r for r in main if r["model"] == model}
        ours = cell.get((HEADLINE, "fastprompt"), {})
        lora = cell.get((HEADLINE, "peft-lora-r16"), {})
        mixed = cell.get((MIXED, "fastprompt"), {})
        if device_type == "cuda":
            found += [
                Target(model, "fastprompt tokens/s vs PEFT", ours.get("tokens_per_s_vs_peft"), 1.8, ">="),
                Target(model, "fastprompt peak memory vs PEFT", ours.get("peak_mb_vs_peft"), 0.5, "<="),
                Target(model, "fastprompt step time vs PEFT LoRA r=16",
                       _ratio(ours.get("step_ms"), lora.get("step_ms")), 1.0, "<="),
            ]
        else:
            torch_path = cell.get((HEADLINE, "fastprompt-torch"), {})
            found.append(Target(model, "fastprompt-torch tokens/s vs PEFT", torch_path.get("tokens_per_s_vs_peft"),
                                1.0, ">="))
        found.append(Target(model, "MPT mixed rows tokens/s vs prompt tuning",
                            _ratio(mixed.get("tokens_per_s"), ours.get("tokens_per_s")), 0.95, ">="))
    return found
