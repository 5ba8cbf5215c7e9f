"""The default training recipe of `fastprompt train`: what a run uses for every flag the user leaves out.

Measured with ``bench/recipes.py`` (README, "Default recipe", for the numbers and what they do not cover): on
small models prompt tuning from a random start is unstable across seeds (Lester et al.); starting the prompt
from the embeddings of a short instruction that names the answer words, with a lower learning rate, a linear
warm-up and a cosine decay, was more accurate than the old defaults on three tasks and no less steady. PEFT's
example's lr 3e-2 with linear decay was 1.5 points better on one task (news) and twice as unsteady on another
(debates), which the runs read 2.9 times: the rate is 3e-2 when a run reads its rows at most once (over five
seeds as steady as 1e-2 there, on four tasks; for MPT too, on three; over ten, one seed of ten fell 11 points on
one task, subjectivity, in its last steps, where lr 1e-2 did not: prompt tuning's run then ends with the mean of
its last quarter's prompts, tail averaging, which held that seed), else 1e-2. Prefix tuning from
PEFT's random prefix stayed near chance on two of the three tasks under every schedule tried; started from that
instruction's keys/values it learnt them (Li & Liang's start from real activations). P-tuning's encoder trained
best with PEFT's own task-guide recipe; from PEFT's random start one seed in five fell behind, and started from
the instruction (its table the instruction's embeddings, the encoder adding to it: `encoder_init`) it was
steadier and better.

    recipe = default_recipe("prompt-tuning", ["positive", "negative"])
    recipe.init_text   # 'Answer with one word: positive or negative.\\n'
"""

from __future__ import annotations

from dataclasses import dataclass

from fastprompt.config import check_positive_int

@dataclass(frozen=True)
class Recipe:
    """The defaults of one run. init: "text" (from `init_text`), "random", ... as `--init` takes them;
    num_virtual_tokens None: as many as `init_text` has tokens (the untuned prompt is that text)."""

    init: str
    init_text: str | None
    num_virtual_tokens: int | None
    lr: float
    schedule: str
    warmup: int
    steps: int
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    encoder_hidden_size: int | None = None   # P-tuning's encoder width (None: PEFT's, the model's hidden size)
    average_tail: float = 0.0   # end with the mean of the prompts after each step of this last share of the
                                # steps (`averaging`; 0.25: the last quarter); 0: the last step's prompt


STEPS = 100   # every default recipe's optimizer steps
TAIL_SHARE = 0.25   # tail averaging's share of the steps, where a default averages: the last quarter

# The defaults before the measurement (fastprompt <= 2026-12-04): the study's baseline, and still the
# defaults of the transfer stages (mpt-source, mpt-target, spot-transfer), which the study did not cover.
OLD_RECIPE = Recipe(init="random", init_text=None, num_virtual_tokens=20, lr=3e-2, schedule="constant", warmup=0,
                    steps=100)


def instruction(label_words: list[str]) -> str:
    """A task-agnostic instruction naming the answer words, e.g. 'Answer with one word: positive or
    negative.\\n'; the prompt starts as its embeddings, so before tuning the model reads exactly this."""
    if not label_words:
        raise ValueError("instruction needs at least one label word")
    words = [w.strip() for w in label_words]
    listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
    return f"Answer with one word: {listed}.\n"


def default_recipe(method: str, label_words: list[str] | None = None, epochs: float | None = None) -> Recipe:
    """The measured default for `method` ("prompt-tuning", "mpt", "prefix-tuning", "p-tuning").

    label_words: the verbalizer word of each label when the training data is classification (None for
    text-to-text data). Prompt tuning and MPT then start from `instruction(label_words)`'s embeddings (MPT's
    task factors at one, `mpt.start_tasks_at_shared_prompt`, so its prompt is that text), prefix tuning from its
    keys/values (`prefix_init`), P-tuning from its embeddings as the table of a residual encoder
    (`encoder_init`: the encoder adds to the table, starting at zero); otherwise from PEFT's own start (random
    prompt, random prefix, the P-tuning encoder's initialisation). With label words `init_text` is the
    instruction for every method (what `--init text` starts from when no text is given).

    epochs: how many times the run reads its training rows (`run_epochs`; None: not known). Prompt tuning and
    MPT from the instruction train at lr 1e-2 with 10 steps of warm-up and a cosine decay; when the run reads its
    rows at most once (epochs <= 1) they train at PEFT's example's lr 3e-2 with a linear decay and no warm-up,
    which was as steady there over five seeds and better on some tasks (prompt tuning: one in four; MPT: two
    in three), but less steady over several epochs, and on one task over ten seeds one prompt-tuning seed in
    ten fell 11 points in its last steps (README, "Ten seeds"). So prompt tuning's run within one epoch ends
    with the mean of its prompts over the last quarter of its steps (`average_tail` 0.25, tail averaging:
    README, "Tail averaging" and "Tail averaging's length"), which held that seed, and on a task near chance
    (speeches) spread less over seeds than the mean of the last half. Over several epochs, and for prefix
    tuning, P-tuning and MPT, averaging was not steadier (README, "Tail averaging elsewhere"), so their runs end
    with the last step's weights.

    P-tuning trains by PEFT's task-guide recipe ("P-tuning for sequence classification": encoder width 128,
    lr 1e-3, weight decay 0.01, linear decay without warm-up), the best the study found for it: prompt
    tuning's schedule (lr 1e-2, cosine) wavered across seeds through the encoder."""
    if epochs is not None and not epochs > 0:
        raise ValueError(f"epochs must be a positive number or None, got {epochs!r}")
    text_init = bool(label_words)
    start = {"init": "text" if text_init else "random",
             "init_text": instruction(label_words) if label_words else None,   # also `--init text`'s default
             "num_virtual_tokens": None if text_init else 20}
    if method == "p-tuning":
        return Recipe(**start, lr=1e-3, schedule="linear", warmup=0, steps=STEPS, weight_decay=0.01,
                      encoder_hidden_size=128)
    if method in ("prompt-tuning", "mpt") and text_init and epochs is not None and epochs <= 1:
        tail = TAIL_SHARE if method == "prompt-tuning" else 0.0   # measured for it (README, "Tail averaging")
        return Recipe(**start, lr=3e-2, schedule="linear", warmup=0, steps=STEPS, average_tail=tail)
    return Recipe(**start, lr=1e-2, schedule="cosine", warmup=10, steps=STEPS)


def run_epochs(steps: int, rows_per_step: int, training_rows: int) -> float:
    """How many times a run of `steps` optimizer steps, each of `rows_per_step` rows (batch size × gradient
    accumulation × processes), reads `training_rows` rows: `default_recipe`'s `epochs`."""
    for name, value in (("steps", steps), ("rows_per_step", rows_per_step), ("training_rows", training_rows)):
        check_positive_int(name, value)
    return steps * rows_per_step / training_rows
