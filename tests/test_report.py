"""Reports from synthetic finished runs: files, numbers, bold markers, robustness penalty, duplicates, CLI errors;
intervals, paired significance (bold set, wins/ties/losses), KLD columns and plot, and a LaTeX compile."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from analysis import stats
from analysis.report import (PairedEvidence, latest_per_key, main, main_table, make_report, not_worse_than_best,
                            pareto_front, robustness_matrices, robustness_penalty, run_directories, wins_table)
from analysis.results import to_frame, write_run

MODEL = "smollm2_135m"
VERSIONS = json.dumps({"torch": "2.5.1", "transformers": "4.57.0"})


# Runs of one run hash (config_hash: everything that changes the numbers): a re-run, and timing rows of the awq run.
SAME_HASH = {"rtn_old": "rtn", "timing": "awq_wiki"}


def run_rows(run_id: str, method: str, bits, group_size, observations, calib_source=None,
             started_at="2026-11-22T10:00:00+00:00") -> list[dict]:
    """Rows of one run: shared config/provenance + (suite, task, metric, value, stderr, detail) observations."""
    base = dict(run_id=run_id, config_hash=SAME_HASH.get(run_id, run_id), model=MODEL, method=method, bits=bits, group_size=group_size,
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
    assert "no finished run" in capsys.readouterr().err


def test_a_missing_speed_csv_is_refused_in_one_line(results_dir, tmp_path, capsys):
    assert main([str(results_dir), "--out", str(tmp_path / "o"), "--speed", str(tmp_path / "speed.csv")]) == 2
    assert f"--speed {tmp_path / 'speed.csv'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_main_calib_restricts_main_table(results_dir, tmp_path):
    out = tmp_path / "report"
    assert main([str(results_dir), "--out", str(out), "--main-calib", "wiki", "--no-plots"]) == 0
    main_section = (out / "report.md").read_text().split("### ")[1]
    assert "21.30" not in main_section and "**20.50 (+0.50)**" in main_section and "22.00 (+2.00)" in main_section
    assert not list(out.glob("*.png"))


# ---------------------------------------------------------------------------------------------
# Intervals, paired significance, wins/ties/losses, KLD, LaTeX (runs with blocks.parquet / docs.parquet)
# ---------------------------------------------------------------------------------------------

PRINTS = json.dumps({"eval:wiki": "tok-wiki", "eval:code": "tok-code"}, sort_keys=True)
BLOCKS, BLOCK_TOKENS, DOCS = 16, 256, 200
SETS = {"wiki": np.log(20.0), "code": np.log(8.0)}
ALT = np.where(np.arange(BLOCKS) % 2 == 0, 1.0, -0.8)  # a zig-zag with a tiny mean: never significant


def paired_run(run_id: str, method: str, bits, group_size, nll_shift, kld, correct: np.ndarray,
               root) -> None:
    """A run with rows computed from its own blocks and documents (ppl, KLD, acc, all with intervals)."""
    tokens = np.full(BLOCKS, BLOCK_TOKENS)
    records, obs = [], []
    for task, base in SETS.items():
        wiggle = 0.3 * np.sin(np.arange(BLOCKS))  # blocks differ a lot; pairs differ little
        nll = (base + wiggle + nll_shift) * tokens
        kld_sum = np.asarray(kld, float) * tokens
        records.append(pd.DataFrame({"task": task, "window": np.arange(BLOCKS) // 8, "block": np.arange(BLOCKS) % 8,
                                     "tokens": tokens, "nll_sum": nll, "base_nll_sum": (base + wiggle) * tokens,
                                     "kld_sum": kld_sum}))
        for metric, est in (("ppl", stats.perplexity(nll, tokens)), ("kld", stats.ratio_of_sums(kld_sum, tokens))):
            obs.append(("ppl", task, metric, est))
    acc = stats.proportion(int(correct.sum()), DOCS)
    rows = run_rows(run_id, method, bits, group_size, [])
    base = {k: v for k, v in rows_base(run_id, method, bits, group_size).items()}
    rows = [dict(base, suite=s, task=t, metric=m, **e.columns(), n=e.n, detail=None) for s, t, m, e in obs]
    rows.append(dict(base, suite="lm_eval", task="arc_easy", metric="acc", **acc.columns(), n=DOCS, detail=None))
    docs = pd.DataFrame({"task": "arc_easy", "doc_id": np.arange(DOCS), "acc": correct.astype(float),
                         "acc_norm": correct.astype(float)})
    write_run(root / run_id, to_frame(rows), "{}\n", {"run_id": run_id},
              files={"blocks.parquet": pd.concat(records).to_parquet(index=False),
                     "docs.parquet": docs.to_parquet(index=False)})


def rows_base(run_id, method, bits, group_size) -> dict:
    row = run_rows(run_id, method, bits, group_size, [("ppl", "wiki", "ppl", 0.0, None, None)])[0]
    row["data_fingerprint"] = PRINTS
    return {k: v for k, v in row.items() if k not in ("suite", "task", "metric", "value", "stderr", "n", "detail")}


def correct_first(k: int, flips: tuple = ()) -> np.ndarray:
    out = np.arange(DOCS) < k
    out[list(flips)] = ~out[list(flips)]
    return out


@pytest.fixture
def paired_dir(tmp_path):
    """fp; gptq clearly better than rtn on every block and document; awq tied with gptq; two old runs (rows only):
    rtn w3 far worse with intervals, rtn w4 per-channel close with a wide interval."""
    root = tmp_path / "paired"
    k = 0.02 + 0.005 * np.cos(np.arange(BLOCKS))
    paired_run("fp", "fp", None, None, 0.0, np.zeros(BLOCKS), correct_first(121), root)
    paired_run("gptq", "gptq", 4, 128, 0.02, k, correct_first(120), root)
    paired_run("awq", "awq", 4, 128, 0.02 + 0.01 * ALT, k + 0.001 * ALT, correct_first(120, (0, 1, 2, 150, 151)), root)
    paired_run("rtn", "rtn", 4, 128, 0.12 + 0.01 * np.cos(np.arange(BLOCKS)), 5 * k, correct_first(80), root)
    old = [("rtn3", 3, 128, 40.0, 39.0, 41.0), ("rtnpc", 4, None, 21.5, 19.5, 23.5)]
    for run_id, bits, group, value, low, high in old:
        rows = [dict(rows_base(run_id, "rtn", bits, group), data_fingerprint="df01", suite="ppl", task="wiki",
                     metric="ppl", value=value, stderr=0.5, ci_low=low, ci_high=high, n=4096, detail=None)]
        write_run(root / run_id, to_frame(rows), "{}\n", {"run_id": run_id})
    return root


def _main_section(md: str) -> str:
    return md.split("### ")[1]


def _row(section: str, prefix: str) -> list[str]:
    line = next(line for line in section.splitlines() if line.startswith(prefix))
    return [c.strip() for c in line.strip("|").split("|")]


def test_main_table_intervals_kld_columns_and_paired_bold(paired_dir, tmp_path):
    out = tmp_path / "report"
    assert main([str(paired_dir), "--out", str(out)]) == 0
    md, tex = (out / "report.md").read_text(), (out / "report.tex").read_text()
    section = _main_section(md)
    header = _row(section, "| Method")
    assert header[3:] == ["PPL code", "PPL wiki", "KLD code", "KLD wiki", "arc_easy acc (%)"]
    # (1) value [ci_low, ci_high] (delta vs fp), from the rows' own intervals; the compact form in LaTeX
    rows = pd.read_parquet(paired_dir / "gptq" / "rows.parquet")
    ppl = rows[(rows.task == "wiki") & (rows.metric == "ppl")].iloc[0]
    fp_ppl = pd.read_parquet(paired_dir / "fp" / "rows.parquet").query("task == 'wiki' and metric == 'ppl'").value.iloc[0]
    cell = f"{ppl.value:.2f} [{ppl.ci_low:.2f}, {ppl.ci_high:.2f}] ({ppl.value - fp_ppl:+.2f})"
    assert f"**{cell}**" in section
    assert rf"{ppl.value:.2f}$^{{+{ppl.ci_high - ppl.value:.2f}}}_{{-{ppl.value - ppl.ci_low:.2f}}}$" in tex
    assert "40.00 [39.00, 41.00]" in section
    assert rf"\textbf{{\boldmath {ppl.value:.2f}$^{{+" in tex  # the interval is bold along with its value
    # (2) bold: gptq (best) and awq (tied) everywhere; rtn w4 g128 significantly worse everywhere
    gptq, awq, rtn = (_row(section, f"| {m} | 4 | 128 |") for m in ("gptq", "awq", "rtn"))
    assert all(c.startswith("**") for c in gptq[3:]) and all(c.startswith("**") for c in awq[3:])
    assert not any(c.startswith("**") for c in rtn[3:])
    # KLD: 4 decimals, no delta vs fp
    assert gptq[5].startswith("**0.0") and "(" not in gptq[5]
    # old runs without records: non-overlapping intervals drop rtn w3, the overlapping rtn w4 per-channel stays bold
    assert not _row(section, "| rtn | 3 | 128 |")[4].startswith("**")
    assert _row(section, "| rtn | 4 | per-channel |")[4].startswith("**21.50 [19.50, 23.50]")
    assert "paired t-test over blocks of tokens" in section and "McNemar" in section and "Holm" in section
    assert "PPL wiki (2)" in section  # two configs compared with the best by intervals only
    assert (out / "kld_vs_bits_smollm2_135m.png").stat().st_size > 0
    assert (out / "kld_vs_bits_smollm2_135m.pdf").stat().st_size > 0


def test_wins_ties_losses_matrix(paired_dir, tmp_path):
    out = tmp_path / "report"
    assert main([str(paired_dir), "--out", str(out), "--no-plots"]) == 0
    md, tex = (out / "report.md").read_text(), (out / "report.tex").read_text()
    section = md.split("### ")[2]
    assert section.startswith("smollm2_135m: wins/ties/losses")
    header = _row(section, "| config")
    names = [_row(section, f"| ({i})")[0] for i in range(1, len(header) - 1)]
    assert names == ["(1) fp", "(2) awq w4 g128", "(3) gptq w4 g128", "(4) rtn w4 g128", "(5) rtn w4 per-channel",
                     "(6) rtn w3 g128"]
    gptq, awq, rtn, fp = (_row(section, f"| ({i})") for i in (3, 2, 4, 1))
    # 2 ppl sets + 2 KLD sets + 1 accuracy task, all on identical tokens/documents
    assert gptq[4] == "5/0/0" and rtn[3] == "0/0/5"
    assert gptq[2] == "0/5/0" and awq[3] == "0/5/0"
    assert gptq[7] == "5/6/2" and rtn[7] == "0/0/13"  # totals over the row
    # against fp: no KLD cells; fp's ppl is lower; accuracy 121 vs 120 of 200 (1 discordant document) is a tie
    assert fp[3] == "2/1/0" and gptq[1] == "0/1/2"
    assert fp[4] == "3/0/0"
    # runs kept without records are compared with nothing
    assert _row(section, "| (6)")[1:8] == ["—"] * 7
    assert "Holm" in section and "tests" in section
    assert r"wins/ties/losses" in tex and "5/0/0" in tex


def test_not_worse_than_best_fallbacks():
    values, lo, hi = [10.0, 11.0, 12.0, 10.5], [9.8, 10.9, 11.5, np.nan], [10.2, 11.1, 12.5, np.nan]
    decision = not_worse_than_best(values, lo, hi, ["a", "b", "c", "d"], [True] * 4, False, "ppl", "wiki",
                                   PairedEvidence())
    # no records: b's interval lies above a's (dropped); c's too; d has none -> only the best
    assert decision.bold.tolist() == [True, False, False, False]
    assert (decision.paired, decision.intervals, decision.best_only) == (0, 2, 1)
    wide = not_worse_than_best(values, [9.0, 10.0, 11.5, 9.0], [11.0, 12.0, 12.5, 12.0], ["a", "b", "c", "d"],
                               [True] * 4, False, "ppl", "wiki", None)
    assert wide.bold.tolist() == [True, True, False, True]
    higher = not_worse_than_best(values, lo, hi, list("abcd"), [False, True, True, True], True, "acc", "x", None)
    assert higher.bold.tolist() == [False, False, True, False]


def test_paired_evidence_reads_records(paired_dir):
    evidence = PairedEvidence(run_directories(paired_dir))
    p, delta = evidence.cell("gptq", "rtn", "ppl", "wiki")
    assert p < 1e-6 and delta < 0
    p_rev, delta_rev = evidence.cell("rtn", "gptq", "ppl", "wiki")
    assert p_rev == p and delta_rev == -delta
    assert evidence.cell("gptq", "rtn3", "ppl", "wiki") is None  # old run: rows only
    assert evidence.cell("gptq", "awq", "acc", "arc_easy")[0] == pytest.approx(1.0)


def test_wins_table_needs_paired_records(results_dir):
    frame, _ = latest_per_key(pd.concat([pd.read_parquet(p) for p in results_dir.rglob("rows.parquet")]))
    table = wins_table(frame, "acc", PairedEvidence(run_directories(results_dir)))
    assert table.text.empty and table.note == ""


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_report_tex_compiles(paired_dir, results_dir, tmp_path):
    for source in (paired_dir, results_dir):
        out = tmp_path / source.name
        assert main([str(source), "--out", str(out)]) == 0
        done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "report.tex"], cwd=out,
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stdout[-3000:]
        assert (out / "report.pdf").stat().st_size > 0


def two_models_named_hf() -> list[list[dict]]:
    """fp and rtn of two different models that both carry the generic name 'hf' (model=hf before a name was derived
    from model.path); the second model's runs started later, so it would supersede the first by key alone."""
    runs = []
    for model_print, scale, started in (("aaaaaaaa1111", 1.0, "2026-11-22T10:00:00+00:00"),
                                        ("bbbbbbbb2222", 2.0, "2026-11-22T11:00:00+00:00")):
        for method, bits, group, ppl in (("fp", None, None, 20.0), ("rtn", 4, 128, 22.0)):
            rows = run_rows(f"{method}_{model_print[0]}", method, bits, group,
                            ppl_obs(ppl * scale, 8.0 * scale, 30.0 * scale), started_at=started)
            runs.append([dict(r, model="hf", model_fingerprint=model_print) for r in rows])
    return runs


