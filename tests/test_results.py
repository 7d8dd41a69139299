"""Result rows: schema, atomic writes, loading a results tree."""
import json
import os

import pandas as pd
import pytest

from analysis import results
from analysis.results import COLUMNS, atomic_write_text, find_run_dirs, load_results, to_frame, write_run


def _rows(run_id="r1", ppl=12.5):
    base = {"run_id": run_id, "model": "tiny", "method": "rtn", "bits": 4, "group_size": 128, "seed": 0}
    return [{**base, "suite": "ppl", "task": "wiki", "metric": "ppl", "value": ppl, "n": 100},
            {**base, "suite": "quant", "task": "all", "metric": "quant_wall_s", "value": 1.5}]


def test_frame_has_exactly_the_schema_and_nullable_types():
    frame = to_frame(_rows() + [{"run_id": "fp", "method": "fp", "bits": None, "suite": "ppl", "task": "wiki",
                                 "metric": "ppl", "value": 10.0}])
    assert list(frame.columns) == COLUMNS
    assert str(frame["bits"].dtype) == "Int64" and frame["bits"].isna().sum() == 1


def test_unknown_column_or_suite_is_rejected():
    with pytest.raises(ValueError, match="unknown result columns"):
        to_frame([{"suite": "ppl", "ppl_wiki": 3.0}])
    with pytest.raises(ValueError, match="suite"):
        to_frame([{"suite": "accuracy"}])


def test_write_and_load_round_trip(tmp_path):
    frame = to_frame(_rows())
    write_run(tmp_path / "r1", frame, "bits: 4\n", {"run_id": "r1"})
    for name in (results.ROWS_FILE, results.CSV_FILE, results.CONFIG_FILE, results.DONE_FILE):
        assert (tmp_path / "r1" / name).exists()
    loaded = load_results(tmp_path)
    pd.testing.assert_frame_equal(loaded, frame)
    assert json.loads((tmp_path / "r1" / results.DONE_FILE).read_text())["run_id"] == "r1"


def test_unfinished_runs_are_skipped(tmp_path):
    write_run(tmp_path / "done", to_frame(_rows("done")), "", {})
    (tmp_path / "half").mkdir()
    to_frame(_rows("half")).to_parquet(tmp_path / "half" / results.ROWS_FILE)  # no DONE marker: killed mid-write
    assert [d.name for d in find_run_dirs(tmp_path)] == ["done"]
    assert set(load_results(str(tmp_path / "*"))["run_id"]) == {"done"}


def test_atomic_write_leaves_old_file_intact_when_killed(tmp_path, monkeypatch):
    target = tmp_path / "table.csv"
    atomic_write_text(target, "old\n")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies between writing and renaming

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]  # no temporary file left behind


def test_empty_tree_gives_empty_frame_with_schema(tmp_path):
    frame = load_results(tmp_path)
    assert frame.empty and list(frame.columns) == COLUMNS
