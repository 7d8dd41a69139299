"""The cluster path for real: sweeps submitted to a SLURM cluster (the one-node cluster of scripts/slurm_local.sh) with
hydra/launcher=slurm_cpu, two one-CPU jobs at a time, on a tiny model. Nothing is mocked: the jobs are requeued with
`scontrol requeue` or signalled with `scancel --signal=USR1`, and must resume from the cache to exactly the results of
an uninterrupted run; two jobs on a fresh cache compute the baseline once; a failing job is named, with its log, while
the others finish; `python -m harness.status` shows every state on the way.

Skipped, with the reason, where no SLURM controller answers (.ci/run starts the local cluster and runs `-m slurm`
with QUANT_HARNESS_REQUIRE_SLURM=1, which turns a skip into an error).
The test prints the sweeps' timelines (the jobs' journals merged with what the test did to them); run it with -s to
see them. A few minutes on 2 cores.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
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
from harness.journal import STATUS_FILE
from harness.locks import held, lock_path
from harness.run import execute, run_dir
from harness.status import STATES, sweep_events, sweep_status, timeline
from test_config import make_config

ROOT = Path(__file__).resolve().parent.parent


def slurm_unavailable() -> str | None:
    """Why these tests cannot run here (None: a controller answers, a node takes jobs and sacct answers)."""
    start = "start the one-node cluster with `sudo bash scripts/slurm_local.sh`"
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return f"SLURM's commands are not installed: {start}"

    def run(*command):
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as err:
            return subprocess.CompletedProcess(command, 1, "", str(err))

    if "is UP" not in run("scontrol", "ping").stdout:
        return f"no SLURM controller answers here: {start}"
    nodes = run("sinfo", "-h", "-o", "%T").stdout.split()
    if not any(state.startswith(("idle", "mixed", "allocated")) for state in nodes):
        return f"no SLURM node takes jobs (sinfo says {nodes or 'nothing'}): {start}"
    if run("sacct", "-n", "-X", "-S", "now").returncode != 0:
        return "SLURM accounting does not answer (sacct): submitit could not see its jobs' states; " + start
    return None


REASON = slurm_unavailable()
if REASON is not None and os.environ.get("QUANT_HARNESS_REQUIRE_SLURM"):  # .ci/run started a cluster: no skipping
    raise RuntimeError(f"QUANT_HARNESS_REQUIRE_SLURM is set, but {REASON}")
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

LAUNCHER = ["hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
            "hydra.launcher.array_parallelism=2", "hydra.launcher.timeout_min=30"]
N_BLOCKS = 16  # blocks of slack between the first kept block and the end: the test must act before GPTQ ends


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny N_BLOCKS-block Llama, its tokenizer and a corpus; results and cache directories the sweeps share."""
    root = tmp_path_factory.mktemp("slurm")
    save_with_tokenizer(tiny_model("llama", num_hidden_layers=N_BLOCKS, hidden_size=128, intermediate_size=256,
                                   num_attention_heads=4, num_key_value_heads=2), root / f"tiny{N_BLOCKS}")
    (root / "corpus.txt").write_text(random_text(8000))
    return root


def run_overrides(root: Path, results_dir: str = "results", cache_dir: str = "cache") -> list[str]:
    return ["model=hf", f"model.path={root / f'tiny{N_BLOCKS}'}", f"model.name=tiny{N_BLOCKS}", "device=cpu",
            f"data.sources.textfile.path={root / 'corpus.txt'}", "calib.source=textfile", "eval.ppl_sets=[textfile]",
            "eval.seqlen=64", "eval.max_windows=6", "eval.lm_eval=null", "calib.n_samples=32", "calib.seqlen=64",
            f"results_dir={root / results_dir}", f"cache_dir={root / cache_dir}"]