def test_latest_per_key_never_supersedes_another_model():
    kept, dropped = latest_per_key(to_frame([r for rows in two_models_named_hf() for r in rows]))
    assert dropped.empty and set(kept["run_id"]) == {"fp_a", "rtn_a", "fp_b", "rtn_b"}


def test_report_keeps_two_models_sharing_a_name_apart(tmp_path, capsys):
    root, out = tmp_path / "results", tmp_path / "report"
    for rows in two_models_named_hf():
        write_run(root / rows[0]["run_id"], to_frame(rows), "{}\n", {"run_id": rows[0]["run_id"]})
    assert main([str(root), "--out", str(out)]) == 0
    md, err = (out / "report.md").read_text(), capsys.readouterr().err
    sections = {s.split("\n")[0]: s for s in md.split("\n## ")[1:]}
    assert sorted(sections) == ["hf (aaaaaaaa)", "hf (bbbbbbbb)"]
    assert "| fp | — | — | 8.00 | 30.00 | 20.00 |" in sections["hf (aaaaaaaa)"]
    assert "| fp | — | — | 16.00 | 60.00 | 40.00 |" in sections["hf (bbbbbbbb)"]
    assert "superseded" not in md + err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and all(t in warning[0] for t in ("'hf'", "aaaaaaaa1111", "bbbbbbbb2222", "model.name"))
    assert (out / "ppl_vs_bits_hf__aaaaaaaa_.png").exists() and (out / "ppl_vs_bits_hf__bbbbbbbb_.png").exists()


