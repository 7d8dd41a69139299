"""Locks that hold on cluster network filesystems, where flock may not be honoured: a run directory's, and one per
shared cache entry (the converted packaged model, a baseline, the prose corpus, quantized weights), so that jobs
starting together compute each entry once and the others wait for it, then verify it as any reuse does.

A lock is a directory holding an owner file (host, pid and the process's start time, SLURM job id, since when) and a
heartbeat file that the holder touches every `heartbeat_s` seconds from a background thread. It is built complete
under a private name, then renamed into place: rename is atomic on local and network filesystems alike and fails
onto a directory that has files, so of several creators exactly one wins and a waiter never sees a lock without its
owner. Released by renaming it aside, then deleting it. A waiter polls; a lock whose heartbeat is older than `stale_s`
(its holder was killed, or its machine died) is taken over the same way (atomic: of several waiters exactly one wins)
and a fresh one created. A holder on this host whose process no longer exists (killed with -9, say), or whose
pid now belongs to another process, is known dead at once, without waiting for `stale_s`; the heartbeat timeout is
for holders on other hosts.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from harness.journal import every, note, process_start, slurm_ids, where_text

log = logging.getLogger(__name__)
LOCK_SUFFIX = ".lock.d"  # a run's lock: a hidden sibling `.<run>.lock.d`; a cache entry's: a sibling `<entry>.lock.d`
OWNER = "owner.json"
HEARTBEAT = "heartbeat"
HEARTBEAT_S = 10.0
STALE_S = 120.0  # no heartbeat for this long: the holder is gone
T = TypeVar("T")


def owner_now(what: str) -> dict:
    """Who holds a lock taken by this process now (written into the lock, shown by `python -m harness.status`)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid()),
            "since": time.time(), "what": what, **slurm_ids()}


def _try_create(lock: Path, what: str) -> bool:
    if lock.exists():
        return False
    private = lock.with_name(f".{lock.name}.new-{uuid.uuid4().hex[:8]}")
    private.mkdir()
    (private / OWNER).write_text(json.dumps(owner_now(what)))
    (private / HEARTBEAT).touch()
    try:
        os.rename(private, lock)  # fails where another creator's lock (which has files) is already in place
    except OSError:
        shutil.rmtree(private, ignore_errors=True)
        return False
    return True


