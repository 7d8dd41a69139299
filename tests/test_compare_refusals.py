"""analysis.compare on fabricated run directories (no model): A and B follow the order given, --level must lie in
(0, 1), runs of different models are refused (or compared without KLD under --allow-cross-model), and a set measured
on other tokens is refused with the reason."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.compare import main
from analysis.results import to_frame, write_run

BLOCKS, BLOCK_TOKENS, DOCS = 16, 256, 100
PRINTS = {"eval:wiki": "tok-wiki", "eval:code": "tok-code"}


def fake_run(root: Path, run_id: str, method: str, nll_shift: float, model: str = "m", model_print="mf01",
             prints: dict | None = None, blocks: int = BLOCKS) -> Path:
    """A finished run with per-block records of wiki and code (NLL and KLD raised by about nll_shift per token, with
    per-run noise so paired tests have spread) and per-document arc_easy correctness."""
    rng = np.random.default_rng(zlib.crc32(run_id.encode()))  # stable across processes
    tokens = np.full(blocks, BLOCK_TOKENS)
    records = []
    for task, base in (("wiki", np.log(20.0)), ("code", np.log(8.0))):
        noise = nll_shift + 0.005 * rng.standard_normal(blocks)
        nll = (base + 0.3 * np.sin(np.arange(blocks))) * tokens
        records.append(pd.DataFrame({"task": task, "window": np.arange(blocks) // 8, "block": np.arange(blocks) % 8,
                                     "tokens": tokens, "nll_sum": nll + noise * tokens, "base_nll_sum": nll,
                                     "kld_sum": np.abs(noise) * tokens}))
    correct = np.arange(DOCS) < int(DOCS * (0.6 - nll_shift))
    docs = pd.DataFrame({"task": "arc_easy", "doc_id": np.arange(DOCS), "acc": correct.astype(float),
                         "acc_norm": correct.astype(float)})
    row = dict(run_id=run_id, config_hash=run_id, model=model, method=method, bits=None if method == "fp" else 4,
               group_size=None if method == "fp" else 128, seed=0, model_fingerprint=model_print,
               data_fingerprint=json.dumps(PRINTS if prints is None else prints),
               started_at="2026-11-22T10:00:00+00:00", suite="ppl", task="wiki", metric="ppl", value=20.0)
    write_run(root / run_id, to_frame([row]), "{}\n", {"run_id": run_id},
              files={"blocks.parquet": pd.concat(records).to_parquet(index=False),
                     "docs.parquet": docs.to_parquet(index=False)})
    return root / run_id


def _pair_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(("A = ", "B = "))]


def test_explicit_runs_keep_the_order_given(tmp_path, capsys):
    # "a_rtn" sorts before "b_gptq": the order of the arguments, not of the paths, must decide A and B
    rtn = fake_run(tmp_path, "a_rtn", "rtn", 0.2)
    gptq = fake_run(tmp_path, "b_gptq", "gptq", 0.0)
    csv = tmp_path / "pair.csv"
    assert main([str(gptq), str(rtn), "--csv", str(csv)]) == 0
    assert _pair_lines(capsys.readouterr().out) == ["A = gptq w4 g128 (b_gptq)", "B = rtn w4 g128 (a_rtn)"]
    table = pd.read_csv(csv)
    assert set(table["A_run"]) == {"gptq w4 g128 (b_gptq)"}
    assert (table[table["kind"] == "ppl"]["verdict"] == "A better").all()  # gptq's NLL is lower on every block
    assert main([str(rtn), str(gptq)]) == 0
    assert _pair_lines(capsys.readouterr().out) == ["A = rtn w4 g128 (a_rtn)", "B = gptq w4 g128 (b_gptq)"]


def test_a_directory_of_runs_compares_every_pair_in_sorted_order(tmp_path, capsys):
    for run_id, method, shift in (("c_fp", "fp", 0.0), ("a_rtn", "rtn", 0.2), ("b_gptq", "gptq", 0.05)):
        fake_run(tmp_path / "sweep", run_id, method, shift)
    assert main([str(tmp_path / "sweep")]) == 0
    pairs = _pair_lines(capsys.readouterr().out)
    assert [line.split("(")[-1] for line in pairs] == ["a_rtn)", "b_gptq)", "a_rtn)", "c_fp)", "b_gptq)", "c_fp)"]


@pytest.mark.parametrize("level", ["95", "1", "0", "-0.5", "nan", "high"])
def test_level_outside_zero_one_is_a_usage_error(tmp_path, capsys, level):
    runs = [str(fake_run(tmp_path, run_id, "rtn", shift)) for run_id, shift in (("a", 0.1), ("b", 0.0))]
    with pytest.raises(SystemExit) as exit_:
        main([*runs, "--level", level])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--level" in err and "(0, 1)" in err and level in err


def test_a_level_inside_zero_one_names_its_interval(tmp_path, capsys):
    runs = [str(fake_run(tmp_path, run_id, "rtn", shift)) for run_id, shift in (("a", 0.1), ("b", 0.0))]
    assert main([*runs, "--level", "0.9"]) == 0
    assert "90% CI" in capsys.readouterr().out


def test_runs_of_different_models_are_refused(tmp_path, capsys):
    a = fake_run(tmp_path, "a", "rtn", 0.1, model="llama-a", model_print="fa" * 8)
    b = fake_run(tmp_path, "b", "rtn", 0.0, model="llama-b", model_print="fb" * 8)
    assert main([str(a), str(b)]) == 2
    refused = [line for line in capsys.readouterr().err.splitlines() if line.startswith("refused:")]
    assert len(refused) == 1  # one line for the pair, not one per set
    for text in ("llama-a", "llama-b", "fa" * 8, "fb" * 8, "--allow-cross-model"):
        assert text in refused[0]


@pytest.mark.parametrize("prints", [("", "mf01"), (None, "mf01"), (None, None)])
def test_a_run_without_a_model_fingerprint_counts_as_another_model(tmp_path, capsys, prints):
    a = fake_run(tmp_path, "a", "rtn", 0.1, model_print=prints[0])
    b = fake_run(tmp_path, "b", "rtn", 0.0, model_print=prints[1])
    assert main([str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "--allow-cross-model" in err


def test_allow_cross_model_compares_ppl_and_accuracy_but_no_kld(tmp_path, capsys):
    # same wiki tokens, other code tokens (another tokenizer, say): code is refused even across models
    other_code = dict(PRINTS, **{"eval:code": "tok-code-other"})
    a = fake_run(tmp_path, "a", "rtn", 0.1, model="llama-a", model_print="fa" * 8)
    b = fake_run(tmp_path, "b", "rtn", 0.0, model="llama-b", model_print="fb" * 8, prints=other_code)
    csv = tmp_path / "cross.csv"
    assert main([str(a), str(b), "--allow-cross-model", "--csv", str(csv)]) == 0
    out, err = capsys.readouterr()
    table = pd.read_csv(csv)
    assert set(table["kind"]) == {"ppl", "acc", "acc_norm"} and set(table["task"]) == {"wiki", "arc_easy"}
    assert "kld" not in out and "KLD not compared" in out and "llama-a" in out and "llama-b" in out
    assert "code: not the same tokens" in err


def test_other_tokens_are_refused_per_set_with_the_reason(tmp_path, capsys):
    a = fake_run(tmp_path, "a", "rtn", 0.1)
    b = fake_run(tmp_path, "b", "rtn", 0.0, prints=dict(PRINTS, **{"eval:code": "tok-code-other"}))
    no_print = fake_run(tmp_path, "c", "rtn", 0.0, prints={"eval:wiki": "tok-wiki"})
    short = fake_run(tmp_path, "d", "rtn", 0.0, blocks=BLOCKS // 2)
    assert main([str(a), str(b)]) == 0  # wiki and accuracy are still compared
    err = capsys.readouterr().err
    assert "code: not the same tokens: token fingerprint tok-code (A) vs tok-code-other (B)" in err
    assert main([str(a), str(no_print)]) == 0
    assert "code: not the same tokens: no token fingerprint recorded by B" in capsys.readouterr().err
    assert main([str(a), str(short)]) == 0
    assert f"wiki: not the same tokens: other windows/blocks ({BLOCKS} vs {BLOCKS // 2} blocks)" in \
        capsys.readouterr().err


def test_finding8_a_path_with_no_finished_run_is_an_error_naming_it(tmp_path, capsys):
    """A mistyped run path used to be dropped: A became the other run and rc was 0."""
    a = fake_run(tmp_path, "a", "rtn", 0.1)
    b = fake_run(tmp_path, "b", "gptq", 0.0)
    typo = tmp_path / "b-typo"
    assert main([str(a), str(typo), str(b)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and str(typo) in err and "no such run" in err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    assert main([str(a), str(unfinished)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and str(unfinished) in err and "no finished run" in err
    from analysis.draws import main as draws_main
    from analysis.report import main as report_main
    from analysis.robustness import main as robustness_main

    for command in (lambda: draws_main([str(a), "--vs", str(typo)]), lambda: robustness_main([str(typo)]),
                    lambda: report_main([str(a), str(typo), "--out", str(tmp_path / "report")])):
        assert command() == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(typo) in err


def test_finding9_one_run_prints_itself_beside_its_baseline(tmp_path, capsys):
    """README: 'A single run prints itself next to the baseline'; compare used to refuse one run."""
    run = fake_run(tmp_path, "a_rtn", "rtn", 0.1)
    csv = tmp_path / "one.csv"
    assert main([str(run), "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "A = rtn w4 g128 (a_rtn)" in out and "B = the unquantized model on the same tokens" in out
    table = pd.read_csv(csv).set_index(["kind", "task"])
    blocks = pd.read_parquet(run / "blocks.parquet")
    wiki = blocks[blocks.task == "wiki"]
    assert table.loc[("ppl", "wiki"), "ratio"] == pytest.approx(
        np.exp((wiki.nll_sum - wiki.base_nll_sum).sum() / wiki.tokens.sum()))
    assert table.loc[("kld", "wiki"), "A"] == pytest.approx(wiki.kld_sum.sum() / wiki.tokens.sum())
    assert table.loc[("kld", "wiki"), "B"] == 0 and table.loc[("ppl", "wiki"), "verdict"] == "B better"
    assert "acc" not in table.index.get_level_values("kind")  # a run keeps no baseline documents: said above
    assert "compare with a method=fp run for accuracy" in out
    blocks.drop(columns=["base_nll_sum", "kld_sum"]).to_parquet(tmp_path / "plain.parquet")
    plain = fake_run(tmp_path, "b_nokld", "rtn", 0.1)
    (plain / "blocks.parquet").unlink()
    pd.read_parquet(tmp_path / "plain.parquet").to_parquet(plain / "blocks.parquet")
    from analysis.results import update_done
    from analysis.integrity import file_sha256
    import json as json_

    done = json_.loads((plain / "DONE").read_text())
    update_done(plain, files={**done["files"], "blocks.parquet": file_sha256(plain / "blocks.parquet")})
    assert main([str(plain)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no baseline" in err and "eval.kld=true" in err


def test_finding12_a_metric_given_twice_is_refused(tmp_path, capsys):
    """--margin ppl=1% --margin ppl=20% used to keep the last silently."""
    runs = [str(fake_run(tmp_path, run_id, "rtn", shift)) for run_id, shift in (("a", 0.1), ("b", 0.0))]
    assert main([*runs, "--margin", "ppl=1%", "--margin", "ppl=20%"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "ppl=1%" in err and "ppl=20%" in err and "twice" in err
    assert main([*runs, "--margin", "acc=1pt", "--margin", "acc=0.02"]) == 2
    assert "twice" in capsys.readouterr().err
    assert main([*runs, "--margin", "ppl=1%", "--margin", "kld=0.01", "--margin", "acc=1pt"]) == 0
    from analysis.draws import main as draws_main

    assert draws_main([runs[0], "--vs", runs[1], "--target", "kld=0.01", "--target", "kld=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--target kld given twice" in err


def _read_off(row, margined: bool) -> str:
    """The verdict a cell's printed interval implies (the scale's no-difference point: 1 for a ratio, else 0)."""
    lo, hi = (np.log(row.ci_low), np.log(row.ci_high)) if row.kind == "ppl" else (row.ci_low, row.ci_high)
    margin = {"ppl": np.log1p(0.02), "kld": 0.004, "acc": 0.05, "acc_norm": 0.05}[row.kind]
    if margined and -margin < lo and hi < margin:
        return "equivalent within the margin"
    if lo > 0 or hi < 0:
        lower_better = row.kind in ("ppl", "kld")
        return "A better" if (hi < 0) == lower_better else "B better"
    return "inconclusive" if margined else "no significant difference"


@pytest.mark.parametrize("margins", [[], ["--margin", "ppl=2%", "--margin", "kld=0.004", "--margin", "acc=5pt"]])
def test_finding13_every_printed_interval_agrees_with_its_verdict(tmp_path, capsys, margins):
    """compare's verdicts were Holm-adjusted beside unadjusted 95% intervals, so an interval excluding 1 sat beside
    'no significant difference'. Now every printed interval is the family's simultaneous one and every verdict reads
    its own interval, for ppl ratios, KLD differences and McNemar-judged accuracy, with and without margins; the
    header names the family and its size."""
    for run_id, shift in (("a", 0.0), ("b", 0.003), ("c", 0.006), ("d", 0.012), ("e", 0.05)):
        fake_run(tmp_path / "runs", run_id, "rtn", shift)
    csv = tmp_path / "all.csv"
    assert main([str(tmp_path / "runs"), "--csv", str(csv), *margins]) == 0
    out = capsys.readouterr().out
    table = pd.read_csv(csv)
    m = len(table)
    assert m == 10 * 6 and f"Family: the {m} tests of this output (10 pairs" in out
    assert "simult. 95% CI" in out and f"each at {(1 - 0.05 / m) * 100:.4g}%" in out
    tested = table.dropna(subset=["ci_low"])
    assert len(tested) == m
    borderline = 0
    for row in tested.itertuples():
        implied = _read_off(row, bool(margins))
        assert row.verdict == implied, row
        assert (row.p_adj < 0.05) == (row.verdict in ("A better", "B better")) or implied.startswith("equivalent")
        borderline += (row.p < 0.05) != (row.p_adj < 0.05)  # significant alone, not in the family
    assert borderline > 0  # the fixture holds cells where the old output disagreed with itself