class Sweep:
    """One `python -m harness -m ...` submitted to SLURM, watched through harness.status while it runs."""

    def __init__(self, root: Path, name: str, *overrides: str) -> None:
        self.dir, self.log = root / name, root / f"{name}.out"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.started = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "harness", "-m", *LAUNCHER, *overrides,
                                      f"hydra.sweep.dir={self.dir}"], cwd=ROOT, env=env,
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        self.seen: dict[int, list[str]] = {}  # every state harness.status showed for each job, in order
        self.actions: list[tuple[float, str]] = []  # what the test did to the jobs, when
        self.commands: list[subprocess.Popen] = []

    def poll(self) -> list[dict]:
        rows = sweep_status(self.dir)
        for row in rows:
            states = self.seen.setdefault(row["job"], [])
            if not states or states[-1] != row["state"]:
                states.append(row["state"])
        return rows

    def journal(self, job: int) -> dict:
        try:
            return json.loads((self.dir / str(job) / STATUS_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def act(self, *command: str) -> None:
        """Run a SLURM command on the jobs, without waiting for it: `scancel --signal` goes on retrying for a minute
        ("Job can not be altered now") once the signalled job starts requeueing itself, long after the signal was
        delivered (the job's journal says when it was); see `settled`."""
        self.commands.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        self.actions.append((time.time(), " ".join(command)))

    def settled(self, job_id: str) -> None:
        """The job took the signal (its journal says it stopped): end the commands still retrying on it, or a retry
        would signal the requeued job again as soon as it starts."""
        for command in self.commands:
            if job_id in command.args and command.poll() is None:
                command.kill()
                command.wait()

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 600) -> int:
        deadline = time.time() + timeout
        while self.running() and time.time() < deadline:
            self.poll()
            time.sleep(0.5)
        if self.running():
            raise AssertionError(f"the sweep did not end within {timeout:.0f} s:\n{self.output()[-3000:]}")
        self.poll()
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text()

    def timeline(self) -> str:
        """The jobs' journals merged with the test's own actions, in time order."""
        events = sweep_events(self.dir)
        lines = timeline(events).splitlines()
        start = events[0]["time"] if events else self.started
        lines += [f"+{t - start:7.1f} s  test                        {what}" for t, what in self.actions]
        return "\n".join(sorted(lines, key=lambda line: float(line[1:].split()[0])))

    def cancel(self) -> None:
        """Leave nothing behind: the SLURM commands still retrying, and (a test that failed half-way) the sweep's jobs
        and its driver."""
        for command in self.commands:
            if command.poll() is None:
                command.kill()
            command.wait()
        if self.running():
            ids = {self.journal(n).get("slurm_job", "").split("_")[0] for n in self.seen} - {""}
            for array in ids:
                subprocess.run(["scancel", array], capture_output=True)
            self.proc.kill()
            self.proc.wait()


def _slurm_state(job_id: str) -> str:
    """'STATE REASON' of a queued or running job, as squeue says it."""
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True,
                          timeout=30).stdout.strip()


def _kept_blocks(status: dict) -> int:
    path = (status.get("progress") or {}).get("path")
    return len(list(Path(path).glob("block-*.pt"))) if path and Path(path).is_dir() else 0


def _quantization_over(status: dict) -> bool:
    return status.get("stage") not in (None, "plan", "load", "fingerprint", "baseline", "quantize") \
        or status.get("state") in ("done", "failed")


@pytest.fixture(scope="module")
def interrupted_sweep(workspace):
    """A 2 x 2 sweep (GPTQ and RTN at 3 and 4 bits) on a fresh cache, two jobs at a time. While the two GPTQ jobs
    quantize, job 0 is requeued with `scontrol requeue` (SIGTERM) and job 1 is signalled with `scancel --signal=USR1`
    (submitit requeues it); once both have stopped, their requeue delay (about two minutes) is cut short."""
    sweep = Sweep(workspace, "sweep1", *run_overrides(workspace), "method=gptq,rtn", "bits=3,4")
    try:
        interrupted, released = {}, set()
        deadline = time.time() + 600
        while sweep.running() and time.time() < deadline:
            sweep.poll()
            for job, (needed, command) in {0: (2, ["scontrol", "requeue"]),
                                           1: (1, ["scancel", "--signal=USR1"])}.items():
                status = sweep.journal(job)
                if job in interrupted or status.get("slurm_restarts"):
                    continue
                assert not _quantization_over(status), \
                    f"job {job} finished quantizing before the test could interrupt it:\n{sweep.timeline()}"
                if _kept_blocks(status) >= needed:
                    sweep.act(*command, status["slurm_job"])
                    interrupted[job] = status["slurm_job"]
            for job, job_id in interrupted.items():  # SLURM holds a requeued job ~2 minutes: cut that short
                if job not in released and sweep.journal(job).get("state") == "stopped":
                    sweep.settled(job_id)
                    if _slurm_state(job_id) == "PENDING BeginTime":
                        sweep.act("scontrol", "update", f"JobId={job_id}", "StartTime=now")
                        released.add(job)
            time.sleep(0.1)
        sweep.returncode = sweep.wait()
        sweep.interrupted = interrupted
        print(f"\n--- timeline of the 2 x 2 sweep ({sweep.dir}) ---\n{sweep.timeline()}\n")
        print("states harness.status showed:", json.dumps(sweep.seen))
        yield sweep
    finally:
        sweep.cancel()


