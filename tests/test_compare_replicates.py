"""analysis.compare with replicate calibration draws, on fabricated run directories (no model): runs that differ
only in calib.seed are grouped into one configuration, the interval includes the draw's noise, per-draw wins are
counted, and --margin gives TOST equivalence verdicts."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.compare import main
from analysis.results import to_frame, write_run

BLOCKS, BLOCK_TOKENS = 16, 256
PRINTS = {"eval:wiki": "tok-wiki"}


def draw_run(root: Path, method: str, seed: int | None, shift: float, draw_effect: float = 0.0,
             started: str = "2026-12-01T10:00:00+00:00", name: str | None = None) -> Path:
    """A finished run of `method` (calibration draw `seed`; None: no calibration) whose NLL per token is the shared
    text's plus `shift` plus this draw's effect plus small per-block noise."""
    run_id = name or f"{method}-{seed}"
    rng = np.random.default_rng(zlib.crc32(run_id.encode()))
    tokens = np.full(BLOCKS, BLOCK_TOKENS)
    text = np.log(20.0) + 0.3 * np.sin(np.arange(BLOCKS))
    nll = (text + shift + draw_effect + 0.002 * rng.standard_normal(BLOCKS)) * tokens
    blocks = pd.DataFrame({"task": "wiki", "window": np.arange(BLOCKS) // 8, "block": np.arange(BLOCKS) % 8,
                           "tokens": tokens, "nll_sum": nll, "base_nll_sum": text * tokens,
                           "kld_sum": np.abs(shift + draw_effect + 0.01) * tokens})
    calib = seed is not None
    row = dict(run_id=run_id, config_hash=run_id, model="m", method=method, bits=3, group_size=128,
               calib_source="wiki" if calib else None, calib_samples=8 if calib else None,
               calib_seqlen=512 if calib else None, calib_seed=seed, seed=0, replicate_of=f"cfg-{method}",
               model_fingerprint="mf01", data_fingerprint=json.dumps(PRINTS), started_at=started,
               suite="ppl", task="wiki", metric="ppl", value=20.0)
    write_run(root / run_id, to_frame([row]), "{}\n", {"run_id": run_id},
              files={"blocks.parquet": blocks.to_parquet(index=False)})
    return root / run_id


def table_of(args: list[str], tmp_path: Path) -> pd.DataFrame:
    csv = tmp_path / "out.csv"
    assert main([*args, "--csv", str(csv)]) == 0
    return pd.read_csv(csv)


def test_draws_of_one_configuration_are_grouped_and_their_noise_widens_the_interval(tmp_path, capsys):
    # A is better than B by 0.02 nats on every draw's own tokens, but the draws move each side by +-0.1: one draw
    # each says "A better", five draws each cannot separate them
    effects = [0.1, -0.1, 0.05, -0.08, 0.12]
    for seed, effect in enumerate(effects):
        draw_run(tmp_path / "sweep", "awq", seed, 0.0, effect)
        draw_run(tmp_path / "sweep", "gptq", seed, 0.02, effects[::-1][seed])
    one = table_of([str(tmp_path / "sweep" / "awq-0"), str(tmp_path / "sweep" / "gptq-1")], tmp_path)
    out = capsys.readouterr().out
    assert one.loc[one.kind == "ppl", "verdict"].item() == "B better"  # one draw: conditional on it
    assert "† conditional on one calibration draw" in out
    both = table_of([str(tmp_path / "sweep")], tmp_path)
    out = capsys.readouterr().out
    ppl = both[both.kind == "ppl"].iloc[0]
    assert ppl["draws"] == "5 vs 5" and ppl["verdict"] == "no significant difference"
    assert ppl["draw_share"] > 0.9
    assert ppl["ci_high"] - ppl["ci_low"] > 5 * (one.loc[one.kind == "ppl", "ci_high"].item()
                                                 - one.loc[one.kind == "ppl", "ci_low"].item())
    assert "awq w3 g128 calib wiki 8x512 (5 draws, seeds 0-4)" in out and "†" not in out
    # per draw, paired by seed: awq's draw effect against gptq's plus 0.02 decides each draw (equal on seeds 3, 4)
    assert ppl["per_draw"] == "3/2/0"


def test_consistent_draws_resolve_the_difference(tmp_path):
    for seed in range(3):
        draw_run(tmp_path, "awq", seed, 0.0, 0.001 * seed)
        draw_run(tmp_path, "gptq", seed, 0.05, -0.001 * seed)
    ppl = table_of([str(tmp_path)], tmp_path).query("kind == 'ppl'").iloc[0]
    assert ppl["verdict"] == "A better" and ppl["per_draw"] == "3/0/0"
    assert ppl["ci_high"] < 1 and ppl["ratio"] == pytest.approx(np.exp(-0.05), rel=2e-3)


def test_a_repeated_draw_keeps_the_later_run(tmp_path):
    for seed in range(3):
        draw_run(tmp_path, "gptq", seed, 0.05)
    draw_run(tmp_path, "awq", 0, 0.0)
    draw_run(tmp_path, "awq", 0, 0.5, started="2026-12-02T10:00:00+00:00", name="awq-0-again")
    ppl = table_of([str(tmp_path)], tmp_path).query("kind == 'ppl'").iloc[0]
    assert ppl["draws"] == "1 vs 3" and "awq-0-again" in ppl["A_run"] + ppl["B_run"]


def test_the_baseline_has_no_draw_noise(tmp_path):
    """A quantized configuration with draws against fp (which does not calibrate): only A's draws add variance."""
    for seed, effect in enumerate([0.001, -0.001, 0.0005]):
        draw_run(tmp_path, "awq", seed, 0.002, effect)
    draw_run(tmp_path, "fp", None, 0.0)
    ppl = table_of([str(tmp_path / "awq-0"), str(tmp_path / "awq-1"), str(tmp_path / "awq-2"),
                    str(tmp_path / "fp-None"), "--margin", "ppl=1%"], tmp_path).query("kind == 'ppl'").iloc[0]
    assert ppl["draws"] == "3 vs 1" and not ppl["conditional"]
    assert ppl["verdict"] == "equivalent within the margin"


