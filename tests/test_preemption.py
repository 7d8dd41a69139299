"""A signal stops a run at its next safe point with what it computed kept in the cache, and running the same command
again resumes there, to the results of an uninterrupted run (harness/preemption.py). The real thing: a signal sent to
a `python -m harness` process while it quantizes."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis import results
from analysis.integrity import read_sealed
from conftest import random_text, save_with_tokenizer, tiny_model
from harness.journal import EVENTS_FILE, STATUS_FILE
from harness.preemption import RETRY_EXIT, Preempted, StopRequest
from harness.locks import lock_path
from harness.run import execute, run_dir
from test_config import make_config
from test_run import tiny_run_overrides

ROOT = Path(__file__).resolve().parent.parent
N_BLOCKS = 8


def _overrides(root: Path, results_dir: str, cache_dir: str) -> list[str]:
    return ["model=hf", f"model.path={root / 'tiny8'}", "model.name=tiny8", "device=cpu",
            f"data.sources.textfile.path={root / 'corpus.txt'}", "calib.source=textfile", "eval.ppl_sets=[textfile]",
            "eval.seqlen=64", "eval.max_windows=4", "eval.lm_eval=null", "calib.n_samples=32", "calib.seqlen=64",
            "method=gptq", f"results_dir={root / results_dir}", f"cache_dir={root / cache_dir}"]


def _harness(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def _events(job_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (job_dir / EVENTS_FILE).read_text().splitlines()]


def test_sigusr1_stops_a_run_between_blocks_and_the_same_command_resumes_it(tmp_path):
    save_with_tokenizer(tiny_model("llama", num_hidden_layers=N_BLOCKS, hidden_size=128, intermediate_size=256,
                                   num_attention_heads=4, num_key_value_heads=2), tmp_path / "tiny8")
    (tmp_path / "corpus.txt").write_text(random_text(8000))
    args = _overrides(tmp_path, "results", "cache")

    first = _harness(*args, f"hydra.run.dir={tmp_path / 'first'}")
    deadline = time.time() + 300
    while not list((tmp_path / "cache").glob("quantized/*.progress/pass-0/block-0.pt")) and time.time() < deadline:
        assert first.poll() is None, first.stdout.read()[-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGUSR1)  # as SLURM warns a job before its time limit
    out = first.communicate(timeout=300)[0]
    assert first.returncode == RETRY_EXIT, out[-3000:]
    stopped = [e for e in _events(tmp_path / "first") if e["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGUSR1" and "after block" in stopped[0]["where"]
    assert stopped[0]["requeue_asked"] is False  # not a submitit job: the same command resumes it
    assert json.loads((tmp_path / "first" / STATUS_FILE).read_text())["state"] == "stopped"
    kept_after = int(stopped[0]["where"].split("after block ")[1].split()[0])
    assert kept_after < N_BLOCKS, "the run finished quantizing before the signal arrived"
    cfg = make_config(*args)
    assert not (run_dir(cfg) / results.DONE_FILE).exists()

    second = _harness(*args, f"hydra.run.dir={tmp_path / 'second'}")
    out = second.communicate(timeout=600)[0]
    assert second.returncode == 0, out[-3000:]
    events = _events(tmp_path / "second")
    assert [e["action"] for e in events if e["event"] == "cache" and e["kind"] == "baseline"] == ["reused"]
    blocks = [e for e in events if e["event"] == "blocks"][0]["passes"]["gptq"]
    assert blocks == {"reused": kept_after, "computed": N_BLOCKS - kept_after}
    assert not list((tmp_path / "cache").glob("quantized/*.progress"))  # gone once the weights are cached

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runs above (OMP_NUM_THREADS=1)
    try:
        execute(make_config(*_overrides(tmp_path, "results_ref", "cache_ref")))
    finally:
        torch.set_num_threads(threads)
    got, expected = results.load_results(tmp_path / "results"), results.load_results(tmp_path / "results_ref")
    numbers = ["suite", "task", "metric", "value"]
    keep = lambda f: f[(f["suite"] != "stage") & ~f["metric"].str.endswith("wall_s")][numbers]  # noqa: E731
    pd.testing.assert_frame_equal(keep(got).reset_index(drop=True), keep(expected).reset_index(drop=True),
                                  check_exact=True)
    entry = lambda cache: torch.load(io.BytesIO(read_sealed(next((cache / "quantized").glob("*.pt")))),  # noqa: E731
                                     weights_only=False)
    a, b = entry(tmp_path / "cache"), entry(tmp_path / "cache_ref")
    for name, art in b["artifacts"].items():
        for field in ("codes", "scales", "zeros"):
            assert torch.equal(getattr(art, field), getattr(a["artifacts"][name], field)), name
    assert a["stats"] == b["stats"]


def test_a_stop_between_stages_keeps_the_baseline_and_the_next_run_reuses_it(tiny_model_dir, text_file, tmp_path):
    cfg = make_config(*tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=rtn"))
    stop = StopRequest()
    stop.ask(signal.SIGUSR2)  # arrived while the baseline was computed
    with pytest.raises(Preempted, match="after the baseline"):
        execute(cfg, stop=stop)
    baseline = next((tmp_path / "cache" / "teacher").glob("*.pt"))
    written = baseline.stat().st_mtime_ns
    assert not (run_dir(cfg) / results.DONE_FILE).exists() and not lock_path(run_dir(cfg)).exists()
    execute(cfg)
    assert baseline.stat().st_mtime_ns == written and results.is_complete(run_dir(cfg))