def _remove(lock: Path, tag: str) -> bool:
    """Rename aside, then delete: the lock vanishes at once and whole, never seen half-deleted (an empty directory
    would be taken by the next creator's rename while this one still deleted it). Of several processes removing it,
    one wins the rename: True for that one."""
    aside = lock.with_name(f"{lock.name}.{tag}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(lock, aside)
    except OSError:
        return False
    shutil.rmtree(aside, ignore_errors=True)
    return True


def read_owner(lock: Path) -> dict | None:
    """The holder of `lock` as it recorded itself, None when there is none (yet) or it cannot be read."""
    try:
        owner = json.loads((lock / OWNER).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def heartbeat_age(lock: Path) -> float | None:
    """Seconds since the holder's last heartbeat, None when the lock vanished meanwhile."""
    try:
        return time.time() - (lock / HEARTBEAT).stat().st_mtime
    except FileNotFoundError:
        try:  # created but not yet heartbeated: judge by the directory itself
            return time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return None


def local_process_gone(owner: dict) -> bool | None:
    """Whether the process `owner` names (host, pid, pid_start) is gone: None when it ran on another host (only its
    heartbeat can tell) or cannot be judged."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return None
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by another user
        return False
    started = owner.get("pid_start")
    return started is not None and process_start(owner["pid"]) not in (None, started)  # the pid was reused


def _dead_local_holder(lock: Path) -> int | None:
    """The pid of the lock's holder when it ran on this host and that process is gone, else None."""
    owner = read_owner(lock)
    if owner is None:
        return None  # not yet written, or vanished: judge by the heartbeat
    return owner["pid"] if local_process_gone(owner) else None


def _take_over(lock: Path, why: str) -> None:
    """Remove a stale lock (one waiter wins) and say so."""
    if _remove(lock, "stale"):
        note(log, "lock_taken_over", "took over the lock %s (%s)", lock, why, level=logging.WARNING, lock=str(lock),
             why=why)


@contextlib.contextmanager
def held(lock: Path, what: str, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S,
         poll_s: float = 0.5, stop=None) -> Iterator[bool]:
    """Hold the lock directory `lock` (for `what`, named in logs and in the owner file); yields True if another
    process held it first (and we waited for it). `stop` (harness.preemption.StopRequest) is checked while waiting:
    a job signalled while it waits for another's computation leaves at once (a safe point: it holds nothing yet)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    waited, since = False, time.perf_counter()
    while not _try_create(lock, what):
        if stop is not None:
            stop.check(f"waiting for {what}")
        if (dead := _dead_local_holder(lock)) is not None:
            _take_over(lock, f"its holder, pid {dead} on this host, no longer exists")
            continue
        age = heartbeat_age(lock)
        if age is not None and age > stale_s:
            _take_over(lock, f"no heartbeat for over {stale_s:.0f} s")
            continue
        if not waited:
            holder = read_owner(lock)
            if holder is None and not lock.exists():
                continue  # released meanwhile: try again at once
            holder = holder or {}
            note(log, "lock_wait", "%s is being computed by another process (%s): waiting for it", what,
                 where_text(holder), lock=str(lock), what=what, holder=holder)
        waited = True
        time.sleep(poll_s)
    if waited:
        note(log, "lock_acquired", None, lock=str(lock), what=what, waited_s=round(time.perf_counter() - since, 3))

    def beat() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(lock / HEARTBEAT)

    try:
        with every(heartbeat_s, beat, "lock-heartbeat"):
            yield waited
    finally:
        _remove(lock, "released")


def lock_path(out_dir: Path) -> Path:
    """The lock of a run directory: a hidden sibling, `<results>/.<run>.lock.d`, so a run that dies leaves no run
    directory behind (an empty one would look like a run), only a hidden lock that the next run takes over."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}{LOCK_SUFFIX}"


def run_lock(out_dir: Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S, poll_s: float = 0.5,
             stop=None):
    """Hold the run directory's lock; yields True if another process held it first (and we waited for it)."""
    return held(lock_path(out_dir), f"run {out_dir.name}", heartbeat_s, stale_s, poll_s, stop)


def entry_lock(entry: Path) -> Path:
    """The lock of a cache entry (a file or a directory): the sibling `<entry>.lock.d`."""
    return entry.with_name(entry.name + LOCK_SUFFIX)


def computed_once(entry: Path, kind: str, what: str, load: Callable[[], T | None], compute: Callable[[], T],
                  **lock_options) -> T:
    """The cache entry at `entry`: `load()` (which verifies it and returns None when there is none or it is damaged),
    else computed by exactly one of the processes asking at once: the first takes the entry's lock and runs
    `compute()` (which writes the entry); the others wait for the lock, then load what it wrote (computing it only
    if it is still not there, e.g. its holder died). `kind` ("baseline", ...) and `what` name the entry in the job's
    journal and logs."""
    start = time.perf_counter()
    if (found := load()) is not None:
        note(log, "cache", None, kind=kind, what=what, path=str(entry), action="reused")
        return found
    with held(entry_lock(entry), what, **lock_options) as waited:
        if waited and (found := load()) is not None:
            note(log, "cache", "%s: computed by another process meanwhile; reusing it (verified)", what, kind=kind,
                 what=what, path=str(entry), action="reused after waiting",
                 seconds=round(time.perf_counter() - start, 3))
            return found
        value = compute()
    note(log, "cache", None, kind=kind, what=what, path=str(entry), action="computed",
         seconds=round(time.perf_counter() - start, 3))
    return value
