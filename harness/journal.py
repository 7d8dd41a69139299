"""A job's journal: what it computed, reused and waited for, and where it stands (read by `python -m harness.status`).

A module records an event with `note(log, event, message, *args, **fields)`: the message (if any) is an ordinary log
line of its own logger; the event and its fields go to the `harness.journal` logger, which prints nothing itself.
The entry point attaches a `JobJournal` to that logger for the one job it runs; it keeps, in the job's output
directory (Hydra's, e.g. <sweep dir>/<job number>/):
- `events.jsonl`: every event, one JSON object per line, with its time, host, pid and SLURM job id (a requeued job
  appends to it: the file is the job's whole history);
- `job_status.json`: where the job stands now (running, waiting, stopped, failed, done), on which host and pid, under
  which SLURM job, in which stage, what it waits for, its run directory and logs. It is rewritten atomically at every
  change and every HEARTBEAT_S seconds, so that its age tells a reader on another host whether the job is alive.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from analysis.integrity import atomic_write_text

JOURNAL = logging.getLogger("harness.journal")
JOURNAL.propagate = False  # events are not log lines: only a JobJournal sees them
JOURNAL.setLevel(logging.INFO)
STATUS_FILE = "job_status.json"
EVENTS_FILE = "events.jsonl"
HEARTBEAT_S = 15.0


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22), None where unknown: with the
    pid it names one process, so a pid reused by another process is not taken for the one recorded."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def slurm_ids() -> dict:
    """This process's SLURM job ("<array job>_<task>" for an array task) and how often it was requeued; {} outside
    SLURM."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return {}
    job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_TASK_ID" in env \
        else env["SLURM_JOB_ID"]
    return {"slurm_job": job, "slurm_job_id": env["SLURM_JOB_ID"],
            "slurm_restarts": int(env.get("SLURM_RESTART_COUNT", "0") or 0)}


@contextlib.contextmanager
def every(seconds: float, action, name: str):
    """Call `action()` every `seconds` on a daemon thread while the block runs (a heartbeat); stopped and joined on
    the way out."""
    done = threading.Event()

    def loop() -> None:
        while not done.wait(seconds):
            action()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def where_text(process: dict) -> str:
    """'host vm, pid 123, SLURM job 45_1 (requeued 1x)': what a job's status or a lock's owner file records of the
    process (owner_now, JobJournal), '?' for what it does not say."""
    parts = [f"host {process.get('host', '?')}", f"pid {process.get('pid', '?')}"]
    if process.get("slurm_job"):
        restarts = process.get("slurm_restarts") or 0
        parts.append(f"SLURM job {process['slurm_job']}" + (f" (requeued {restarts}x)" if restarts else ""))
    return ", ".join(parts)


def note(logger: logging.Logger, event: str, message: str | None, *args, level: int = logging.INFO,
         **fields) -> None:
    """Log `message % args` on `logger` (None: no log line), and record `event` with `fields` in the job's journal."""
    if message is not None:
        logger.log(level, message, *args)
    if JOURNAL.handlers:
        JOURNAL.info(event, extra={"journal": {"event": event, **fields}})


# How each event moves the job's state (events not listed leave it as it is).
STATE_OF = {"job_start": "running", "lock_wait": "waiting", "lock_acquired": "running", "stopped": "stopped",
            "failed": "failed", "done": "done"}


class JobJournal(logging.Handler):
    """Keeps one job's events and its status file (module docstring); attach it with `attached()`."""

    def __init__(self, directory: Path, job: dict) -> None:
        super().__init__(logging.INFO)
        self.directory = Path(directory)
        self.status = {"state": "starting", "host": socket.gethostname(), "pid": os.getpid(),
                       "pid_start": process_start(os.getpid()), **slurm_ids(), **job, "started": time.time(),
                       "stage": None, "waiting_for": None}

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "journal", None)
        if not isinstance(fields, dict):
            return
        fields = {"time": record.created, "host": self.status["host"], "pid": self.status["pid"],
                  **{k: v for k, v in slurm_ids().items() if k in ("slurm_job", "slurm_restarts")}, **fields}
        event = fields["event"]
        with open(self.directory / EVENTS_FILE, "a") as f:
            f.write(json.dumps(fields, default=str) + "\n")
        self.status["state"] = STATE_OF.get(event, self.status["state"])
        if event == "lock_wait":
            self.status["waiting_for"] = {k: fields.get(k) for k in ("what", "lock", "holder")}
        elif event in ("lock_acquired", "lock_taken_over"):
            self.status["waiting_for"] = None
        elif event == "stage":
            self.status["stage"] = fields.get("stage")
        elif event == "pass":  # a calibrated pass keeping its blocks in `path` (status counts them there)
            self.status["progress"] = {k: fields.get(k) for k in ("desc", "path", "blocks", "reused")}
        elif event in ("stopped", "failed", "done"):
            self.status.update({k: v for k, v in fields.items() if k not in ("event", "time", "host", "pid")})
        self._write()

    def _write(self) -> None:
        self.status["updated"] = time.time()
        atomic_write_text(self.directory / STATUS_FILE, json.dumps(self.status, indent=1, default=str) + "\n")

    @contextlib.contextmanager
    def attached(self):
        """While active, the journal records this process's events and its status file has a heartbeat."""
        self.directory.mkdir(parents=True, exist_ok=True)
        JOURNAL.addHandler(self)

        def beat() -> None:
            with self.lock:  # the handler's lock: not while an event is being written
                self._write()

        try:
            note(logging.getLogger(__name__), "job_start", None, **{k: self.status.get(k) for k in ("job", "run_dir")})
            with every(HEARTBEAT_S, beat, "journal-heartbeat"):
                yield self
        finally:
            JOURNAL.removeHandler(self)
