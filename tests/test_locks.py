"""Shared cache entries are computed once: processes that need the same entry at once (the baseline here) compute it
under its lock, one of them, while the others wait and then read it verified; a holder that died is taken over
(harness/locks.py). What each process did is in its journal (harness/journal.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.journal import EVENTS_FILE, STATUS_FILE, JobJournal, process_start
from harness.locks import OWNER, computed_once, entry_lock, held, read_owner

ROOT = Path(__file__).resolve().parent.parent

# One process of the race: loads the tiny model, waits for the start signal (a file), then asks for the baseline of
# the same windows on the same cache. Computing it is slowed down by a second, so that the two processes overlap
# for sure: the test is about the protocol, not about a race being won by luck.
_BASELINE_JOB = """
import sys, time
from pathlib import Path
import torch
import harness.teacher as teacher
from harness.journal import JobJournal
from harness.models import load_model, model_fingerprint
from structure.architectures import layout_for
from structure.pipeline import BlockPipeline
from test_config import make_config

model_dir, cache, journal_dir, go = map(Path, sys.argv[1:5])
model, _ = load_model(make_config("model=hf", f"model.path={model_dir}").model, "cpu")
pipeline = BlockPipeline(model, layout_for(model), "cpu")
windows = {"textfile": torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))}
slow = teacher.compute_teacher
def compute_slowly(*args, **kwargs):
    time.sleep(1.0)
    return slow(*args, **kwargs)
teacher.compute_teacher = compute_slowly
with JobJournal(journal_dir, {"job": journal_dir.name}).attached():
    while not go.exists():
        time.sleep(0.01)
    teacher.teachers(pipeline, windows, {"eval:textfile": "tokens"}, model_fingerprint(model), cache)
"""


def _events(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / EVENTS_FILE).read_text().splitlines()]


def test_two_processes_on_a_fresh_cache_compute_the_baseline_once(tiny_model_dir, tmp_path):
    go, cache = tmp_path / "go", tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    jobs = [subprocess.Popen([sys.executable, "-c", _BASELINE_JOB, str(tiny_model_dir), str(cache),
                              str(tmp_path / f"job{i}"), str(go)], env=env, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
    deadline = time.time() + 120
    while not all((tmp_path / f"job{i}" / EVENTS_FILE).exists() for i in range(2)) and time.time() < deadline:
        time.sleep(0.05)  # both loaded and journaling: start them together
    go.touch()
    for job in jobs:
        assert job.wait(timeout=300) == 0, job.stderr.read()[-2000:]
    actions = [e["action"] for i in range(2) for e in _events(tmp_path / f"job{i}") if e["event"] == "cache"]
    assert sorted(actions) == ["computed", "reused after waiting"]  # one computed it; the other waited, then read it
    waits = [e for i in range(2) for e in _events(tmp_path / f"job{i}") if e["event"] == "lock_wait"]
    assert len(waits) == 1 and waits[0]["holder"]["pid"] in [job.pid for job in jobs]  # it knew whom it waited for
    assert len(list((cache / "teacher").glob("*.pt"))) == 1 and not list((cache / "teacher").glob("*.lock.d"))


def test_a_dead_holder_of_an_entry_lock_is_taken_over_and_the_entry_computed(tmp_path):
    entry = tmp_path / "cache" / "teacher" / "x.pt"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    lock = entry_lock(entry)
    lock.mkdir(parents=True)
    (lock / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                          "pid_start": process_start(holder.pid)}))
    (lock / "heartbeat").touch()
    holder.kill()  # dies holding the lock, before it wrote the entry
    holder.wait()
    computed = []

    def compute():
        computed.append(1)
        entry.write_text("baseline")
        return "baseline"

    start = time.time()
    assert computed_once(entry, "baseline", "baseline x", lambda: entry.read_text() if entry.exists() else None,
                         compute, stale_s=3600) == "baseline"
    assert computed == [1] and time.time() - start < 30 and not lock.exists()  # at once, not after stale_s


def test_a_live_pid_that_is_not_the_holder_is_known_dead(tmp_path):
    """The holder's pid now belongs to another process (its start time differs): taken over at once."""
    lock = tmp_path / "run" / ".lock.d"
    lock.mkdir(parents=True)
    (lock / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                          "pid_start": process_start(os.getpid()) - 1}))
    (lock / "heartbeat").touch()
    start = time.time()
    with held(lock, "run", stale_s=3600, poll_s=0.05) as waited:
        assert waited is False and time.time() - start < 10


