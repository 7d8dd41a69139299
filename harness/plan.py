"""The run plan: how a run computes, decided once, before any weight is read.

Whether the model is streamed, whether it must be made whole in memory, which backend packs it and at which point
of the run — and so which evaluators see fake-quantized weights and which see packed layers. `harness/run.py`
executes the plan as a straight line of stages; nothing later re-decides any of it.
"""
from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.config import ConfigError, RunConfig
from harness.identity import quantizes
from harness.models import cache_dir_of, decide_streaming, resolve_device
from kernels.backends import default_backend

log = logging.getLogger(__name__)


class PackAt(enum.Enum):
    """Where in the run the quantized linears become packed layers (every later evaluator sees those)."""

    NEVER = "never: every evaluator sees the fake-quantized weights"
    BEFORE_PPL = "before perplexity: kernel=... evaluates through the packed layers themselves"
    AFTER_PPL = ("after perplexity: a streamed model is evaluated layer by layer, then made whole and packed "
                 "block by block for lm-eval and timing")
    BEFORE_TIMING = "before timing: perplexity and lm-eval see fake-quantized weights, timing the packed layers"


@dataclass(frozen=True)
class Resume:
    """What a run knows of an earlier finished run in its directory: the weights stamp now, and the fingerprint the
    earlier run measured when only the stamp differs (equal fingerprints: the same weights, the result stands)."""

    stamp: str | None
    confirm_fingerprint: str | None = None


@dataclass(frozen=True)
class RunPlan:
    """Everything about how one run computes (what it computes is its RunConfig)."""

    out_dir: Path
    cache: Path
    device: torch.device
    streamed: bool  # decoder blocks streamed from the checkpoint, one at a time
    quantizes: bool
    whole_model: tuple[str, ...]  # the settings that need the model whole in memory (a streamed run packs it)
    backend: str | None  # the backend that packs (None: nothing is packed)
    pack_at: PackAt
    resume: Resume

    def describe(self) -> str:
        held = "streamed block by block" if self.streamed else "held in memory"
        packing = "nothing is packed" if self.pack_at is PackAt.NEVER else \
            f"packed with {self.backend} {self.pack_at.value}"
        return f"run plan: the model is {held} on {self.device}; {packing}"


def whole_model_keys(cfg: RunConfig) -> tuple[str, ...]:
    """The settings that need the model held whole in memory (lm-eval, timing, packed kernels)."""
    return tuple(key for key, value in (("kernel", cfg.kernel), ("eval.lm_eval", cfg.eval.lm_eval),
                                        ("eval.timing", cfg.eval.timing)) if value is not None)


def huge_pages_for(streamed: bool) -> None:
    """Large CPU tensors on transparent huge pages (torch's THP_MEM_ALLOC_ENABLE) for a streamed run only.

    A streamed run allocates and frees block-sized tensors (casts, quantization temporaries) again and again; on
    huge pages they fault in 2 MiB at a time (a streamed 13B run: 94% fewer page faults, 14% less wall time,
    docs/memory.md). A model in memory reuses heap memory instead, where huge pages only add the kernel's
    compaction stalls (THP defrag "madvise"): AWQ on the packaged model ran 15% slower with them, GPTQ the same
    (benchmarks/profile_quantize.py).
    torch reads the variable once, at the process's first allocation of 2 MiB or more, so the first run of a
    process decides (a sweep's first job); a THP_MEM_ALLOC_ENABLE set in the environment always wins."""
    if streamed:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def plan_run(cfg: RunConfig, out_dir: Path, resume: Resume) -> RunPlan:
    """Decide how `cfg` runs; reads at most the checkpoint's index, never a weight."""
    cache, device = cache_dir_of(cfg), resolve_device(cfg.device)
    streamed = decide_streaming(cfg.model, cache, device)
    huge_pages_for(streamed)
    if streamed and cfg.export is not None:
        raise ConfigError(f"export={cfg.export} needs the model whole in memory and this run streams it (it would not "
                          "fit comfortably); set export=null, or model.streaming=false on a larger machine")
    whole = whole_model_keys(cfg)
    pack_at = _pack_point(cfg, streamed, whole)
    backend = None if pack_at is PackAt.NEVER else cfg.kernel or default_backend(device)
    plan = RunPlan(out_dir, cache, device, streamed, quantizes(cfg), whole, backend, pack_at, resume)
    log.info("%s", plan.describe())
    return plan


def _pack_point(cfg: RunConfig, streamed: bool, whole: tuple[str, ...]) -> PackAt:
    if streamed and whole:  # the whole model fits only packed; perplexity can stream before that, unless kernel=...
        return PackAt.BEFORE_PPL if cfg.kernel is not None else PackAt.AFTER_PPL
    if streamed or not quantizes(cfg):
        return PackAt.NEVER
    if cfg.kernel is not None:
        return PackAt.BEFORE_PPL
    return PackAt.BEFORE_TIMING if cfg.eval.timing is not None else PackAt.NEVER