def test_a_normal_sweep_is_one_model(results_dir, tmp_path, capsys):
    # fp and every quantized run share the fingerprint of the unquantized weights: one section, no warning
    out = tmp_path / "report"
    assert main([str(results_dir), "--out", str(out), "--no-plots"]) == 0
    assert (out / "report.md").read_text().count("\n## ") == 1 and "warning:" not in capsys.readouterr().err


@pytest.mark.parametrize("path, name", [
    ("HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB--SmolLM2-360M"), ("gpt2", "gpt2"),
    ("/models/Llama 3 8B/", "Llama_3_8B"), ("./checkpoints/run-1/step_100", "step_100"),
])
def test_hf_model_without_a_name_is_named_by_its_path(path, name):
    from harness.config import ModelConfig

    assert ModelConfig(name="hf", source="hf", path=path).name == name
    assert ModelConfig(name="mine", source="hf", path=path).name == "mine"  # an explicit model.name is kept


def test_hf_model_name_from_a_local_directory_and_from_the_cli(tmp_path, monkeypatch):
    from harness.config import ModelConfig
    from test_config import make_config

    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    assert ModelConfig(name="hf", source="hf", path=".").name == tmp_path.name
    assert ModelConfig(name="hf", source="hf", path="ckpt").name == "ckpt"
    assert make_config("model=hf", "model.path=org/some.model").model.name == "org--some.model"
    assert make_config("model=hf", "model.path=org/some.model", "model.name=x").model.name == "x"


