"""Host time of one PromptModel forward (and forward + backward) at tiny shapes, and the ops it calls.

    python -m bench.host_time                      # tiny Llama, every case below, one torch thread
    python -m bench.host_time --repeats 9 --steps 100

At tiny shapes a step is nearly all host time (Python, the dispatcher, checks), which is the regime a GPU
step at small batches lives in: this measures what the model layer adds per forward, on any CPU. Cases:
prompt tuning on the concat path and on the shared-prefix (packed) path in each of its attention forms
(the CPU's choice, masked; and split, two prefix-attention calls a layer, the GPU's form, forced here by
pricing its host time at zero), MPT with three tasks the same ways, and prefix tuning. For each: the best of `--repeats` timings of `--steps` calls (microseconds per
call), and under torch.profiler the number of aten op calls and of fastprompt op calls in one forward.
Prints one JSON object per case; nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time

import torch

PT = dict(peft_type="PROMPT_TUNING", num_virtual_tokens=8)
MPT = dict(peft_type="MULTITASK_PROMPT_TUNING", num_virtual_tokens=8, num_tasks=3)
CASES = {  # name: (method config kwargs, path, task ids per row or None)
    "prompt_tuning-concat": (PT, "concat", None),
    "prompt_tuning-packed": (PT, "shared_prefix", None),
    "prompt_tuning-packed-split": (PT, "shared_prefix", None),
    "mpt-concat": (MPT, "concat", [0, 1, 2, 1]),
    "mpt-packed": (MPT, "shared_prefix", [0, 1, 2, 1]),
    "mpt-packed-split": (MPT, "shared_prefix", [0, 1, 2, 1]),
    "prefix": (dict(peft_type="PREFIX_TUNING", num_virtual_tokens=8), "auto", None),
}
BATCH, SEQ_LEN = 4, 12


def build(case: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    import fastprompt
    from fastprompt.methods import as_fastprompt_config

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=503, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=160, tie_word_embeddings=True,
                                        max_position_embeddings=256))
    kwargs, path, tasks = CASES[case]
    model = fastprompt.get_peft_model(base, as_fastprompt_config({"task_type": "CAUSAL_LM", **kwargs}), path=path)
    ids = torch.randint(0, 503, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    inputs = dict(input_ids=ids, labels=ids)
    if tasks is not None:
        inputs["task_ids"] = torch.tensor(tasks)
    return model, inputs


def best_us(call, steps: int, repeats: int) -> float:
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            call()
        times.append((time.perf_counter() - start) / steps)
    return round(min(times) * 1e6, 1)


def op_counts(call) -> dict:
    from torch.profiler import profile

    call()
    with profile() as prof:
        call()
    events = prof.key_averages()
    return {"aten_calls": sum(e.count for e in events if e.key.startswith("aten::")),
            "fastprompt_calls": {e.key: e.count for e in events if e.key.startswith("fastprompt")}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {sorted(CASES)}")
    parser.add_argument("--steps", type=int, default=50, help="calls per timing (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=7, help="timings, the best kept (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for case in args.cases.split(","):
        with split_form_forced(case.endswith("-split")):
            measure(case, args.steps, args.repeats)


@contextlib.contextmanager
def split_form_forced(forced: bool):
    """The packed pass in its split form on the CPU: the form's extra host time priced at zero."""
    from fastprompt import path_choice

    calibrated = path_choice.PATH_COST_CONSTANTS["cpu"]
    if forced:
        path_choice.PATH_COST_CONSTANTS["cpu"] = dataclasses.replace(calibrated, extra_host_s_per_layer=0.0)
    try:
        yield
    finally:
        path_choice.PATH_COST_CONSTANTS["cpu"] = calibrated


def measure(case: str, steps: int, repeats: int) -> None:
    model, inputs = build(case)

    def forward():
        with torch.no_grad():
            model(**inputs, return_logits=False)

    def step():
        model(**inputs).loss.backward()

    print(json.dumps({"case": case, "batch": BATCH, "seq_len": SEQ_LEN, "forward_us": best_us(forward, steps, repeats),
                      "step_us": best_us(step, steps, repeats), **op_counts(forward)}))


if __name__ == "__main__":
    main()
