"""Regression gate on synthetic finished runs: identical passes, perturbations beyond tolerance fail, bad input is exit 2."""
from __future__ import annotations

import pandas as pd
import pytest

from analysis.regress import DEFAULT_TOLERANCES, Rule, compare, failed, main, parse_tolerances, rule_for
from analysis.results import to_frame, write_run


def run_rows(run_id: str, method: str, bits, group_size, observations, device="cpu",
             started_at="2026-11-22T10:00:00+00:00") -> list[dict]:
    """Rows of one run: (suite, task, metric, value, stderr) observations with shared config/provenance."""
    base = dict(run_id=run_id, model="tiny", method=method, bits=bits, group_size=group_size,
                symmetric=None if method == "fp" else False, calib_source=None if method in ("fp", "rtn") else "wiki",
                calib_samples=None if method in ("fp", "rtn") else 16, calib_seqlen=None if method in ("fp", "rtn") else 64,
                seed=0, device=device, started_at=started_at, git_sha="abc")
    return [dict(base, suite=s, task=t, metric=m, value=v, stderr=e) for s, t, m, v, e in observations]


def runs(ppl_awq: float = 21.0, acc_awq: float = 0.55, tps: float = 100.0, device="cpu") -> list[list[dict]]:
    return [
        run_rows("fp", "fp", None, None, [("ppl", "wiki", "ppl", 20.0, None), ("ppl", "wiki", "tokens", 4096.0, None)]),
        run_rows("rtn", "rtn", 4, None, [("ppl", "wiki", "ppl", 23.0, None), ("ppl", "wiki", "tokens", 4096.0, None),
                                         ("quant", "all", "storage_bits_per_weight", 4.125, None)]),
        run_rows("awq", "awq", 4, 128, [("ppl", "wiki", "ppl", ppl_awq, None), ("ppl", "wiki", "wall_s", 3.0, None),
                                        ("lm_eval", "arc_easy", "acc", acc_awq, 0.01),
                                        ("timing", "decode_bs1", "tokens_per_s", tps, None)], device=device),
    ]


def frame(run_list) -> pd.DataFrame:
    return to_frame([r for rows in run_list for r in rows])


def write(root, run_list):
    for rows in run_list:
        write_run(root / rows[0]["run_id"], to_frame(rows), "{}\n", {})
    return str(root)


def status(diff: pd.DataFrame, method: str, metric: str) -> str:
    return diff[(diff["method"] == method) & (diff["metric"] == metric)]["status"].item()


def test_identical_passes(tmp_path, capsys):
    base = write(tmp_path / "base", runs())
    cur = write(tmp_path / "cur", runs())
    assert main(["--baseline", base, "--current", cur]) == 0
    assert "PASS" in capsys.readouterr().out


def test_fp_and_per_channel_keys_match_despite_missing_values():
    diff = compare(frame(runs()), frame(runs()))
    assert not failed(diff) and set(diff["status"]) == {"ok", "ignored"}
    assert status(diff, "fp", "ppl") == "ok" and status(diff, "rtn", "ppl") == "ok"


def test_ppl_beyond_tolerance_fails(tmp_path, capsys):
    base = write(tmp_path / "base", runs())
    cur = write(tmp_path / "cur", runs(ppl_awq=21.0 * 1.002))
    assert main(["--baseline", base, "--current", cur]) == 1
    out = capsys.readouterr().out
    assert "regression" in out and "tiny awq w4 g128 sym=False calib=wiki/16x64 seed=0 :: ppl/wiki/ppl" in out


def test_ppl_within_tolerance_passes():
    diff = compare(frame(runs()), frame(runs(ppl_awq=21.0 * 1.0009)))
    assert status(diff, "awq", "ppl") == "ok" and not failed(diff)


def test_improvement_is_changed_unless_allowed():
    diff = compare(frame(runs()), frame(runs(ppl_awq=20.0)))
    assert status(diff, "awq", "ppl") == "changed" and failed(diff)
    diff = compare(frame(runs()), frame(runs(ppl_awq=20.0)), allow_improvements=True)
    assert status(diff, "awq", "ppl") == "improved" and not failed(diff)


def test_missing_row_fails_extra_row_passes(tmp_path, capsys):
    base = write(tmp_path / "base", runs())
    cur = write(tmp_path / "cur", runs()[:2])
    assert main(["--baseline", base, "--current", cur]) == 1
    assert "missing" in capsys.readouterr().out
    diff = compare(frame(runs()[:2]), frame(runs()))
    assert set(diff["status"]) == {"ok", "extra"} and not failed(diff)