def test_the_journal_says_what_a_job_waits_for_and_whom(tmp_path):
    lock = tmp_path / "entry.lock.d"
    journal = JobJournal(tmp_path / "job", {"job": 7, "run_dir": str(tmp_path / "run")})
    holding, release = threading.Event(), threading.Event()

    def hold():
        with held(lock, "baseline wiki"):
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(30)
    def wait_then_hold():
        with held(lock, "baseline wiki", poll_s=0.05):
            pass

    with journal.attached():
        waiter = threading.Thread(target=wait_then_hold)
        waiter.start()
        deadline = time.time() + 30
        status = {}
        while status.get("state") != "waiting" and time.time() < deadline:
            time.sleep(0.05)
            status = json.loads((tmp_path / "job" / STATUS_FILE).read_text())
        assert status["state"] == "waiting" and status["job"] == 7
        assert status["waiting_for"]["what"] == "baseline wiki"
        assert status["waiting_for"]["holder"]["pid"] == os.getpid()
        release.set()
        holder.join()
        waiter.join(30)
        assert json.loads((tmp_path / "job" / STATUS_FILE).read_text())["state"] == "running"
    assert not lock.exists()


@pytest.mark.parametrize("pid_start_offset, gone", [(0, False), (-1, True)])
def test_a_recorded_process_is_gone_when_its_pid_names_another(pid_start_offset, gone):
    from harness.locks import local_process_gone

    owner = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid())
             + pid_start_offset}
    assert local_process_gone(owner) is gone
    assert local_process_gone({**owner, "host": "another-host"}) is None  # only its heartbeat can tell


def test_a_job_signalled_while_it_waits_for_a_lock_leaves_at_once(tmp_path):
    """Waiting for another job's computation is a safe point: the waiter holds nothing yet."""
    import signal

    from harness.preemption import Preempted, StopRequest

    lock = tmp_path / "q.pt.lock.d"
    with held(lock, "quantized weights (gptq)"):  # another job quantizes
        stop = StopRequest()
        stop.ask(signal.SIGTERM)
        with pytest.raises(Preempted, match="waiting for quantized weights"):
            with held(lock, "quantized weights (gptq)", poll_s=0.01, stop=stop):
                pass


def test_a_lock_is_never_seen_without_its_owner(tmp_path):
    """The CI failure of stop 35: a waiter read the lock between its creation and its owner file, and recorded a
    holder with no pid. A lock now appears whole (built aside, renamed into place) and vanishes whole (renamed
    aside, then deleted), so a watcher polling as fast as it can never finds the directory without a readable owner."""
    lock, seen_bare, stop = tmp_path / "entry.lock.d", [], threading.Event()

    def watch():
        while not stop.is_set():
            if lock.is_dir() and (owner := read_owner(lock)) is None and lock.is_dir():
                seen_bare.append(owner)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(300):
            with held(lock, "an entry", heartbeat_s=60):
                pass
    finally:
        stop.set()
        watcher.join()
    assert not seen_bare
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left behind: no private or set-aside copies


def test_of_creators_racing_for_one_lock_exactly_one_holds_it_at_a_time(tmp_path):
    lock, inside, overlaps = tmp_path / "entry.lock.d", [], []

    def worker():
        for _ in range(40):
            with held(lock, "an entry", heartbeat_s=60, poll_s=0.001):
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(len(inside))
                time.sleep(0.0005)
                inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not overlaps