def test_kld_against_stored_bits_marks_the_pareto_front(tmp_path):
    """Every method and format at the bits per weight it stores: the front keeps the configs no other beats on both."""
    from analysis.report.plots import plot_kld_vs_storage_bits

    def kld(value, low, high):
        return [("ppl", "wiki", "kld", value, None, None)]

    rows = []
    for run_id, method, bits, bpw, value in (("a", "rtn", 4, 4.25, 0.09), ("b", "gptq", 4, 4.25, 0.05),
                                             ("c", "ckpt:gguf-Q4_0", 4, 4.5, 0.07), ("d", "rtn", 3, 3.25, 0.30)):
        rows += run_rows(run_id, method, bits, 128 if bits != 4 or bpw != 4.5 else 32,
                         kld(value, value * 0.9, value * 1.1) + quant_obs(bpw))
    frame = to_frame(rows).assign(ci_low=lambda f: f["value"] * 0.9, ci_high=lambda f: f["value"] * 1.1)
    paths = plot_kld_vs_storage_bits(frame, tmp_path)
    assert [p.name for p in paths] == ["kld_vs_bpw_smollm2_135m.png", "kld_vs_bpw_smollm2_135m.pdf"]
    from analysis.report.plots import pareto_front

    points = pd.DataFrame({"bpw": [4.25, 4.25, 4.5, 3.25], "kld": [0.09, 0.05, 0.07, 0.30]})
    assert pareto_front(points, "bpw", "kld")["kld"].tolist() == [0.30, 0.05]  # Q4_0 costs more bits for more KLD


