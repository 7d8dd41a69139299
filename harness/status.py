"""Where a sweep's jobs (or a results tree's runs) stand: `python -m harness.status <sweep dir | results dir> [--json]`.

For a sweep directory (Hydra's -m output, `hydra.sweep.dir`), every job the sweep planned (expanded from its
multirun.yaml as Hydra's basic sweeper expands it; the launcher's manifest adds SLURM job ids), each with one state:
- done: its run directory is complete and verified;
- running: where (host, pid, SLURM job), in which stage, how many blocks of its quantization are kept;
- waiting: for which lock (a cache entry another job computes, or the same run), held by whom;
- requeued: stopped at a safe point by a signal and pending again in SLURM (it resumes from the cache);
- stopped: stopped at a safe point, not queued again (the same command resumes it);
- failed: the error's last line and the log that holds the traceback (a job that died without a word: its process
  is gone or its heartbeat stopped, or SLURM ended it; with SLURM's state and submitit's log);
- not started: nothing of it has run yet (pending in SLURM, where SLURM says so).
Jobs say where they stand in their journal (harness/journal.py: job_status.json in each job's directory); SLURM
(squeue, sacct) is asked about the jobs that have none yet or whose process is gone, where its commands exist.

For a results directory, every run directory in it: done, running (its lock's holder is alive), failed (its
.failed.json), or unfinished. Readable on a terminal; `--json` for scripts; `--events` prints a sweep's timeline
(what each job computed, reused and waited for, when it stopped and resumed). Imports no model library: quick.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from analysis.results import DONE_FILE, FAILED_FILE, check_run
from analysis.summary import RUN_FILE
from harness.journal import EVENTS_FILE, HEARTBEAT_S, STATUS_FILE, where_text
from harness.locks import LOCK_SUFFIX, STALE_S, heartbeat_age, local_process_gone, lock_path, read_owner
from harness.sweep import read_manifest, set_apart, shared_overrides, sweep_jobs

STALE_AFTER_S = 4 * HEARTBEAT_S  # a journal not rewritten for this long belongs to a job that is gone
STATES = ("done", "running", "waiting", "requeued", "stopped", "failed", "not started")


def planned_jobs(sweep_dir: Path) -> dict[int, list[str]]:
    """{job number: overrides} of every job the sweep planned (empty when its sweeper does not list jobs ahead)."""
    config_path = sweep_dir / "multirun.yaml"
    planned = {}
    if config_path.exists():
        config = OmegaConf.load(config_path)
        if str(config.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper"):
            planned = dict(enumerate(sweep_jobs(config)))
    for job in read_manifest(sweep_dir).get("jobs", []):
        planned.setdefault(job["num"], job["overrides"])
    return planned


def _journals(sweep_dir: Path) -> dict[int, dict]:
    found = {}
    for path in sweep_dir.glob(f"*/{STATUS_FILE}"):
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        number = status.get("job")
        if number is None and path.parent.name.isdigit():
            number = int(path.parent.name)
        if number is not None:
            found[int(number)] = status
    return found


def slurm_states(job_ids: list[str]) -> dict[str, dict]:
    """{SLURM job id: {"state", "reason"}} from squeue (queued and running jobs, array tasks one by one) and sacct
    (ended jobs); {} where SLURM's commands are not installed or do not answer."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    found: dict[str, dict] = {}
    arrays = sorted({j.split("_")[0] for j in ids})
    if shutil.which("sacct"):
        out = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(arrays)])
        for line in out.splitlines():
            job, _, state = line.partition("|")
            if job in ids:
                found[job] = {"state": state.split()[0] if state else "", "reason": ""}
    if shutil.which("squeue"):
        out = _run(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(arrays)])
        for line in out.splitlines():
            job, state, reason = (line.split("|") + ["", ""])[:3]
            found[job] = {"state": state, "reason": "" if reason == "None" else reason}
    return found


