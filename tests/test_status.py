"""`python -m harness.status`: one state per job of a sweep (from the jobs' journals, the sweep's plan, SLURM where it
answers) and per run of a results directory; a table, JSON, and a sweep's timeline."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from analysis import results
from harness import status as status_cli
from harness.journal import EVENTS_FILE, STATUS_FILE, process_start
from harness.locks import OWNER, lock_path


def _journal(job_dir: Path, **fields) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    base = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid()),
            "updated": time.time(), "log": str(job_dir / "__main__.log")}
    (job_dir / STATUS_FILE).write_text(json.dumps({**base, **fields}))


def _finished_run(run: Path) -> None:
    results.write_run(run, results.to_frame([{"run_id": run.name, "suite": "ppl", "task": "wiki", "metric": "ppl",
                                              "value": 1.0}]), "", {})


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_every_state_of_a_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(  # as Hydra's basic sweeper saves it: 8 jobs planned
        "hydra:\n  sweeper:\n    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper\n    params: null\n"
        "  overrides:\n    task: [results_dir=r, 'method=fp,rtn', 'bits=2,3,4,8']\n")
    done_run, progress = tmp_path / "results" / "run-a", tmp_path / "cache" / "x.progress" / "pass-0"
    _finished_run(done_run)
    progress.mkdir(parents=True)
    for i in range(3):
        (progress / f"block-{i}.pt").touch()
    _journal(sweep / "0", job=0, state="done", run_dir=str(done_run))
    _journal(sweep / "1", job=1, state="running", stage="quantize", slurm_job="12_1", slurm_restarts=1,
             progress={"desc": "gptq", "path": str(progress), "blocks": 8, "reused": 2})
    _journal(sweep / "2", job=2, state="waiting", waiting_for={"what": "baseline wiki", "lock": "/c/t.lock.d",
                                                               "holder": {"host": "node7", "pid": 42}})
    _journal(sweep / "3", job=3, state="stopped", signal="SIGUSR1", where="gptq: after block 4 of 8")
    _journal(sweep / "4", job=4, state="failed", error="ValueError: GPTQ Hessian stays singular")
    _journal(sweep / "5", job=5, state="running", stage="ppl", pid=_dead_pid())  # killed without a word
    _journal(sweep / "6", job=6, state="running", host="node9", updated=time.time() - 3600)  # its heartbeat stopped
    rows = {r["job"]: r for r in status_cli.sweep_status(sweep, ask_slurm=False)}
    assert [rows[n]["state"] for n in range(8)] == ["done", "running", "waiting", "stopped", "failed", "failed",
                                                    "failed", "not started"]
    assert rows[0]["config"] == "method=fp bits=2"  # what sets it apart; results_dir is common to all
    assert "SLURM job 12_1 (requeued 1x)" in rows[1]["detail"]
    assert "gptq: 3/8 blocks done, 2 reused" in rows[1]["detail"]
    assert "waiting for baseline wiki (held by host node7, pid 42" in rows[2]["detail"]
    assert "on SIGUSR1" in rows[3]["detail"] and "the same command resumes it" in rows[3]["detail"]
    assert "Hessian stays singular" in rows[4]["detail"] and rows[4]["log"].endswith("__main__.log")
    assert "died without a word" in rows[5]["detail"] and "died without a word" in rows[6]["detail"]

    assert status_cli.main([str(sweep)]) == 0  # the table
    assert status_cli.main([str(sweep), "--json"]) == 0


def test_a_stopped_job_that_slurm_queued_again_is_requeued():
    stopped = {"state": "stopped", "signal": "SIGTERM", "where": "gptq: after block 3 of 8"}
    state, detail = status_cli.job_state(stopped, {"state": "PENDING", "reason": "BeginTime"})
    assert state == "requeued" and "resumes from the cache" in detail
    assert status_cli.job_state(None, {"state": "PENDING", "reason": "JobArrayTaskLimit"})[0] == "not started"
    assert status_cli.job_state(None, {"state": "OUT_OF_MEMORY", "reason": ""})[0] == "failed"


def test_a_results_directory(tmp_path, capsys):
    root = tmp_path / "results"
    _finished_run(root / "done")
    lock_path(root / "running").mkdir(parents=True)  # a running run: its lock, no run directory yet
    (lock_path(root / "running") / OWNER).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid()),
         "slurm_job": "7_2"}))
    (root / "failed").mkdir()
    (root / "failed" / results.FAILED_FILE).write_text(json.dumps({"error": "RuntimeError: out of memory",
                                                                    "log": "/logs/3.log"}))
    lock_path(root / "died").mkdir(parents=True)
    (lock_path(root / "died") / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    rows = {r["run"]: r for r in status_cli.results_status(root)}
    assert {k: r["state"] for k, r in rows.items()} == {"done": "done", "running": "running", "failed": "failed",
                                                         "died": "failed"}
    assert "SLURM job 7_2" in rows["running"]["detail"] and "/logs/3.log" in rows["failed"]["detail"]
    assert status_cli.main([str(root)]) == 0
    assert "1 done, 1 running, 2 failed" in capsys.readouterr().out


def test_a_sweeps_timeline_merges_the_jobs_journals(tmp_path):
    for job, lines in {0: [{"time": 10.0, "event": "job_start", "run_dir": "/r/a", "host": "vm", "pid": 1},
                           {"time": 12.0, "event": "cache", "kind": "baseline", "what": "baseline wiki",
                            "action": "computed", "seconds": 1.5}],
                       1: [{"time": 11.0, "event": "lock_wait", "what": "baseline wiki",
                            "holder": {"host": "vm", "pid": 1, "slurm_job": "5_0"}, "slurm_job": "5_1"},
                           {"time": 13.0, "event": "stopped", "signal": "SIGTERM", "where": "after block 2",
                            "slurm_job": "5_1"}]}.items():
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / EVENTS_FILE).write_text("".join(json.dumps(e) + "\n" for e in lines))
    text = status_cli.timeline(status_cli.sweep_events(tmp_path)).splitlines()
    assert [line.split()[4] for line in text] == ["0", "1", "0", "1"]  # job numbers, in time order
    assert "waiting for baseline wiki (held by host vm, pid 1, SLURM job 5_0)" in text[1]
    assert "baseline wiki: computed (1.5 s)" in text[2] and "stopped on SIGTERM" in text[3]