def test_the_speed_table_joins_each_checkpoint_to_its_kld_and_leaves_out_those_without_a_runtime(tmp_path):
    """benchmarks/bench_runtimes.py's CSV beside the KLD rows: one line per timed checkpoint (decode speed, its
    runtime's baseline, the fraction of the bandwidth bound, KLD per set); 'no CPU runtime' rows are left out, and the
    KLD-vs-decode plot is drawn."""
    from analysis.report.plots import plot_kld_vs_decode
    from analysis.report.render import speed_section

    rows = [{"suite": "ppl", "metric": "kld", "method": m, "task": t, "value": v, "ci_low": v * 0.9,
             "ci_high": v * 1.1, "model": "tiny"}
            for m, v in (("ckpt:bnb-nf4", 0.2), ("ckpt:hqq-w4g64", 0.1), ("ckpt:mlx-w4g64", 0.15), ("fp", 0.0))
            for t in ("wiki", "code")]
    speed = pd.concat([  # two runs of the benchmark: a slow runtime timed apart on shorter lengths
        pd.DataFrame([{"label": "bnb-nf4", "runtime": "transformers (bnb venv)", "decode_tps": 10.0,
                       "base_decode_tps": 20.0, "bound_tps": 40.0, "prompt": 128, "decode": 32},
                      {"label": "hqq-w4g64", "runtime": "no CPU runtime", "decode_tps": None,
                       "base_decode_tps": None, "bound_tps": 50.0, "prompt": 128, "decode": 32}]),
        pd.DataFrame([{"label": "mlx-w4g64", "runtime": "mlx (mlx venv)", "decode_tps": 0.2,
                       "base_decode_tps": 6.0, "bound_tps": 40.0, "prompt": 16, "decode": 4}])])
    lines = speed_section(pd.DataFrame(rows), speed)
    body = [line for line in lines if line.startswith("| ckpt:")]
    assert body == ["| ckpt:bnb-nf4 | transformers (bnb venv) | 128 + 32 | 10 / 20 | 0.25 | 0.200 | 0.200 |",
                    "| ckpt:mlx-w4g64 | mlx (mlx venv) | 16 + 4 | 0.2 / 6 | 0.005 | 0.150 | 0.150 |"]
    assert [p.suffix for p in plot_kld_vs_decode(pd.DataFrame(rows), speed, tmp_path)] == [".png", ".pdf"]