def test_accuracy_tolerance_uses_stderr():
    # stderr 0.01 -> band max(0.01, 0.5 * 0.01) = 1 point; 1.5 points fails, 0.8 passes.
    assert status(compare(frame(runs()), frame(runs(acc_awq=0.535))), "awq", "acc") == "regression"
    assert status(compare(frame(runs()), frame(runs(acc_awq=0.542))), "awq", "acc") == "ok"
    wide = {**DEFAULT_TOLERANCES, "acc": Rule(abs=0.0, stderr_k=2.0, direction="higher")}
    assert status(compare(frame(runs()), frame(runs(acc_awq=0.535)), wide), "awq", "acc") == "ok"


def test_timing_loose_and_skippable():
    assert status(compare(frame(runs()), frame(runs(tps=80.0))), "awq", "tokens_per_s") == "ok"
    assert status(compare(frame(runs()), frame(runs(tps=70.0))), "awq", "tokens_per_s") == "regression"
    assert status(compare(frame(runs()), frame(runs(tps=200.0))), "awq", "tokens_per_s") == "improved"
    assert status(compare(frame(runs()), frame(runs(tps=70.0)), skip_timing=True), "awq", "tokens_per_s") == "ignored"
    assert status(compare(frame(runs()), frame(runs(tps=70.0, device="cuda"))), "awq", "tokens_per_s") == "ignored"


def test_timing_directions_follow_evaluator_metric_names():
    assert rule_for(DEFAULT_TOLERANCES, "timing", "decode_tokens_per_s").direction == "higher"
    assert rule_for(DEFAULT_TOLERANCES, "timing", "speedup_triton_vs_dense").direction == "higher"
    assert rule_for(DEFAULT_TOLERANCES, "timing", "ms_dense").direction == "lower"
    assert rule_for(DEFAULT_TOLERANCES, "timing", "median_ms").direction == "lower"
    assert rule_for(DEFAULT_TOLERANCES, "timing", "something").direction == "none"
    assert rule_for(DEFAULT_TOLERANCES, "ppl", "ppl").rel == 1e-3 and rule_for(DEFAULT_TOLERANCES, "x", "y") == Rule()


def test_metadata_metrics_exact():
    changed = runs()
    changed[1][1]["value"] = 4095.0
    diff = compare(frame(runs()), frame(changed))
    assert status(diff, "rtn", "tokens") == "changed" and failed(diff)


def test_duplicate_latest_wins():
    rerun = run_rows("awq2", "awq", 4, 128, [("ppl", "wiki", "ppl", 30.0, None)], started_at="2026-11-23T00:00:00+00:00")
    diff = compare(frame(runs()), frame(runs() + [rerun]))
    assert status(diff, "awq", "ppl") == "regression"


def test_bad_input_exit_2(tmp_path, capsys):
    base = write(tmp_path / "base", runs())
    assert main(["--baseline", str(tmp_path / "nothing"), "--current", base]) == 2
    assert "no finished runs" in capsys.readouterr().err
    tol = tmp_path / "tol.yaml"
    tol.write_text("pplx: {rel: 0.01}\n")
    assert main(["--baseline", base, "--current", base, "--tolerances", str(tol)]) == 2
    assert "unknown metric" in capsys.readouterr().err
    tol.write_text("ppl: {relative: 0.01}\n")
    assert main(["--baseline", base, "--current", base, "--tolerances", str(tol)]) == 2
    tol.write_text("ppl: {rel: 0.01}\n")
    assert main(["--baseline", base, "--current", base, "--tolerances", str(tol)]) == 0


def test_user_metric_rule_overrides_more_specific_default(tmp_path):
    rules = parse_tolerances({"ppl": {"rel": 0.01, "direction": "lower"}})
    assert status(compare(frame(runs()), frame(runs(ppl_awq=21.0 * 1.005)), rules), "awq", "ppl") == "ok"
    rules = parse_tolerances({"timing/*": {"ignore": True}})
    assert status(compare(frame(runs()), frame(runs(tps=10.0)), rules), "awq", "tokens_per_s") == "ignored"


def test_parse_tolerances_rejects_bad_direction():
    with pytest.raises(ValueError, match="direction"):
        parse_tolerances({"ppl": {"direction": "up"}})


def test_interval_aware_mode_passes_noise_and_fails_a_significant_change():
    def one(ppl: float, se: float):
        return [run_rows("q", "rtn", 4, 128, [("ppl", "wiki", "ppl", ppl, se)])]

    base = frame(one(20.0, 0.5))
    small, large = frame(one(20.5, 0.5)), frame(one(25.0, 0.5))  # 0.5 beyond the 1e-3 tolerance, but in the noise
    assert failed(compare(base, small))  # the exact gate: any change beyond tolerance fails
    diff = compare(base, small, noise_level=0.95)
    assert not failed(diff) and diff["note"].iloc[0] == "within noise"
    assert failed(compare(base, large, noise_level=0.95))  # |5.0| > 1.96 * sqrt(0.5^2 + 0.5^2)
    assert failed(compare(frame(one(20.0, None)), frame(one(20.5, None)), noise_level=0.95))  # no stderr: exact
