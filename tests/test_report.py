"""Reports from synthetic finished runs: files, numbers, bold markers, robustness penalty, duplicates, CLI errors."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from harness.report import (latest_per_key, main, main_table, make_report, pareto_front, robustness_matrices,
                            robustness_penalty)
from harness.results import to_frame, write_run

MODEL = "smollm2_135m"
VERSIONS = json.dumps({"torch": "2.5.1", "transformers": "4.57.0"})


def run_rows(run_id: str, method: str, bits, group_size, observations, calib_source=None,
             started_at="2026-11-22T10:00:00+00:00") -> list[dict]:
    """Rows of one run: shared config/provenance + (suite, task, metric, value, stderr, detail) observations."""
    base = dict(run_id=run_id, config_hash=run_id, model=MODEL, method=method, bits=bits, group_size=group_size,
                symmetric=False if method != "fp" else None, calib_source=calib_source,
                calib_samples=128 if calib_source else None, calib_seqlen=512 if calib_source else None, seed=0,
                git_sha="abc1234", versions=VERSIONS, model_fingerprint="mf01", data_fingerprint="df01",
                device="cpu", started_at=started_at, wall_s=1.0, peak_mem_mb=100.0)
    return [dict(base, suite=s, task=t, metric=m, value=v, stderr=e, n=None, detail=d)
            for s, t, m, v, e, d in observations]


def ppl_obs(wiki: float, code: float, prose: float) -> list[tuple]:
    return [("ppl", "wiki", "ppl", wiki, None, None), ("ppl", "code", "ppl", code, None, None),
            ("ppl", "prose", "ppl", prose, None, None), ("ppl", "wiki", "tokens", 4096.0, None, None)]


def quant_obs(bpw: float) -> list[tuple]:
    return [("quant", "all", "storage_bits_per_weight", bpw, None, json.dumps({"params": 134_000_000})),
            ("quant", "all", "quant_wall_s", 12.5, None, None)]


def synthetic_runs() -> list[list[dict]]:
    """fp, rtn w4 g128, gptq w4 g128, awq w4 g128 x 3 calib sources, a timing run, and a re-run of rtn."""
    acc = lambda v: [("lm_eval", "arc_easy", "acc", v, 0.01, None)]  # noqa: E731
    return [
        run_rows("fp", "fp", None, None, ppl_obs(20.00, 8.00, 30.00) + acc(0.60)),
        run_rows("rtn_old", "rtn", 4, 128, ppl_obs(99.00, 9.90, 99.00) + acc(0.10) + quant_obs(4.25),
                 started_at="2026-11-22T09:00:00+00:00"),
        run_rows("rtn", "rtn", 4, 128, ppl_obs(22.00, 8.80, 33.00) + acc(0.55) + quant_obs(4.25)),
        run_rows("gptq", "gptq", 4, 128, ppl_obs(21.00, 8.60, 31.50) + acc(0.58) + quant_obs(4.25), "wiki"),
        run_rows("awq_wiki", "awq", 4, 128, ppl_obs(20.50, 8.70, 31.00) + acc(0.57) + quant_obs(4.25), "wiki"),
        run_rows("awq_code", "awq", 4, 128, ppl_obs(21.30, 8.30, 31.80), "code"),
        run_rows("awq_prose", "awq", 4, 128, ppl_obs(21.10, 8.90, 30.60), "prose"),
        run_rows("timing", "awq", 4, 128, [("timing", "decode_bs1", "tokens_per_s", 123.4, None, None),
                                           ("timing", "prefill_p512_bs1", "median_ms", 45.6, None, None)], "wiki"),
    ]


@pytest.fixture
def results_dir(tmp_path):
    root = tmp_path / "results"
    for rows in synthetic_runs():
        write_run(root / rows[0]["run_id"], to_frame(rows), "{}\n", {"run_id": rows[0]["run_id"]})
    return root


def test_report_files_and_numbers(results_dir, tmp_path):
    out = tmp_path / "report"
    assert main([str(results_dir), "--out", str(out)]) == 0
    md, tex = (out / "report.md").read_text(), (out / "report.tex").read_text()
    # fp reference alone; deltas vs fp; the best quantized wiki ppl (awq calibrated on wiki) bold in both formats.
    main_rows = [line for line in md.split("### ")[1].splitlines() if line.startswith("| ") and "---" not in line]
    assert len(main_rows) == 1 + 6  # header + fp, rtn, gptq and awq calibrated on 3 sources; no empty rows
    assert main_rows[1].startswith("| fp | — | — | — | 8.00 | 30.00 | 20.00 | 60.00 |")
    assert "22.00 (+2.00)" in md
    assert "**20.50 (+0.50)**" in md and r"\textbf{20.50 (+0.50)}" in tex
    # accuracy in percent, best quantized (gptq 58.0) bold, fp not a candidate for bold.
    assert "**58.00 (-2.00)**" in md and "**60.00**" not in md
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"smollm2\_135m" in tex
    assert "not a true full-precision model" in md and "not a true full-precision model" in tex
    for stem in ("ppl_vs_bits_smollm2_135m", "size_vs_ppl_smollm2_135m", "timing_smollm2_135m"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.pdf").stat().st_size > 0
    assert "123.4" in md and "decode_bs1" in md
    assert "abc1234" in md and "torch 2.5.1" in md and "wiki: 128 samples x 512 tokens" in md


def test_duplicates_latest_wins_and_reported(results_dir, tmp_path):
    out = tmp_path / "report"
    make_report(pd.read_parquet(results_dir / "rtn" / "rows.parquet").pipe(
        lambda f: pd.concat([f, pd.read_parquet(results_dir / "rtn_old" / "rows.parquet")])), out, plots=False)
    md = (out / "report.md").read_text()
    assert "22.00" in md and "99.00" not in md
    assert "rtn_old" in md and "superseded" in md


def test_latest_per_key_is_order_independent():
    runs = synthetic_runs()
    a = to_frame(runs[1] + runs[2])
    b = to_frame(runs[2] + runs[1])
    kept_a, dropped_a = latest_per_key(a)
    kept_b, _ = latest_per_key(b)
    assert set(kept_a["run_id"]) == {"rtn"} and set(dropped_a["run_id"]) == {"rtn_old"}
    assert kept_a.sort_values(["task", "metric"])["value"].tolist() == kept_b.sort_values(["task", "metric"])["value"].tolist()


def test_robustness_penalty():
    frame, _ = latest_per_key(to_frame([r for rows in synthetic_runs() for r in rows]))
    matrices = robustness_matrices(frame)
    assert len(matrices) == 1  # only awq has several calibration sources
    label, matrix = matrices[0]
    assert label.startswith("awq w4 g128")
    penalty = robustness_penalty(matrix)
    assert penalty.loc["code", "wiki"] == pytest.approx(21.30 - 20.50)
    assert penalty.loc["wiki", "code"] == pytest.approx(8.70 - 8.30)
    assert penalty.loc["wiki", "prose"] == pytest.approx(31.00 - 30.60)
    assert penalty.loc["prose", "prose"] == 0.0


def test_robustness_section_in_report(results_dir, tmp_path):
    make_report(pd.concat([pd.read_parquet(p) for p in results_dir.rglob("rows.parquet")]), tmp_path,
                plots=False)
    md = (tmp_path / "report.md").read_text()
    assert "calibration robustness of awq w4 g128" in md
    assert "| code | 21.30 (+0.80) | **8.30** |" in md


def test_main_table_without_reference_has_no_deltas():
    runs = synthetic_runs()
    text, bold = main_table(to_frame(runs[2] + runs[3]))
    assert "22.00" in text.to_string() and "(+" not in text.to_string()
    # Without fp every row is a candidate: gptq is best on all three ppl sets and on accuracy.
    assert bold.to_numpy().sum() == 4


def test_pareto_front():
    points = pd.DataFrame({"size": [4.0, 4.0, 3.0, 8.0, 2.0], "value": [10.0, 9.0, 12.0, 9.5, 20.0]})
    assert pareto_front(points, "size", "value").values.tolist() == [[2.0, 20.0], [3.0, 12.0], [4.0, 9.0]]


def test_cli_errors_on_empty_dir(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_main_calib_restricts_main_table(results_dir, tmp_path):
    out = tmp_path / "report"
    assert main([str(results_dir), "--out", str(out), "--main-calib", "wiki", "--no-plots"]) == 0
    main_section = (out / "report.md").read_text().split("### ")[1]
    assert "21.30" not in main_section and "**20.50 (+0.50)**" in main_section and "22.00 (+2.00)" in main_section
    assert not list(out.glob("*.png"))
