"""The training suite on a tiny Llama on the CPU: every provider checked and timed, rows complete, ratios to
PEFT (SDPA), and a provider with wrong outputs refused while the others still run."""

import pytest
import torch

from bench import training
from bench.flops import train_step_flops
from bench.models import build_model, model_shape

pytest.importorskip("peft")

CPU = torch.device("cpu")
SETTINGS = training.Settings(CPU, torch.float32, warmup=0, steps=2)
# Odd sizes; MPT with 5 rows over 4 tasks mixes tasks in the batch (row i has task i % 4). Every method
# of the suite appears once.
CASES = [training.Case("tiny-llama", training.Method("prompt_tuning", 5), batch=3, seq_len=7),
         training.Case("tiny-llama", training.Method("mpt", 6, n_tasks=4), batch=5, seq_len=9),
         training.Case("tiny-llama", training.Method("prefix", 3), batch=3, seq_len=5),
         training.Case("tiny-llama", training.Method("p_tuning_mlp", 4), batch=2, seq_len=7)]
PEAK = 123.0e9   # FLOP/s given to the MFU, so that its value can be checked exactly
SETTINGS_WITH_PEAK = training.Settings(CPU, torch.float32, warmup=0, steps=2, peak_flops=PEAK)


@pytest.fixture(scope="module")
def rows():
    return training.run(CASES, SETTINGS_WITH_PEAK, log=lambda line: None)


@pytest.fixture(scope="module")
def base():
    return build_model("tiny-llama", torch.float32, CPU)


def test_every_provider_is_checked_timed_and_reported_with_every_key(rows, base):
    assert [r["provider"] for r in rows] == list(training.PROVIDERS) * len(CASES)
    for row, case in zip(rows, [c for c in CASES for _ in training.PROVIDERS]):
        assert set(training.ROW_KEYS) | {f"{m}_vs_peft" for m in training.RATIO_METRICS} == set(row)
        assert (row["method"], row["batch"], row["seq_len"]) == (case.method.label, case.batch, case.seq_len)
        if case.method.name == "prefix" and row["provider"] == "fastprompt-concat":
            # Prefix tuning has no concat path: said in the row, never timed.
            assert row["status"] == "n/a" and "no concat path" in row["error"]
            assert row["step_ms"] is None and row["tokens_per_s"] is None and row["tokens_per_s_vs_peft"] is None
            continue
        if row["provider"] == "fastprompt-loss-graph":  # CUDA graphs: natively tested in tests/gpu
            assert row["status"] == "n/a" and "CUDA" in row["error"] and row["step_ms"] is None
            continue
        assert row["status"] == "ok", row["error"]
        assert row["model_shape"] == model_shape(base)
        assert row["loss_rel_err"] <= row["loss_tolerance"] == 1e-4
        if row["provider"] == "peft-lora-r16":   # no prompt: its loss is the backbone's, nothing else to compare
            assert row["grad_rel_err"] is None
        else:
            assert row["grad_rel_err"] <= row["grad_tolerance"] == 1e-4
        assert row["step_ms_p20"] <= row["step_ms"] <= row["step_ms_p80"]
        assert row["tokens_per_s"] == pytest.approx(case.batch * case.seq_len / (row["step_ms"] / 1e3))
        assert row["saved_mb"] > 0 and row["peak_mb"] is None
        # MFU against the given (measured) peak; no datasheet peak for a CPU.
        assert row["peak_tflops_measured"] == PEAK / 1e12
        assert row["mfu"] == pytest.approx(row["flops_per_step"] / (row["step_ms"] / 1e3) / PEAK)
        assert row["peak_tflops_datasheet"] is None and row["mfu_datasheet"] is None
        virtual = 0 if row["provider"] == "peft-lora-r16" else case.method.num_virtual
        entries = 0 if row["provider"] == "peft-lora-r16" else case.method.prompt_entries
        assert row["flops_per_step"] == train_step_flops(row["model_shape"], batch=case.batch, seq_len=case.seq_len,
                                                         num_virtual=virtual, prompt_entries=entries)


def test_ratios_are_to_peft_sdpa_of_the_same_case(rows):
    for i in range(0, len(rows), len(training.PROVIDERS)):
        case_rows = rows[i:i + len(training.PROVIDERS)]
        baseline = next(r for r in case_rows if r["provider"] == "peft-sdpa")
        for row in case_rows:
            if row["status"] != "ok":
                continue
            for metric in training.RATIO_METRICS[::2]:   # tokens_per_s, saved_mb (peak_mb is None on the CPU)
                assert row[f"{metric}_vs_peft"] == pytest.approx(row[metric] / baseline[metric])
            assert row["peak_mb_vs_peft"] is None


def test_run_measures_the_peak_once_when_settings_carry_none(monkeypatch):
    calls = []

    def fake_peak(device, dtype):
        calls.append((device, dtype))
        return 2.5e10

    monkeypatch.setattr(training, "measured_peak_flops", fake_peak)
    rows = training.run(CASES[:1], SETTINGS, providers={"peft-sdpa": training.PROVIDERS["peft-sdpa"]},
                        log=lambda line: None)
    assert calls == [(CPU, torch.float32)]
    assert rows[0]["peak_tflops_measured"] == 0.025
    assert rows[0]["mfu"] == pytest.approx(rows[0]["flops_per_step"] / (rows[0]["step_ms"] / 1e3) / 2.5e10)


