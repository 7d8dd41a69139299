"""CI's regression gate: the tiny sweep must reproduce the committed baseline, and a deliberately
perturbed method must fail it."""
import pytest
import torch

import core.quant
from analysis.regress import compare
from analysis.results import load_results
from regression_suite import BASELINE, run_sweep

FAILING = {"regression", "changed", "missing"}


@pytest.fixture(scope="module")
def baseline():
    frame = load_results(BASELINE)
    assert not frame.empty, f"no committed baseline under {BASELINE}: run python tests/regression_suite.py"
    return frame


def test_sweep_reproduces_the_committed_baseline(baseline, tmp_path):
    run_sweep(tmp_path / "assets", tmp_path / "results", tmp_path / "cache")
    diff = compare(baseline, load_results(tmp_path / "results"), skip_timing=True)
    bad = diff[diff["status"].isin(FAILING)]
    assert bad.empty, bad.to_string()


def test_a_perturbed_method_fails_the_gate(baseline, tmp_path, monkeypatch):
    real = core.quant.quantize_codes

    def off_by_one(w, scale, zero, bits):  # a subtle bug: every code one step too high
        return torch.clamp(real(w, scale, zero, bits) + 1, 0, 2**bits - 1)

    monkeypatch.setattr(core.quant, "quantize_codes", off_by_one)
    run_sweep(tmp_path / "assets", tmp_path / "results", tmp_path / "cache")
    diff = compare(baseline, load_results(tmp_path / "results"), skip_timing=True)
    failed = diff[diff["status"].isin(FAILING)]
    assert set(failed["method"]) >= {"rtn"}, diff.to_string()
    assert "fp" not in set(failed["method"])  # the unquantized baseline is untouched by the bug
