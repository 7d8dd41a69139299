"""harness/timing.py: row structure and the correctness of what is timed; never the timing values themselves."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model
from harness.timing import greedy_generate, linear_shapes, time_generation
from kernels.microbench import gemm_microbench, percentile, summarize

ROW_KEYS = {"suite", "task", "metric", "value", "stderr", "n", "detail"}


def check_row(row: dict) -> dict:
    assert set(row) == ROW_KEYS and row["suite"] == "timing"
    assert isinstance(row["value"], float) and row["value"] > 0
    return json.loads(row["detail"])


def test_percentile_interpolates():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 10) == pytest.approx(1.0)
    assert summarize([5.0]) == {"median": 5.0, "p10": 5.0, "p90": 5.0}
    with pytest.raises(ValueError):
        percentile([], 50)


def test_greedy_generate_matches_hf_generate():
    model = tiny_model("llama")
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    tokens, t_prefill, t_decode = greedy_generate(model, prompt, 4, "cpu")
    want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5,
                          do_sample=False, pad_token_id=0)
    assert tokens.shape == (2, 5) and torch.equal(tokens, want[:, 6:])
    assert t_prefill > 0 and t_decode > 0


def test_time_generation_rows():
    rows = time_generation(tiny_model("llama"), vocab_size=256, prompt_len=8, decode_tokens=3, batch_sizes=[1, 2],
                           device="cpu", warmup=1, repeats=2)
    assert [(r["task"], r["metric"]) for r in rows] == [
        ("generate_bs1_p8", "prefill_tokens_per_s"), ("generate_bs1_p8", "decode_tokens_per_s"),
        ("generate_bs2_p8", "prefill_tokens_per_s"), ("generate_bs2_p8", "decode_tokens_per_s")]
    for r in rows:
        d = check_row(r)
        assert r["n"] == 2 and d["p10"] <= r["value"] <= d["p90"]
        assert d["device"] and d["batch_size"] in (1, 2) and d["prompt_len"] == 8


@pytest.mark.parametrize("kwargs, match", [(dict(decode_tokens=0), "decode_tokens"),
                                           (dict(batch_sizes=[]), "batch_sizes"), (dict(repeats=0), "repeats")])
def test_time_generation_rejects_bad_arguments(kwargs, match):
    args = dict(vocab_size=256, prompt_len=4, decode_tokens=3, batch_sizes=[1], device="cpu") | kwargs
    with pytest.raises(ValueError, match=match):
        time_generation(tiny_model("llama"), **args)


def test_gemm_microbench_rows_and_ratio():
    rows = gemm_microbench([(64, 32), (96, 48)], [1, 3], 32, ["cpu_int4", "reference"], "cpu", repeats=2, warmup=1,
                           min_sample_s=0.001)
    from kernels.cpu_int4 import native_bf16

    by = {(r["task"], r["metric"]): r for r in rows}
    n_dense = 2 if native_bf16() else 1  # fp32, and bf16 where the CPU has it natively
    assert len(rows) == 2 * 2 * (n_dense + 2 + 2 * n_dense)  # per (shape, M): dense, 2 backends, their speedups
    for shape in ("64x32", "96x48"):
        for m in (1, 3):
            task = f"gemm_{shape}_m{m}"
            for b in ("cpu_int4", "reference"):
                ms_b, ms_d = by[(task, f"ms_{b}")], by[(task, "ms_dense")]
                d = check_row(ms_b)
                assert d["M"] == m and f"{d['in']}x{d['out']}" == shape and d["group_size"] == 32
                assert d["p10"] <= ms_b["value"] <= d["p90"]
                speedup = by[(task, f"speedup_{b}_vs_dense")]
                check_row(speedup)
                assert speedup["value"] == pytest.approx(ms_d["value"] / ms_b["value"])
            assert json.loads(by[(task, "ms_dense")]["detail"])["weights"] == "float32"
            if native_bf16():
                assert json.loads(by[(task, "ms_dense_bf16")]["detail"])["weights"] == "bfloat16"
                assert by[(task, "speedup_cpu_int4_vs_dense_bf16")]["value"] == pytest.approx(
                    by[(task, "ms_dense_bf16")]["value"] / by[(task, "ms_cpu_int4")]["value"])
            assert json.loads(by[(task, "ms_cpu_int4")]["detail"])["path"] == "int4_kernel"


def test_gemm_microbench_rejects_unrunnable_backend():
    with pytest.raises(ValueError, match="cpu_int4"):
        gemm_microbench([(64, 24)], [1], 32, ["cpu_int4"], "cpu", repeats=1)  # out=24 is not a multiple of 16
    with pytest.raises(ValueError, match="allowed values"):
        gemm_microbench([(64, 32)], [1], 32, ["marlin"], "cpu", repeats=1)


def test_linear_shapes_dedups_in_order():
    model = tiny_model("llama")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.q_proj",
             "model.layers.0.mlp.down_proj"]
    assert linear_shapes(model, names) == [(64, 64), (64, 32), (160, 64)]
