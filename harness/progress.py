"""A quantization's finished blocks, kept in the cache beside the entry they will become, so that a run stopped by a
signal, killed or requeued resumes after them (structure/progress.py says what a finished block holds).

`<cache>/quantized/<entry hash>.progress/` holds, per calibrated pass of the quantization (AWQ+GPTQ runs two), a
directory `pass-<n>/` with one sealed file per finished block (`block-<i>.pt`: its artifacts, what its step changed
in place, its record) and `inputs.pt`, the number of blocks done and the next block's inputs. The entry's key (model
fingerprint, method, spec, calibration tokens, code: harness/identity.py `quantization_key`) is what the directory is
named by and what every file carries: progress is reused only for exactly the quantization it was computed for, and
only after every file of it has matched its checksum. Anything else (damaged, foreign, another number of blocks) is
moved aside with a warning and the pass starts from its first block.

Block files are written as blocks finish; `inputs.pt` (the large one: calibration samples x tokens x hidden) at
most every `every_s` seconds, after the last block, and whenever a stop was asked for, after which the pass stops
there (harness/preemption.py). The directory goes once the quantized weights are in the cache.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from analysis.integrity import IntegrityError, aside_path, read_sealed
from harness.identity import stable_hash
from harness.journal import note
from harness.preemption import StopRequest
from harness.sealed import load_sealed, save_sealed
from structure.progress import FinishedBlock

log = logging.getLogger(__name__)
INPUTS = "inputs.pt"


def progress_directory(entry: Path) -> Path:
    """Where the progress of the quantization cache entry `entry` (<hash>.pt) is kept."""
    return entry.with_suffix(".progress")


class KeptBlocks(Sequence):
    """The finished blocks 0..n-1 of a pass, each read from its file (verified again) when asked for: a pass over a
    streamed model never holds them all."""

    def __init__(self, directory: Path, n: int, key: str) -> None:
        self.directory, self.n, self.key = directory, n, key

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        stored = load_sealed(self.directory / f"block-{i}.pt", weights_only=False)  # our own
        if stored.get("key") != self.key or stored.get("index") != i:
            raise IntegrityError(self.directory / f"block-{i}.pt", "holds another quantization's block")
        return FinishedBlock(i, stored["artifacts"], stored["changed"], tuple(stored["from_artifacts"]),
                             stored["record"], stored.get("routing"))


class PassOnDisk:
    """One calibrated pass's kept progress (structure.progress.PassProgress)."""

    def __init__(self, directory: Path, key: str, desc: str, n_blocks: int, stop: StopRequest,
                 every_s: float | None) -> None:
        self.directory, self.key, self.desc, self.n_blocks = directory, key, desc, n_blocks
        self.stop, self.every_s = stop, every_s
        self.finished: Sequence[FinishedBlock] = ()
        self.next_inputs: torch.Tensor | None = None
        self.computed = 0
        self._saved_at = time.monotonic()
        if directory.exists():
            self._resume()
        directory.mkdir(parents=True, exist_ok=True)
        note(log, "pass", None, desc=desc, path=str(directory), blocks=n_blocks, reused=len(self.finished))

    def _resume(self) -> None:
        """Take what is kept, after checking every file of it; set it aside when anything does not match."""
        try:
            state = load_sealed(self.directory / INPUTS, weights_only=False)
            if (state.get("key"), state.get("desc"), state.get("n_blocks")) != (self.key, self.desc, self.n_blocks):
                raise IntegrityError(self.directory / INPUTS, "kept for another quantization or pass")
            done = int(state["done"])
            for i in range(done):
                read_sealed(self.directory / f"block-{i}.pt")  # every checksum before anything is restored
        except FileNotFoundError:
            if any(self.directory.iterdir()):
                log.info("%s: blocks were kept but not the inputs that follow them: starting from block 0",
                         self.directory)
            return
        except Exception as err:  # noqa: BLE001 -- damaged or foreign: never restored, set aside
            aside = aside_path(self.directory)
            self.directory.rename(aside)
            log.warning("%s: kept progress not usable (%s): moved aside to %s; starting from block 0",
                        self.directory, getattr(err, "reason", err), aside.name)
            return
        self.finished = KeptBlocks(self.directory, done, self.key)
        self.next_inputs = state["next_inputs"]
        note(log, "resumed", "%s: resuming after block %d of %d (counted from 1), kept in %s", self.desc, done,
             self.n_blocks, self.directory, desc=self.desc, reused=done, total=self.n_blocks,
             path=str(self.directory))

    def keep(self, block: FinishedBlock, next_inputs: torch.Tensor, n_blocks: int) -> None:
        save_sealed(self.directory / f"block-{block.index}.pt",
              {"key": self.key, "index": block.index, "artifacts": block.artifacts, "changed": block.changed,
               "from_artifacts": list(block.from_artifacts), "record": block.record,
               "routing": block.routing})
        self.computed += 1
        last = block.index + 1 == n_blocks
        due = self.every_s is not None and time.monotonic() - self._saved_at >= self.every_s
        if last or due or self.stop.requested:
            save_sealed(self.directory / INPUTS, {"key": self.key, "desc": self.desc, "n_blocks": n_blocks,
                                            "done": block.index + 1, "next_inputs": None if last else next_inputs})
            self._saved_at = time.monotonic()
        if not last:
            # counted from 1, as "resumed, 16 of 30 blocks kept" counts them when the job comes back
            self.stop.check(f"{self.desc}: after block {block.index + 1} of {n_blocks}, kept in {self.directory}")


class ProgressStore:
    """The kept progress of one quantization (structure.progress.BlockProgress), at `directory`, for `key`.

    every_s: seconds between saves of the next block's inputs (0: after every block; None: only when a stop is asked
    for, or the pass ends). stop: asked between blocks; when set, the pass saves and stops there."""

    def __init__(self, directory: Path, key: dict, stop: StopRequest | None = None,
                 every_s: float | None = 60.0) -> None:
        self.directory, self.key = Path(directory), stable_hash(key, 64)
        self.stop, self.every_s = stop or StopRequest(), every_s
        self.passes: list[PassOnDisk] = []

    def open_pass(self, desc: str, n_blocks: int) -> PassOnDisk:
        kept = PassOnDisk(self.directory / f"pass-{len(self.passes)}", self.key, desc, n_blocks, self.stop,
                          self.every_s)
        self.passes.append(kept)
        return kept

    def summary(self) -> dict:
        """Blocks reused from kept progress and computed by this run, per pass."""
        return {p.desc: {"reused": len(p.finished), "computed": p.computed} for p in self.passes}

    def discard(self) -> None:
        """Forget the kept progress (the quantization it served is in the cache now, or must start over)."""
        shutil.rmtree(self.directory, ignore_errors=True)