def test_row_by_row_reference_equals_the_whole_batch(base):
    case = CASES[1]
    batch = training.Batch.random(case, model_shape(base)["vocab"], CPU)
    torch.manual_seed(0)
    runner = training.peft_prompt("eager")(base, case.method, None)
    whole_loss, whole = training.loss_and_grads(runner, batch)
    rowwise_loss, rowwise = training.loss_and_grads(runner, batch, rows_per_chunk=1)
    assert rowwise_loss == pytest.approx(whole_loss, rel=1e-6)
    assert sorted(whole) == sorted(rowwise) and whole
    for name, grad in whole.items():
        assert float((rowwise[name] - grad).norm() / grad.norm()) < 1e-5, name


def test_providers_share_the_base_weights_and_the_reference_converts_a_copy():
    """Every provider's backbone has modules of its own on the base model's weights (an 8B case holds one
    model); the fp32 reference converts a copy and leaves the base as it was."""
    half = build_model("tiny-llama", torch.bfloat16, CPU)
    before = {name: p.clone() for name, p in half.named_parameters()}
    shared = training._backbone_copy(half, "eager")
    assert all(a is b for a, b in zip(shared.parameters(), half.parameters()))
    assert shared.model.layers[0] is not half.model.layers[0]
    assert (shared.config._attn_implementation, half.config._attn_implementation) == ("eager", "sdpa")
    full = training._backbone_copy(half, "eager", torch.float32)
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    assert full.lm_head.weight is full.model.embed_tokens.weight      # tied weights stay tied in the copy
    case = CASES[0]
    batch = training.Batch.random(case, model_shape(half)["vocab"], CPU)
    ref, state = training.reference(half, case.method, batch, torch.bfloat16)
    assert ref.bar and all(v.dtype == torch.float32 for v in state.values())
    assert all(torch.equal(v, v.bfloat16().float()) for v in state.values())   # what a bf16 provider loads
    for name, p in half.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[name]), name


def test_each_path_is_a_provider_of_its_own():
    assert training.PATH_PROVIDERS == ("fastprompt-eager", "fastprompt-shared", "fastprompt-concat")
    assert set(training.PATH_PROVIDERS) < set(training.PROVIDERS)


def test_half_precision_bar_is_peft_own_error_or_the_design_tolerance():
    assert training.tolerance(torch.float32, 0.5) == 1e-4
    assert training.tolerance(torch.bfloat16, None) == 2e-2
    assert training.tolerance(torch.bfloat16, 0.001) == 2e-2
    assert training.tolerance(torch.bfloat16, 0.03) == pytest.approx(1.25 * 0.03 + 1e-3)


def _perturbed_fastprompt(base, method, state):
    """fastprompt with every prompt parameter nudged by 1%: a provider whose outputs are wrong."""
    runner = training.fastprompt_model("torch")(base, method, state)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in runner.params.values():
            param.add_(0.01 * param.abs().mean() * torch.randn(param.shape, generator=gen))
    return runner


def _out_of_memory(base, method, state):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_wrong_provider_is_refused_and_out_of_memory_reported_while_the_rest_run(base):
    providers = {"peft-sdpa": training.PROVIDERS["peft-sdpa"], "wrong": _perturbed_fastprompt,
                 "too-big": _out_of_memory, "fastprompt": training.PROVIDERS["fastprompt"]}
    rows = training.bench_case(base, CASES[0], SETTINGS, providers, log=lambda line: None)
    by_provider = {r["provider"]: r for r in rows}
    assert list(by_provider) == list(providers)
    wrong = by_provider["wrong"]
    assert wrong["status"] == "refused" and "refusing to report its speed" in wrong["error"]
    assert wrong["step_ms"] is None and wrong["tokens_per_s"] is None
    assert by_provider["too-big"]["status"] == "oom" and by_provider["too-big"]["step_ms"] is None
    assert by_provider["peft-sdpa"]["status"] == by_provider["fastprompt"]["status"] == "ok"


def test_the_default_provider_runs_the_whole_step_where_graphs_serve(base, monkeypatch):
    """`fastprompt` is the Trainer's default step: where graphs serve (here the CPU, with the eager stand-in
    for the CUDA recorder), the whole step, checked through that step at learning rate 0 (the prompt stays
    as it was) and timed as the step; elsewhere fastprompt-eager's runner."""
    from fastprompt.train import cuda_graphs
    from tests.train.test_cuda_graph_step import EagerRecorder

    assert training.PROVIDERS["fastprompt"](base, CASES[0].method, None).step is None   # CPU: eager
    recorder = EagerRecorder()
    monkeypatch.setattr(cuda_graphs, "RECORDER", recorder)

    def peak_memory_mb(fn, device):   # stands in for CUDA's counter: 100 MB, + 1 when a graph was captured
        captured = recorder.records
        fn()
        return 100.0 + recorder.records - captured

    monkeypatch.setattr(training, "peak_memory_mb", peak_memory_mb)
    providers = {name: training.PROVIDERS[name] for name in ("peft-sdpa", "fastprompt")}
    for case in CASES[:3]:
        rows = {r["provider"]: r for r in training.bench_case(base, case, SETTINGS, providers, log=lambda line: None)}
        ours = rows["fastprompt"]
        assert ours["status"] == "ok", ours["error"]
        assert ours["loss_rel_err"] <= 1e-4 and ours["grad_rel_err"] <= 1e-4
        assert ours["step_ms"] > 0 and ours["saved_mb"] > 0
        # The graph's memory is its build and capture's (a replay allocates nothing); PEFT's is its step's.
        assert ours["peak_mb"] == 101.0 and rows["peft-sdpa"]["peak_mb"] == 100.0
    assert recorder.records == 3
