"""What a training run shows while it runs: a tqdm bar, a line every few steps, or nothing."""

from __future__ import annotations

import importlib.util
import sys

PROGRESS_MODES = ("auto", "tqdm", "print", "none")


class Progress:
    """Progress of a run of `total` steps that starts at step `initial`.

    mode: "tqdm" (a bar), "print" (a line every `every` steps), "none", or "auto" (a bar on a terminal
    when tqdm is installed, else lines); "tqdm" without tqdm installed says so and prints lines.
    """

    def __init__(self, mode: str, total: int, initial: int, every: int):
        self.bar = None
        if mode == "auto":
            mode = "tqdm" if sys.stderr.isatty() and _has_tqdm() else "print"
        if mode == "tqdm":
            if _has_tqdm():
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc="train", unit="step")
            else:
                print("tqdm is not installed; printing progress lines")
                mode = "print"
        self.mode, self.total, self.every = mode, total, max(1, every)

    def update(self, step: int, record: dict) -> None:
        """Show the training record of `step` (loss, lr, grad_norm, tokens_per_s)."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        elif self.mode == "print" and (step % self.every == 0 or step == self.total):
            print(f"step {step}/{self.total}  loss {record['loss']:.4f}  lr {record['lr']:.3g}  "
                  f"grad_norm {record['grad_norm']:.3g}  {record['tokens_per_s']:.0f} tokens/s", flush=True)

    def message(self, text: str) -> None:
        """One line of text; also after `close` (tqdm's write does not need an open bar)."""
        if self.bar is not None:
            self.bar.write(text)
        elif self.mode == "print":
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _has_tqdm() -> bool:
    return importlib.util.find_spec("tqdm") is not None