@pytest.mark.parametrize("margin, verdict", [("ppl=5%", "equivalent within the margin"),
                                             ("ppl=0.01%", "inconclusive")])
def test_margins_give_equivalence_or_inconclusive(tmp_path, margin, verdict):
    for seed, effect in enumerate([0.01, -0.01, 0.005, -0.004]):
        draw_run(tmp_path, "awq", seed, 0.0, effect)
        draw_run(tmp_path, "gptq", seed, 0.0, -effect)
    ppl = table_of([str(tmp_path), "--margin", margin], tmp_path).query("kind == 'ppl'").iloc[0]
    assert ppl["verdict"] == verdict


@pytest.mark.parametrize("margin", ["ppl=1", "ppl=-1%", "kld=abc", "acc=150pt", "speed=1%", "ppl"])
def test_a_bad_margin_is_a_usage_error_naming_the_allowed_forms(tmp_path, capsys, margin):
    draw_run(tmp_path, "awq", 0, 0.0)
    draw_run(tmp_path, "gptq", 0, 0.1)
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "--margin", margin])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "ppl=1%" in err and "kld=0.01" in err and "acc=1pt" in err


def test_finding9_draws_of_one_configuration_alone_are_shown_beside_their_baseline(tmp_path, capsys):
    """README: a single configuration prints itself next to the baseline (its draws pooled)."""
    for seed in range(3):
        draw_run(tmp_path, "awq", seed, 0.0)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "B = the unquantized model on the same tokens" in out and "3 vs 1" in out and "ppl wiki" in out


def test_draws_reports_the_draw_share_and_the_data_a_verdict_needs(tmp_path, capsys):
    from analysis.draws import main as draws_main

    for seed, effect in enumerate([0.03, -0.02, 0.01, -0.03, 0.02]):
        draw_run(tmp_path / "awq", "awq", seed, 0.0, effect)
        draw_run(tmp_path / "gptq", "gptq", seed, 0.02, -effect / 2)
    assert draws_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    share = {(line.split()[0], "kld" if " kld " in line else "ppl"): float(line.split()[-1])
             for line in out.splitlines()
             if line.lstrip().startswith(("awq w3", "gptq w3"))}
    assert share[("awq", "kld")] > 0.9  # KLD has no text noise in these runs: the draws are all of its spread
    assert 0.05 < share[("awq", "ppl")] < 0.5 and share[("gptq", "ppl")] < share[("awq", "ppl")]
    assert draws_main([str(tmp_path / "awq"), "--vs", str(tmp_path / "gptq"), "--target", "ppl=0.5%",
                       "--target", "kld=0.02"]) == 0
    out = capsys.readouterr().out
    ppl = next(line.split() for line in out.splitlines() if line.strip().startswith("wiki") and " ppl " in line)
    kld = next(line.split() for line in out.splitlines() if line.strip().startswith("wiki") and " kld " in line)
    assert ppl[8:12] == ["—"] * 4  # 0.5% is below what even 10 draws of this draw noise resolve
    assert kld[8] == "—" and kld[11] != "—"  # 0.02 nats: not with one draw per side, with ten
    assert draws_main([str(tmp_path / "awq"), "--vs", str(tmp_path)]) == 2  # B must be one configuration
    assert draws_main([str(tmp_path), "--split", "method=awq,gptq", "--target", "ppl=0.5%",
                       "--target", "kld=0.02"]) == 0
    assert capsys.readouterr().out.splitlines()[3:5] == out.splitlines()[3:5]  # the same pair, the same needs


