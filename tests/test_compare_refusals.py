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