def test_finding10_an_export_run_is_not_a_duplicate_of_the_run_without_export(tmp_path, capsys):
    """Two gptq w4 g128 runs that differ in export=gptq (fp16 scales: other numbers) have other run hashes; the
    report used to keep the later and list the other as a superseded duplicate. Both stay, each named by what sets
    it apart in its recorded result key; a re-run of one hash is still superseded."""
    root = tmp_path / "results"
    key = {"model": {"name": MODEL}, "method": {"name": "gptq", "damp": 0.01}, "spec": {"bits": 4, "group_size": 128},
           "eval": {"seqlen": 2048, "max_windows": 4}}
    for run_id, export, ppl, started in (("plain", None, 17.87, "2026-12-07T10:00:00+00:00"),
                                         ("exported", "gptq", 17.90, "2026-12-07T09:00:00+00:00"),
                                         ("plain_rerun", None, 17.87, "2026-12-07T11:00:00+00:00")):
        rows = run_rows(run_id, "gptq", 4, 128, [("ppl", "wiki", "ppl", ppl, None, None)] + quant_obs(4.17),
                        "wiki", started_at=started)
        rows = [dict(r, config_hash="hash-export" if export else "hash-plain") for r in rows]
        result_key = dict(key, **({"export": export} if export else {}))
        write_run(root / run_id, to_frame(rows), "{}\n", {"run_id": run_id, "result_key": result_key})
    out = tmp_path / "report"
    assert main([str(root), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    section = md.split("### ")[1]
    assert "| gptq | 4 | 128 | export=gptq | 17.90 |" in section and "| gptq | 4 | 128 | — | **17.87** |" in section
    assert "gptq w4 g128 export=gptq" in md  # the quantization-cost table names it too
    assert "superseded" in md and "plain (gptq" in md and "exported (gptq" not in md  # only the re-run's old run
    assert "3 duplicate rows superseded" in capsys.readouterr().err  # the first plain run's 3 rows


def test_finding13_the_report_names_the_family_of_each_adjustment(paired_dir, tmp_path):
    """The bold set and the wins matrix are Holm-adjusted: their headers say over which family, and the main table
    says its intervals are each config's own (unadjusted), not what decides bold."""
    out = tmp_path / "report"
    assert main([str(paired_dir), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    main_section, wins_section = md.split("### ")[1], md.split("### ")[2]
    assert "Holm's correction within each column" in main_section.splitlines()[0]
    assert "Family: the comparisons with the best of one column (one family per column" in main_section
    assert "each config's own 95% interval" in main_section and "not what decides bold" in main_section
    assert "Holm's correction over every test of the matrix" in wins_section.splitlines()[0]
    assert "Family: all" in wins_section and "tests of the matrix" in wins_section