def test_the_report_shows_one_row_per_configuration_with_the_draws_in_its_interval(tmp_path, capsys):
    from analysis.report import main as report_main

    effects = [0.1, -0.1, 0.05, -0.08, 0.12]
    for seed, effect in enumerate(effects):
        draw_run(tmp_path / "runs", "awq", seed, 0.0, effect)
        draw_run(tmp_path / "runs", "gptq", seed, 0.02, effects[::-1][seed])
    assert report_main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--no-plots"]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| awq") or line.startswith("| gptq")]
    assert len(rows) == 2, rows  # five draws each: one row per configuration, no Draw column
    assert "Draw" not in text.split("wins/ties/losses")[0]
    # the paired test between the two configurations used their draws: no significant difference, both bold
    assert all("**" in line for line in rows)


def test_collapsed_rows_widen_with_the_draw_spread():
    from analysis.report.select import collapse_draws

    def rows(values):
        return to_frame([dict(run_id=f"r{k}", model="m", method="awq", bits=3, group_size=128, calib_source="wiki",
                              calib_seed=k, replicate_of="cfg", model_fingerprint="mf", suite="ppl", task="wiki",
                              metric="ppl", value=v, stderr=0.1, ci_low=v - 0.2, ci_high=v + 0.2)
                         for k, v in enumerate(values)])

    tight, groups = collapse_draws(rows([20.0, 20.01, 19.99]))
    wide, _ = collapse_draws(rows([18.0, 22.0, 20.0]))
    assert len(tight) == len(wide) == 1 and groups == {"cfg (3 draws)": ["r0", "r1", "r2"]}
    assert tight["value"].item() == pytest.approx(20.0, rel=1e-4)
    assert (tight.ci_high - tight.ci_low).item() < (wide.ci_high - wide.ci_low).item()
    assert (wide.ci_high - wide.ci_low).item() > 4.0  # the draws' spread, not only the 0.1 token stderr


def test_the_sweep_summary_lists_draws_and_their_spread():
    from analysis.summary import summary_table

    frame = to_frame([dict(run_id=f"{m}{k}", model="m", method=m, bits=3, group_size=128, calib_source="wiki",
                           calib_samples=8, calib_seed=k, suite="ppl", task="wiki", metric="ppl", value=v + k)
                      for m, v in (("awq", 20.0), ("gptq", 21.0)) for k in range(3)])
    text = summary_table(frame)
    assert "calib_seed" in text.split("over")[0] and "over calibration draws" in text
    spread = text.split("over calibration draws")[1]
    assert "21.000" in spread and "20.000" in spread and "22.000" in spread  # awq mean, min and max


def test_where_selects_the_runs_to_compare(tmp_path, capsys):
    for seed in range(2):
        draw_run(tmp_path, "awq", seed, 0.0)
        draw_run(tmp_path, "gptq", seed, 0.05)
    draw_run(tmp_path, "fp", None, 0.0)
    table = table_of([str(tmp_path), "--where", "method=awq,gptq"], tmp_path)
    labels = set(table["A_run"]) | set(table["B_run"])
    assert len(labels) == 2 and all(label.startswith(("awq", "gptq")) for label in labels)  # fp left out
    assert main([str(tmp_path), "--where", "method=rtn"]) == 2
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--where", "colour=red"])
    assert "calib_samples" in capsys.readouterr().err