def _run(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _alive(status: dict) -> bool:
    """Whether the process a journal names still runs: by pid on this host, by the journal's heartbeat elsewhere."""
    gone = local_process_gone(status)
    if gone is not None:
        return not gone
    return time.time() - float(status.get("updated") or 0) < STALE_AFTER_S


def _progress(status: dict) -> str:
    progress = status.get("progress") or {}
    if not progress.get("path"):
        return ""
    kept = len(list(Path(progress["path"]).glob("block-*.pt"))) if Path(progress["path"]).is_dir() else 0
    reused = f", {progress['reused']} reused" if progress.get("reused") else ""
    return f"; {progress.get('desc')}: {kept}/{progress.get('blocks')} blocks done{reused}"


def job_state(status: dict | None, slurm: dict | None) -> tuple[str, str]:
    """(state, detail) of one job from its journal (None: it never started) and SLURM's word on it (None: none)."""
    queued = slurm is not None and slurm["state"] in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED")
    if status is None:
        if slurm is not None and slurm["state"] in ("RUNNING", "COMPLETING", "CONFIGURING"):
            return "running", f"SLURM: {slurm['state'].lower()} (starting up)"
        if slurm is not None and not queued:
            return "failed", f"SLURM: {slurm['state']} before the job wrote anything"
        return "not started", f"SLURM: pending ({slurm['reason'] or 'queued'})" if queued else ""
    run_dir = status.get("run_dir")
    state = status.get("state")
    if state == "done":
        check = check_run(Path(run_dir))
        return ("done", run_dir) if check.state == "complete" else ("failed", f"{run_dir}: {check.reason}")
    if state == "failed":
        return "failed", f"{status.get('error')} (log: {status.get('log')})"
    if state == "stopped":
        how = f"stopped at a safe point ({status.get('where')}) on {status.get('signal')}"
        if queued:
            return "requeued", f"{how}; pending in SLURM ({slurm['reason'] or 'queued'}): resumes from the cache"
        if slurm is not None and slurm["state"] == "RUNNING":
            return "running", f"resuming after: {how}"
        return "stopped", f"{how}; the same command resumes it"
    if _alive(status):
        where = where_text(status)
        if slurm is not None and slurm["state"] not in ("RUNNING", "COMPLETING"):
            where += f" (SLURM: {slurm['state'].lower()})"  # e.g. suspended
        if state == "waiting" and status.get("waiting_for"):
            waiting = status["waiting_for"]
            holder = waiting.get("holder") or {}
            return "waiting", (f"{where}: waiting for {waiting.get('what')} (held by {where_text(holder)}; lock "
                               f"{waiting.get('lock')})")
        return "running", f"{where}; stage {status.get('stage') or 'start'}{_progress(status)}"
    if queued:
        return "requeued", f"its process ended ({where_text(status)}); pending in SLURM ({slurm['reason'] or 'queued'})"
    ended = f"; SLURM: {slurm['state']}" if slurm is not None else ""
    log = status.get("submitit_log") or status.get("log")
    return "failed", f"died without a word ({where_text(status)} is gone){ended} (log: {log})"


def sweep_status(sweep_dir: Path, ask_slurm: bool = True) -> list[dict]:
    """One row per job of the sweep at `sweep_dir`: job, config (the overrides that set it apart), state, detail,
    and what is known of where it ran."""
    sweep_dir = Path(sweep_dir)
    planned, journals = planned_jobs(sweep_dir), _journals(sweep_dir)
    manifest = {job["num"]: job for job in read_manifest(sweep_dir).get("jobs", [])}
    numbers = sorted(set(planned) | set(journals))
    shared = shared_overrides(planned.values())
    ids = {n: (journals.get(n) or {}).get("slurm_job") or manifest.get(n, {}).get("job_id") for n in numbers}
    slurm = slurm_states([i for i in ids.values() if i]) if ask_slurm else {}
    rows = []
    for n in numbers:
        status = journals.get(n)
        state, detail = job_state(status, slurm.get(str(ids[n])) if ids[n] else None)
        overrides = planned.get(n) or (status or {}).get("overrides") or []
        rows.append({"job": n, "config": set_apart(overrides, shared),
                     "state": state, "detail": detail, "slurm_job": ids[n],
                     "run_dir": (status or {}).get("run_dir") or _run_file(sweep_dir / str(n)),
                     "log": (status or {}).get("log"), "submitit_log": (status or {}).get("submitit_log")
                     or manifest.get(n, {}).get("submitit_log"), "error": (status or {}).get("error")})
    return rows


def _run_file(job_dir: Path) -> str | None:
    try:
        return (job_dir / RUN_FILE).read_text().strip()
    except OSError:
        return None


def results_status(results_dir: Path) -> list[dict]:
    """One row per run directory under `results_dir`: done, running (its lock's holder is alive), failed (its last
    attempt's .failed.json), or unfinished."""
    root = Path(results_dir)
    names = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    # a run's lock is a hidden sibling (.<run>.lock.d): a running run may have no directory yet
    names |= {p.name[1:-len(LOCK_SUFFIX)] for p in root.glob(f".*{LOCK_SUFFIX}") if p.is_dir()}
    rows = []
    for name in sorted(names):
        run_dir, lock = root / name, lock_path(root / name)
        if not any(path.exists() for path in (run_dir / DONE_FILE, lock, run_dir / FAILED_FILE)):
            continue
        state, detail = "unfinished", "no DONE marker, no holder, no recorded failure"
        owner = read_owner(lock) if lock.is_dir() else None
        if (run_dir / DONE_FILE).exists():
            check = check_run(run_dir)
            state, detail = ("done", "") if check.state == "complete" else ("failed", check.reason)
        elif owner is not None and _lock_alive(lock, owner):
            state, detail = "running", where_text(owner)
        elif (run_dir / FAILED_FILE).exists():
            failed = json.loads((run_dir / FAILED_FILE).read_text())
            state, detail = "failed", f"{failed.get('error')} (log: {failed.get('log')})"
        elif owner is not None:
            state, detail = "failed", f"died holding its lock ({where_text(owner)})"
        rows.append({"run": name, "state": state, "detail": detail})
    return rows


def _lock_alive(lock: Path, owner: dict) -> bool:
    gone = local_process_gone(owner)
    if gone is not None:
        return not gone
    age = heartbeat_age(lock)
    return age is not None and age < STALE_S


def sweep_events(sweep_dir: Path) -> list[dict]:
    """Every job's journal events (harness/journal.py), with the job's number, in the order they happened."""
    events = []
    for path in Path(sweep_dir).glob(f"*/{EVENTS_FILE}"):
        number = int(path.parent.name) if path.parent.name.isdigit() else path.parent.name
        for line in path.read_text().splitlines():
            try:
                events.append({"job": number, **json.loads(line)})
            except ValueError:
                continue  # a line cut short by a killed job
    return sorted(events, key=lambda e: e.get("time", 0))


def _event_text(e: dict) -> str | None:
    """One event as a line of the timeline (None: not worth a line)."""
    kind = e.get("event")
    if kind == "job_start":
        return f"started (run {Path(str(e.get('run_dir'))).name}, host {e.get('host')}, pid {e.get('pid')})"
    if kind == "cache":
        took = f" ({e['seconds']:.1f} s)" if e.get("seconds") is not None and e.get("action") != "reused" else ""
        return f"{e.get('what')}: {e.get('action')}{took}"
    if kind == "lock_wait":
        return f"waiting for {e.get('what')} (held by {where_text(e.get('holder') or {})})"
    if kind == "lock_taken_over":
        return f"took over {e.get('lock')} ({e.get('why')})"
    if kind == "resumed":
        return f"{e.get('desc')}: resumed, {e.get('reused')} of {e.get('total')} blocks kept"
    if kind == "blocks":
        return "; ".join(f"{desc} blocks: {n['computed']} computed, {n['reused']} reused"
                         for desc, n in (e.get("passes") or {}).items())
    if kind == "stopped":
        asked = ", asked submitit to requeue it" if e.get("requeue_asked") else ""
        return f"stopped on {e.get('signal')} at a safe point ({e.get('where')}){asked}"
    if kind == "failed":
        return f"failed: {e.get('error')}"
    if kind == "done":
        return "done"
    return None


def timeline(events: list[dict]) -> str:
    """The events as lines: seconds since the first, job, SLURM job (and its requeue count), what happened."""
    if not events:
        return "no journal events"
    start, lines = events[0].get("time", 0), []
    for e in events:
        text = _event_text(e)
        if text is None:
            continue
        slurm = f"SLURM {e['slurm_job']}" + (f" #{e['slurm_restarts']}" if e.get("slurm_restarts") else "") \
            if e.get("slurm_job") else ""
        lines.append(f"+{e.get('time', 0) - start:7.1f} s  job {e['job']!s:>3}  {slurm:<16}  {text}")
    return "\n".join(lines)


def table(rows: list[dict], key: str) -> str:
    """Rows as aligned text: the key column, state, config (sweeps) and detail."""
    columns = [key, "state"] + (["config"] if rows and "config" in rows[0] else []) + ["detail"]
    cell = lambda row, c: "" if row.get(c) is None else str(row[c])  # noqa: E731
    widths = {c: max([len(c)] + [len(cell(r, c)) for r in rows]) for c in columns[:-1]}
    lines = ["  ".join(c.ljust(widths.get(c, 0)) for c in columns).rstrip()]
    lines += ["  ".join(cell(r, c).ljust(widths.get(c, 0)) for c in columns).rstrip() for r in rows]
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES if any(r["state"] == s for r in rows)}
    return "\n".join(lines + ["", ", ".join(f"{n} {s}" for s, n in counts.items()) or "nothing found"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.status", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a sweep directory (hydra.sweep.dir) or a results directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--events", action="store_true", help="a sweep's timeline: what each job computed, reused, "
                        "waited for, when it stopped and resumed (from the jobs' journals)")
    args = parser.parse_args(argv)
    if not args.path.is_dir():
        print(f"status error: {args.path} is not a directory (give a sweep directory or a results directory)",
              file=sys.stderr)
        return 2
    sweep = (args.path / "multirun.yaml").exists() or bool(read_manifest(args.path))
    if args.events:
        events = sweep_events(args.path)
        print(json.dumps(events, indent=1) if args.json else timeline(events))
        return 0
    rows = sweep_status(args.path) if sweep else results_status(args.path)
    if args.json:
        print(json.dumps({"path": str(args.path), "kind": "sweep" if sweep else "results", "jobs": rows}, indent=1))
    else:
        print(table(rows, "job" if sweep else "run"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
