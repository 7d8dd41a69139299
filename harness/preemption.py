"""Stopping at a safe point when SLURM (or anyone) signals a job, and asking to be requeued.

SLURM warns a job before it ends it: `--signal=USR2@<seconds>` before the time limit (submitit's `signal_delay_s`),
the preemption signal, `scancel --signal=USR1`; `scontrol requeue`, preemption by requeue and `scancel` send SIGTERM
and, KillWait seconds later (30 by default), SIGKILL. A signal handler runs between two bytecodes of whatever the
job is doing, so it must not do the work itself: `StopRequest`'s handler only notes the signal. The run checks it at
its safe points, where everything computed so far is in the cache (between the blocks of a calibrated pass, whose
progress store keeps the finished blocks, and between the stages of a run), and there raises `Preempted`.

The entry point then leaves: after SIGUSR1/SIGUSR2 under submitit, through submitit's own handler, which calls the
launcher's `checkpoint()` (the same job, resubmitted with the same arguments), requeues the job with `scontrol
requeue` and exits; after SIGTERM (SLURM is already requeueing or cancelling the job), or outside submitit, it exits
with status 75 (EX_TEMPFAIL: run the same command again to resume). The next run of the job finds the finished
blocks, the baseline and the quantized weights in the cache and resumes from there (harness/progress.py).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import NoReturn

from harness.journal import note

log = logging.getLogger(__name__)
RETRY_EXIT = 75  # EX_TEMPFAIL: stopped at a safe point; the same command resumes


class Preempted(Exception):
    """Raised at a safe point after a stop was asked for: everything computed so far is kept in the cache."""

    def __init__(self, signum: int, where: str) -> None:
        super().__init__(f"stopped at a safe point ({where}) on {signal.Signals(signum).name}")
        self.signum, self.where = signum, where


def _signals() -> list[signal.Signals]:
    """The signals that ask for a stop: the user signals always (their default action kills the process anyway);
    SIGTERM under SLURM only, where it announces SIGKILL after KillWait (elsewhere it should end the process now)."""
    return [signal.SIGUSR1, signal.SIGUSR2] + ([signal.SIGTERM] if "SLURM_JOB_ID" in os.environ else [])


class StopRequest:
    """While entered (in the main thread), the stop signals are noted instead of acted upon; `check(where)` raises
    Preempted at a safe point once one has arrived. Not entered, it never asks for a stop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._note) for sig in _signals()}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _note(self, signum: int, frame) -> None:  # a signal handler: note it and return, nothing else
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def ask(self, signum: int) -> None:
        """Ask for a stop as the signal `signum` would (for a caller that is not a signal)."""
        self._note(signum, None)

    def check(self, where: str) -> None:
        """Raise Preempted if a stop was asked for; `where` names the safe point (e.g. "after block 14 of 30")."""
        if self.signum is not None:
            raise Preempted(self.signum, where)


def submitit_requeue_handler(stop: StopRequest):
    """The handler submitit installed for its preemption signal before this job started (its
    SignalHandler.checkpoint_and_try_requeue), None outside a submitit job."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    handler = stop.previous.get(getattr(signal, name, None))
    owner = getattr(handler, "__self__", None)
    return handler if owner is not None and type(owner).__module__.startswith("submitit") else None


def leave(err: Preempted, stop: StopRequest) -> NoReturn:
    """After Preempted: requeue through submitit (a user signal inside a submitit job), else exit with RETRY_EXIT."""
    name = signal.Signals(err.signum).name
    handler = submitit_requeue_handler(stop) if err.signum != signal.SIGTERM else None
    note(log, "stopped", "%s: everything computed so far is kept in the cache; %s", err, "asking submitit to requeue "
         "this job" if handler else "the same command resumes it", signal=name, where=err.where,
         requeue_asked=handler is not None)
    if handler is not None:
        stop.__exit__()  # submitit's own handlers again, for the signals its requeue sends
        handler(err.signum, None)  # checkpoints the launcher, `scontrol requeue`s this job and exits
    sys.exit(RETRY_EXIT)