@pytest.fixture(scope="module")
def uninterrupted(workspace):
    """The two GPTQ runs computed start to finish in this process, one thread (as the jobs: OMP_NUM_THREADS from
    SLURM_CPUS_PER_TASK), on their own results and cache."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for bits in (3, 4):
            cfg = make_config(*run_overrides(workspace, "results_ref", "cache_ref"), "method=gptq", f"bits={bits}")
            execute(cfg)
    finally:
        torch.set_num_threads(threads)
    return workspace / "results_ref", workspace / "cache_ref"


def test_a_2x2_sweep_finishes_with_4_verified_runs(interrupted_sweep, workspace):
    assert interrupted_sweep.returncode == 0, interrupted_sweep.output()[-3000:]
    rows = sweep_status(interrupted_sweep.dir)
    assert [r["state"] for r in rows] == ["done"] * 4, rows
    runs = sorted({r["run_dir"] for r in rows})
    assert len(runs) == 4 and all(results.check_run(Path(r)).state == "complete" for r in runs)
    assert "Bypassing sacct error" not in interrupted_sweep.output()  # accounting answers: states are real


def _entries(cache: Path) -> dict[str, dict]:
    return {p.name: torch.load(io.BytesIO(read_sealed(p)), map_location="cpu", weights_only=False)
            for p in (cache / "quantized").glob("*.pt")}


def test_requeued_and_signalled_jobs_resume_to_the_uninterrupted_result(interrupted_sweep, uninterrupted, workspace):
    sweep = interrupted_sweep
    assert set(sweep.interrupted) == {0, 1}
    for job, signal_name in ((0, "SIGTERM"), (1, "SIGUSR1")):
        events = [json.loads(line) for line in (sweep.dir / str(job) / "events.jsonl").read_text().splitlines()]
        stopped = [e for e in events if e["event"] == "stopped"]
        assert [e["signal"] for e in stopped] == [signal_name], events
        assert stopped[0]["requeue_asked"] is (signal_name == "SIGUSR1")  # SIGTERM: SLURM requeues it itself
        resumed = [e for e in events if e["event"] == "resumed"]
        assert len(resumed) == 1 and resumed[0]["slurm_restarts"] == 1, events  # the requeued incarnation resumed
        blocks = [e for e in events if e["event"] == "blocks"][-1]["passes"]["gptq"]
        assert blocks["reused"] == resumed[0]["reused"] >= 1 and blocks["reused"] + blocks["computed"] == N_BLOCKS
    # the quantized weights, bit for bit, and every number the runs report
    ref_results, ref_cache = uninterrupted
    got, expected = _entries(workspace / "cache"), _entries(ref_cache)
    for name, entry in expected.items():
        assert entry["key"] == got[name]["key"]
        assert entry["stats"] == got[name]["stats"]
        for layer, art in entry["artifacts"].items():
            for field in ("codes", "scales", "zeros"):
                assert torch.equal(getattr(art, field), getattr(got[name]["artifacts"][layer], field)), layer
    measured = results.load_results(ref_results)
    swept = results.load_results(workspace / "results")
    key = ["run_id", "suite", "task", "metric"]
    timed = (measured["suite"] == "stage") | measured["metric"].str.endswith("wall_s")  # seconds: never identical
    numbers = measured[~timed][key + ["value"]]
    merged = numbers.merge(swept[key + ["value"]], on=key, suffixes=("_ref", "_swept"), how="left")
    assert not merged.empty and merged["value_swept"].notna().all()
    pd.testing.assert_series_equal(merged["value_ref"], merged["value_swept"], check_names=False, check_exact=True)
    for run in measured["run_id"].unique():
        pd.testing.assert_frame_equal(pd.read_parquet(ref_results / run / results.BLOCKS_FILE),
                                      pd.read_parquet(workspace / "results" / run / results.BLOCKS_FILE))


def test_two_jobs_on_a_fresh_cache_compute_the_baseline_once(interrupted_sweep):
    events = sweep_events(interrupted_sweep.dir)
    baseline = [e for e in events if e["event"] == "cache" and e["kind"] == "baseline"]
    computed = [e for e in baseline if e["action"] == "computed"]
    assert len(computed) == 1, baseline
    first_wave = {e["job"] for e in events if e["event"] == "job_start" and not e.get("slurm_restarts")}
    assert {0, 1} <= first_wave  # both started on the fresh cache
    other = {0, 1} - {computed[0]["job"]}
    assert any(e["job"] in other for e in baseline if e["action"].startswith("reused")), baseline
    assert len(baseline) == 6  # 4 jobs, 2 of them twice (requeued): one computation, five reuses


@pytest.fixture(scope="module")
def failing_sweep(workspace, interrupted_sweep):
    """On the same results and cache: FP and GPTQ at group sizes 32 and 48 with strict_groups=true. 48 divides no
    layer of the model: the GPTQ job at 48 fails. fp quantizes nothing, so its two jobs are one run, which takes a
    fraction of a second: to see a job wait for another's run without racing it, the test itself holds that run's
    lock (as a job on another node would: owner file, heartbeat) from before the sweep is submitted until
    harness.status shows a job waiting for it; then one job runs it and the other finds it done or waits. Then the
    same command runs again."""
    overrides = (*run_overrides(workspace), "method=fp,gptq", "group_size=32,48", "strict_groups=true")
    fp_lock = lock_path(run_dir(make_config(*run_overrides(workspace), "method=fp", "group_size=32",
                                            "strict_groups=true")))
    holding = contextlib.ExitStack()
    holding.enter_context(held(fp_lock, "the fp run, held by the test"))
    sweep = Sweep(workspace, "sweep2", *overrides)
    try:
        released, deadline = False, time.time() + 600
        while sweep.running() and time.time() < deadline:
            rows = sweep.poll()
            if not released and any(r["job"] in (0, 1) and r["state"] == "waiting" for r in rows):
                holding.close()
                released = True
                sweep.actions.append((time.time(), "the test releases the fp run's lock"))
            time.sleep(0.1)
        sweep.returncode = sweep.wait()
        print(f"\n--- timeline of the failing sweep ({sweep.dir}) ---\n{sweep.timeline()}\n")
        print("states harness.status showed:", json.dumps(sweep.seen))
        done = {p: p.stat().st_mtime_ns for p in (workspace / "results").glob("*/DONE")}
        sweep.again, sweep.done_before = Sweep(workspace, "sweep2_again", *overrides), done
        sweep.again.returncode = sweep.again.wait()
        print(f"\n--- timeline of the same command run again ({sweep.again.dir}) ---\n{sweep.again.timeline()}\n")
        yield sweep
    finally:
        holding.close()
        sweep.cancel()
        if getattr(sweep, "again", None) is not None:
            sweep.again.cancel()


def test_a_failing_job_is_named_while_the_others_finish(failing_sweep):
    sweep = failing_sweep
    assert sweep.returncode != 0
    out = sweep.output()
    assert "3 of 4 jobs finished, 1 failed" in out
    assert "#3 method=gptq group_size=48: ConfigError: group_size=48 does not divide" in out
    rows = {r["job"]: r for r in sweep_status(sweep.dir)}
    assert [rows[n]["state"] for n in range(4)] == ["done", "done", "done", "failed"]
    assert "group_size=48 does not divide" in rows[3]["error"] and Path(rows[3]["log"]).exists()
    assert "group_size=48 does not divide" in Path(rows[3]["log"]).read_text()  # the log holds the error


def test_rerunning_the_sweep_runs_only_what_is_not_done(failing_sweep, workspace):
    again = failing_sweep.again
    assert again.returncode != 0 and "#3 method=gptq group_size=48" in again.output()
    events = sweep_events(again.dir)
    for job in (0, 1, 2):  # finished: verified and skipped, nothing computed or even loaded
        assert [e["event"] for e in events if e["job"] == job] == ["job_start", "done"], events
    assert {p: p.stat().st_mtime_ns for p in (workspace / "results").glob("*/DONE")} == failing_sweep.done_before


def test_status_shows_each_state_along_the_way(interrupted_sweep, failing_sweep):
    seen = {state for sweep in (interrupted_sweep, failing_sweep) for states in sweep.seen.values()
            for state in states}
    assert seen >= set(STATES) - {"stopped"}, seen  # stopped: a stop outside SLURM (requeued here)
    assert "requeued" in interrupted_sweep.seen[0] and "requeued" in interrupted_sweep.seen[1]
    assert "not started" in interrupted_sweep.seen[2]  # two jobs at a time: the third waits in the queue