def source_run(root: Path, method: str, source: str, seed: int, shift: float) -> Path:
    """A draw of `method` calibrated on `source`, measured on wiki and code (NLL raised by `shift` there)."""
    run_id = f"{method}-{source}-{seed}"
    rng = np.random.default_rng(zlib.crc32(run_id.encode()))
    tokens = np.full(BLOCKS, BLOCK_TOKENS)
    frames = []
    for task, base in (("wiki", np.log(20.0)), ("code", np.log(8.0))):
        text = base + 0.3 * np.sin(np.arange(BLOCKS))
        off = 0.0 if task == source else shift
        nll = (text + off + 0.003 * rng.standard_normal(BLOCKS) + 0.002 * rng.standard_normal()) * tokens
        frames.append(pd.DataFrame({"task": task, "window": np.arange(BLOCKS) // 8, "block": np.arange(BLOCKS) % 8,
                                    "tokens": tokens, "nll_sum": nll, "base_nll_sum": text * tokens}))
    row = dict(run_id=run_id, config_hash=run_id, model="m", method=method, bits=3, group_size=128,
               calib_source=source, calib_samples=8, calib_seqlen=512, calib_seed=seed, seed=0,
               replicate_of=f"cfg-{method}-{source}", model_fingerprint="mf01",
               data_fingerprint=json.dumps({"eval:wiki": "tw", "eval:code": "tc"}),
               started_at="2026-12-01T10:00:00+00:00", suite="ppl", metric="ppl")
    rows = [dict(row, task=f.task.iloc[0], value=float(np.exp(f.nll_sum.sum() / f.tokens.sum()))) for f in frames]
    write_run(root / run_id, to_frame(rows), "{}\n", {"run_id": run_id},
              files={"blocks.parquet": pd.concat(frames).to_parquet(index=False)})
    return root / run_id


def test_robustness_gives_penalties_and_which_method_is_less_sensitive(tmp_path, capsys):
    from analysis.robustness import main as robustness_main

    for seed in range(3):
        for source in ("wiki", "code"):
            source_run(tmp_path, "awq", source, seed, 0.02)   # penalty exp(0.02) off-domain
            source_run(tmp_path, "gptq", source, seed, 0.20)  # penalty exp(0.20)
    assert robustness_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    penalties = [line for line in out.split("Ratio")[0].splitlines() if line.lstrip().startswith(("awq", "gptq"))]
    assert len(penalties) == 8  # 2 methods x 2 sources x 2 sets
    sensitivity = out.split("Ratio of penalties")[1]
    assert sensitivity.count("A less sensitive") == 2  # awq (A) on both off-domain cells
    assert robustness_main([str(tmp_path), "--where", "method=rtn"]) == 2


def test_the_report_gives_robustness_penalties_with_intervals_over_draws(tmp_path):
    from analysis.report import main as report_main

    for seed in range(3):
        for source in ("wiki", "code"):
            source_run(tmp_path / "runs", "gptq", source, seed, 0.20)
    assert report_main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--no-plots"]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    section = text.split("calibration robustness of gptq w3 g128")[1]
    cells = [line for line in section.splitlines() if line.startswith(("| code", "| wiki"))][:2]
    assert len(cells) == 2 and all("(×1.22" in line for line in cells), cells  # exp(0.20), with an interval


def test_finding14_a_draw_variance_estimated_below_zero_is_named_and_its_treatment_said(tmp_path, capsys):
    """Three draws whose per-block noise is the same values in other blocks: their means are equal, so the draws
    spread less than their token noise predicts and (MS_draws - MS_residual) / J < 0. analysis.draws used to print
    'sd between draws 0' with nothing said; now it marks the row and says how --vs treats the draw term."""
    from analysis.draws import main as draws_main

    noise = 0.01 * np.sin(np.arange(BLOCKS) * 1.7)
    for seed in range(3):
        path = draw_run(tmp_path / "awq", "awq", seed, 0.0)
        blocks = pd.read_parquet(path / "blocks.parquet")
        text = np.log(20.0) + 0.3 * np.sin(np.arange(BLOCKS))
        blocks["nll_sum"] = (text + np.roll(noise, 5 * seed)) * BLOCK_TOKENS
        blocks["kld_sum"] = (0.2 + np.roll(noise, 3 * seed)) * BLOCK_TOKENS
        write_run(path, to_frame([pd.read_parquet(path / "rows.parquet").iloc[0].to_dict()]), "{}\n",
                  {"run_id": path.name}, files={"blocks.parquet": blocks.to_parquet(index=False)})
        draw_run(tmp_path / "gptq", "gptq", seed, 0.05, 0.01 * (seed - 1))
    assert draws_main([str(tmp_path / "awq")]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.lstrip().startswith("awq w3")]
    assert len(rows) == 2 and all(" 0 * " in line for line in rows), out
    assert "estimated below zero" in out and "takes the draw term as 0" in out
    assert draws_main([str(tmp_path / "awq"), "--vs", str(tmp_path / "gptq"), "--target", "ppl=1%"]) == 0
    out = capsys.readouterr().out
    assert "A: -" in out and "-> 0" in out and "taken as 0" in out
