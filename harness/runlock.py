"""A run-directory lock that also holds on cluster network filesystems, where flock may not be honoured.

The lock is a directory beside the run directory, `.<run>.lock.d`, so a run that dies leaves no run directory
behind (an empty one would look like a run): only a hidden lock, which the next run takes over. It is created with
mkdir (atomic on local and network filesystems alike), holding an owner file
and a heartbeat file that the holder touches every `heartbeat_s` seconds from a background thread. A waiter polls;
a lock whose heartbeat is older than `stale_s` (its holder was killed, or its machine died) is taken over by
renaming it aside (atomic: of several waiters exactly one wins) and creating a fresh one. A holder on this host
whose process no longer exists (killed with -9, say) is known dead at once, without waiting for `stale_s`; the
heartbeat timeout is for holders on other hosts.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)
LOCK_SUFFIX = ".lock.d"
HEARTBEAT = "heartbeat"
HEARTBEAT_S = 10.0
STALE_S = 120.0  # no heartbeat for this long: the holder is gone


def _try_create(lock: Path) -> bool:
    try:
        os.mkdir(lock)
    except FileExistsError:
        return False
    (lock / "owner.json").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                 "since": time.time()}))
    (lock / HEARTBEAT).touch()
    return True


def _age(lock: Path) -> float | None:
    """Seconds since the holder's last heartbeat, None when the lock vanished meanwhile."""
    try:
        return time.time() - (lock / HEARTBEAT).stat().st_mtime
    except FileNotFoundError:
        try:  # created but not yet heartbeated: judge by the directory itself
            return time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return None


def _dead_local_holder(lock: Path) -> int | None:
    """The pid of the lock's holder when it ran on this host and that process is gone, else None."""
    try:
        owner = json.loads((lock / "owner.json").read_text())
    except (OSError, ValueError):
        return None  # not yet written, or vanished: judge by the heartbeat
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return None
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return owner["pid"]
    except PermissionError:  # exists, owned by another user
        return None
    return None


def _take_over(lock: Path, why: str) -> None:
    """Move a stale lock aside (one waiter wins the rename), then delete it."""
    aside = lock.with_name(f"{lock.name}.stale-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rename(lock, aside)
        log.warning("took over the lock %s (%s)", lock, why)
        shutil.rmtree(aside, ignore_errors=True)


def lock_path(out_dir: Path) -> Path:
    """The lock of a run directory: a hidden sibling, `<results>/.<run>.lock.d`."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def run_lock(out_dir: Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S, poll_s: float = 0.5):
    """Hold the run directory's lock; yields True if another process held it first (and we waited for it)."""
    lock, waited = lock_path(out_dir), False
    lock.parent.mkdir(parents=True, exist_ok=True)
    while not _try_create(lock):
        if (dead := _dead_local_holder(lock)) is not None:
            _take_over(lock, f"its holder, pid {dead} on this host, no longer exists")
            continue
        age = _age(lock)
        if age is not None and age > stale_s:
            _take_over(lock, f"no heartbeat for over {stale_s:.0f} s")
            continue
        if not waited:
            log.info("%s is being computed by another process: waiting for it", out_dir)
        waited = True
        time.sleep(poll_s)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat_s):
            with contextlib.suppress(FileNotFoundError):
                os.utime(lock / HEARTBEAT)

    thread = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield waited
    finally:
        stop.set()
        thread.join()
        shutil.rmtree(lock, ignore_errors=True)
