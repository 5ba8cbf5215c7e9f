"""The serving suite on a tiny Llama on the CPU: every provider generates the same greedy tokens, wrong tokens
are refused, the latency statistics are what they say."""

import pytest
import torch

from bench import serving
from bench.harness import WrongOutput
from bench.models import build_model

pytest.importorskip("peft")

CPU = torch.device("cpu")
SETTINGS = serving.Settings(CPU, torch.float32, reps=1)
CASES = serving.serving_cases("tiny-llama", rows=5, task_counts=(1, 5), prompt_len=6, new_tokens=4, num_virtual=3)


@pytest.fixture(scope="module")
def base():
    return build_model("tiny-llama", torch.float32, CPU)


@pytest.fixture(scope="module")
def reference(base):
    ref = build_model("tiny-llama", torch.float32, CPU)
    ref.load_state_dict(base.state_dict())
    ref.set_attn_implementation("eager")
    return ref


def test_rows_are_complete_and_ratios_are_to_peft():
    rows = serving.run(CASES, SETTINGS, log=lambda line: None)
    assert [(r["n_tasks"], r["provider"]) for r in rows] == [(c.n_tasks, p) for c in CASES for p in serving.PROVIDERS]
    for row in rows:
        assert set(serving.ROW_KEYS) | {f"{m}_vs_peft" for m in serving.RATIO_METRICS} == set(row)
        assert row["status"] == "ok", row["error"]
        assert 0 < row["ttft_ms_p50"] <= row["ttft_ms_p99"] <= row["total_ms"]
        assert 0 < row["itl_ms_p50"] <= row["itl_ms_p99"]
        assert row["tokens_per_s"] == pytest.approx(5 * 4 / (row["total_ms"] / 1e3))
        peft = next(r for r in rows if r["n_tasks"] == row["n_tasks"] and r["provider"] == "peft")
        assert row["tokens_per_s_vs_peft"] == pytest.approx(row["tokens_per_s"] / peft["tokens_per_s"])


def test_every_provider_generates_the_same_greedy_tokens(base, reference):
    w = serving.Workload.random(CASES[1], base)
    outputs = {name: build(base, w)() for name, build in serving.PROVIDERS.items()}
    expected = outputs["peft"].tokens
    assert expected.shape == (5, 4)
    for name, generation in outputs.items():
        assert torch.equal(generation.tokens, expected), name
        assert (generation.times[:, 1:] > generation.times[:, :-1]).all(), name
        serving.check_tokens(name, generation.tokens, w, reference, rtol=1e-4)


def test_a_token_the_reference_would_not_choose_is_refused(base, reference):
    w = serving.Workload.random(CASES[1], base)
    tokens = serving.fastprompt_generate(base, w)().tokens
    with torch.no_grad():  # the reference's least likely token at row 3's third step
        seq = torch.cat([w.input_ids[3:4], tokens[3:4, :2]], dim=1)
        worst = reference(inputs_embeds=serving.concatenated_embeddings(reference, w, seq, slice(3, 4))).logits
    wrong = tokens.clone()
    wrong[3, 2] = worst[0, -1].argmin()
    with pytest.raises(WrongOutput, match="token 2 of row 3"):
        serving.check_tokens("wrong", wrong, w, reference, rtol=1e-4)


def test_a_provider_with_wrong_tokens_gets_a_refused_row(base, reference):
    def shifted(base, w):
        run = serving.fastprompt_generate(base, w)

        def wrong():
            out = run()
            return serving.Generation((out.tokens + 1) % base.config.vocab_size, out.times)
        return wrong

    providers = {"peft": serving.PROVIDERS["peft"], "shifted": shifted}
    rows = serving.bench_case(base, reference, CASES[0], SETTINGS, providers, log=lambda line: None)
    assert [r["status"] for r in rows] == ["ok", "refused"]
    assert "refusing to report its speed" in rows[1]["error"] and rows[1]["tokens_per_s"] is None


def test_latency_statistics_by_hand():
    run_1 = torch.tensor([[0.010, 0.012, 0.015], [0.020, 0.021, 0.030]], dtype=torch.float64)
    run_2 = torch.tensor([[0.005, 0.006, 0.008], [0.005, 0.006, 0.008]], dtype=torch.float64)
    stats = serving.latency_stats([run_1, run_2])
    # TTFT 10, 20, 5, 5 ms; inter-token 2, 3, 1, 9, 1, 2, 1, 2 ms; 6 tokens in 30 ms and in 8 ms.
    assert stats["ttft_ms_p50"] == pytest.approx(7.5)
    assert stats["ttft_ms_p99"] == pytest.approx(10 + 0.97 * 10)
    assert stats["itl_ms_p50"] == pytest.approx(2.0)
    assert stats["itl_ms_p99"] == pytest.approx(3 + 0.93 * 6)
    assert stats["tokens_per_s"] == pytest.approx((6 / 0.030 + 6 / 0.008) / 2)
    assert stats["total_ms"] == pytest.approx((30 + 8) / 2)


def test_cases_refuse_impossible_task_counts():
    with pytest.raises(ValueError, match="1..rows=4"):
        serving.serving_cases("tiny-llama", rows=4, task_counts=(1, 8), prompt_len=6, new_tokens=4, num_virtual=3)
    with pytest.raises(ValueError, match="new_tokens must be >= 2"):
        serving.serving_cases("tiny-llama", rows=4, task_counts=(1,), prompt_len=6, new_tokens=1, num_virtual=3)
