"""One run, start to finish, as a short list of stages: preflight, load, quantize, pack, evaluate, write.

Data flows one way: RunConfig -> model + tokens -> QuantizationResult -> evaluators -> tidy rows ->
results/<run_id>/. Each stage takes what it needs and returns rows (and fingerprints); nothing is shared by
mutation. A run whose results directory is already complete is skipped (resume), unless `force=true`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import io
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from harness.config import ConfigError, RunConfig
from harness.identity import calibrates, config_hash, quantizes, result_key, run_dir, run_id
from harness.models import (PACKAGED_NOTE, cache_dir_of, decide_streaming, load_model,
                            load_streamed_model, model_fingerprint, resolve_device, weights_stamp)
from harness.preflight import preflight
from harness.pack_stage import pack_stage, pack_streamed, probe_window
from harness.perplexity import eval_windows, evaluate_perplexity
from harness.provenance import device_name, git_sha, peak_memory_mb, versions
from harness.quantize_stage import quantize_stage
from harness.runlock import run_lock
from analysis.results import (BLOCKS_FILE, DOCS_FILE, RunCheck, check_run, read_run, set_aside, to_frame, update_done,
                             write_run)
from harness.teacher import teachers
from kernels.backends import default_backend
from structure.architectures import apply_block_artifacts, layout_for
from structure.pipeline import BlockPipeline

log = logging.getLogger(__name__)


def execute(cfg: RunConfig, config_yaml: str | None = None) -> pd.DataFrame:
    """Run `cfg` (or reuse its finished results, verified and measured on the same weights) and return its rows.
    Bad input is a ConfigError from the preflight, before anything is written (the run's lock directory included)."""
    preflight(cfg, cache_dir_of(cfg), resolve_device(cfg.device))
    out_dir = run_dir(cfg)
    stamp = weights_stamp(cfg.model)
    check = check_run(out_dir)
    if not cfg.force and _reusable(out_dir, check, stamp):
        return read_run(out_dir)
    with run_lock(out_dir) as waited:
        check = check_run(out_dir) if waited else check
        if waited and not cfg.force and _reusable(out_dir, check, stamp):
            return read_run(out_dir)
        if check.state == "damaged":
            set_aside(out_dir, check.reason)
        confirm = check.meta.get("model_fingerprint") if check.state == "complete" and not cfg.force else None
        return _execute(cfg, out_dir, config_yaml, Resume(stamp, confirm))


@dataclasses.dataclass(frozen=True)
class Resume:
    """What a run knows of an earlier finished run in its directory: the weights stamp now, and the fingerprint the
    earlier run measured when only the stamp differs (equal fingerprints: the same weights, the result stands)."""

    stamp: str | None
    confirm_fingerprint: str | None = None


def _reusable(out_dir: Path, check: RunCheck, stamp: str | None) -> bool:
    """Whether the finished run in `out_dir` can be returned as it is; says why not when it cannot."""
    if check.state == "complete" and stamp is not None and check.meta.get("weights_stamp") == stamp:
        log.info("%s is complete: skipping (force=true re-runs it)", out_dir)
        return True
    if check.state == "complete":
        log.info("%s finished on model files that have changed since (weights stamp %s, now %s): checking the "
                 "weights' fingerprint", out_dir, check.meta.get("weights_stamp"), stamp)
    elif check.state == "legacy":
        log.info("%s finished before checksums were recorded (%s): re-running it", out_dir, check.reason)
    elif check.state == "damaged":
        log.warning("%s is damaged (%s): re-running it", out_dir, check.reason)
    return False


def _execute(cfg: RunConfig, out_dir: Path, config_yaml: str | None, resume: Resume) -> pd.DataFrame:
    started_at, t0 = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    cache, device = cache_dir_of(cfg), resolve_device(cfg.device)
    streamed = decide_streaming(cfg.model, cache, device)
    torch.manual_seed(cfg.seed)
    with _loaded(cfg, cache, device, streamed) as (pipeline, tokenizer):
        return _evaluate(cfg, out_dir, config_yaml, pipeline, tokenizer, cache, device, started_at, t0, resume)


def whole_model_keys(cfg: RunConfig) -> list[str]:
    """The settings that need the model held whole in memory (lm-eval, timing, packed kernels; a streamed run packs
    it first)."""
    return [key for key, value in (("kernel", cfg.kernel), ("eval.lm_eval", cfg.eval.lm_eval),
                                   ("eval.timing", cfg.eval.timing)) if value is not None]


def check_packed_fits(cfg: RunConfig, model, layout, device: torch.device) -> None:
    """A streamed run that needs the whole model (lm-eval, timing, kernel) holds it packed; refuse, before any
    weight is read, when even that would not fit comfortably."""
    from harness.pack_stage import packed_size_estimate
    from structure.streaming import available_memory

    size = packed_size_estimate(model, layout, cfg.bits if quantizes(cfg) else None, cfg.group_size)
    free = available_memory(device)
    if size > 0.6 * free:
        wants = whole_model_keys(cfg)
        raise ConfigError(f"{', '.join(wants)} need the model whole in memory: packed it would take ~"
                          f"{size / 2**30:.1f} GiB of the {free / 2**30:.1f} GiB free on {device}; set "
                          f"{'=null '.join(wants)}=null (perplexity and KLD stream), or run on a larger machine")
    log.info("this streamed run packs the model into memory for %s (~%.1f GiB)",
             "kernel/lm-eval/timing", size / 2**30)


@contextlib.contextmanager
def _loaded(cfg: RunConfig, cache: Path, device: torch.device, streamed: bool):
    """(the model's block pipeline, tokenizer): the model loaded whole, or a streamed skeleton whose scratch files go
    when the run ends."""
    if not streamed:
        model, tokenizer = load_model(cfg.model, device, cache)
        yield BlockPipeline(model, layout_for(model), device), tokenizer
        return
    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=cache, prefix=".streaming-"))  # in the cache: artifacts move by rename
    try:
        model, tokenizer, residency = load_streamed_model(cfg.model, device, cache, scratch)
        yield BlockPipeline(model, layout_for(model), device, residency), tokenizer
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _evaluate(cfg: RunConfig, out_dir: Path, config_yaml: str | None, pipeline: BlockPipeline, tokenizer,
              cache: Path, device: torch.device, started_at: str, t0: float, resume: Resume) -> pd.DataFrame:
    model, layout, streamed = pipeline.model, pipeline.layout, pipeline.streamed
    if streamed and whole_model_keys(cfg):
        check_packed_fits(cfg, model, layout, device)
    fingerprint = model_fingerprint(model, pipeline.read)  # of the loaded weights, before any method touches them
    stamp = resume.stamp or weights_stamp(cfg.model)  # a hub id's files are on this machine now
    if fingerprint == resume.confirm_fingerprint:  # the files were touched or copied, the weights are the same
        log.info("%s: the model files changed but their weights did not (fingerprint %s): the finished result "
                 "stands", out_dir, fingerprint)
        update_done(out_dir, weights_stamp=stamp)
        return read_run(out_dir)
    if resume.confirm_fingerprint is not None:
        log.info("%s: the weights changed (fingerprint %s, was %s): re-running", out_dir, fingerprint,
                 resume.confirm_fingerprint)
    shapes = sorted({(m.in_features, m.out_features) for m in layout.quantizable_linears(model).values()})
    windows, data_prints = eval_windows(cfg, tokenizer, layout.spec.needs_bos, cache)
    baseline = teachers(pipeline, windows, data_prints, fingerprint, cache) \
        if cfg.eval.kld else None  # the unquantized model on the eval windows, before any method touches it
    probe = probe_window(windows, model.config.vocab_size, cfg.eval.seqlen, cfg.seed)
    rows, artifacts, extras = [], {}, {}
    if quantizes(cfg):
        stage = quantize_stage(cfg, pipeline, tokenizer, fingerprint, cache)
        rows, artifacts, extras = stage.rows, stage.result.artifacts, stage.result.extras
        if stage.calib_fingerprint is not None:
            data_prints[f"calib:{cfg.calib.source}"] = stage.calib_fingerprint
        if cfg.kernel is not None and not streamed:  # evaluate through the packed layers themselves
            rows += pack_stage(pipeline, artifacts, cfg.kernel, probe)
    prepare = _block_preparer(layout, artifacts)
    ppl = None
    if not (streamed and cfg.kernel is not None):  # ppl of the fake-quantized model (streamed: layer by layer)
        ppl = evaluate_perplexity(pipeline, windows, baseline, cfg.eval.ci_block, prepare)
    if streamed and whole_model_keys(cfg):  # from here on the model is whole in memory, packed
        rows += pack_streamed(pipeline, artifacts, cfg.kernel or default_backend(device), probe, prepare)
        if ppl is None:
            ppl = evaluate_perplexity(pipeline, windows, baseline, cfg.eval.ci_block)
    rows, records = rows + ppl[0], {BLOCKS_FILE: ppl[1]}
    if cfg.eval.lm_eval is not None:
        from harness.lmeval import run_lm_eval

        lm_rows, records[DOCS_FILE] = run_lm_eval(model, tokenizer, cfg.eval.lm_eval, device)
        rows += lm_rows
    if cfg.eval.timing is not None:
        rows += _timing(cfg, pipeline, artifacts, probe, cache, shapes, packed=streamed)
    provenance = {"git_sha": git_sha(), "versions": versions(), "model_fingerprint": fingerprint,
                  "data_fingerprint": json.dumps(data_prints, sort_keys=True), "device": device_name(device),
                  "started_at": started_at, "wall_s": time.perf_counter() - t0, "peak_mem_mb": peak_memory_mb(device)}
    frame = to_frame({**run_columns(cfg), **provenance, **row} for row in rows)
    _write(cfg, out_dir, frame, config_yaml, extras, records, {"model_fingerprint": fingerprint, "weights_stamp": stamp})
    return frame


def _block_preparer(layout, artifacts):
    """How layer-wise evaluation of a streamed model writes each block's quantized weights (None: nothing to do,
    an ordinary model already holds them)."""
    if not artifacts:
        return None
    return lambda i, block: apply_block_artifacts(block, layout.block_prefix(i), layout, artifacts)


def _timing(cfg: RunConfig, pipeline: BlockPipeline, artifacts: dict, probe, cache: Path,
            shapes: list[tuple[int, int]], packed: bool = False) -> list[dict]:
    """Time the packed model (packing it first when the run evaluated fake-quantized weights, which run at fp speed)
    against a freshly loaded unquantized baseline. A streamed run's model is packed already, and its unquantized
    baseline does not fit: it gets no baseline rows."""
    from harness.timing import evaluate_timing

    model, device = pipeline.model, pipeline.device
    backend = cfg.kernel or default_backend(device)
    rows = pack_stage(pipeline, artifacts, backend, probe) if artifacts and cfg.kernel is None and not packed \
        else []
    baseline = load_model(cfg.model, device, cache)[0] if quantizes(cfg) and not packed else None
    return rows + evaluate_timing(cfg.eval.timing, model, baseline, device, cfg.seed, shapes, cfg.group_size, backend)


def run_columns(cfg: RunConfig) -> dict:
    """The run-level columns repeated on every row (None where the run has no such setting)."""
    q, c = quantizes(cfg), calibrates(cfg)
    return {"run_id": run_id(cfg), "config_hash": config_hash(cfg), "model": cfg.model.name, "method": cfg.method.name,
            "bits": cfg.bits if q else None, "group_size": cfg.group_size if q else None,
            "symmetric": cfg.symmetric if q else None, "calib_source": cfg.calib.source if c else None,
            "calib_samples": cfg.calib.n_samples if c else None, "calib_seqlen": cfg.calib.seqlen if c else None,
            "seed": cfg.seed}


def _write(cfg: RunConfig, out_dir: Path, frame: pd.DataFrame, config_yaml: str | None, extras: dict,
           records: dict[str, pd.DataFrame], weights: dict) -> None:
    meta = {"run_id": run_id(cfg), "result_key": result_key(cfg), **weights,
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if cfg.model.source == "packaged":
        meta["note"] = PACKAGED_NOTE
    files = {}
    for name, obj in extras.items():  # e.g. awq_search.pt: written on a cache hit too
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        files[name] = buffer.getvalue()
    for name, table in records.items():  # per-block and per-document records: paired comparisons after the fact
        if not table.empty:
            files[name] = table.to_parquet(index=False)
    config_yaml = config_yaml or yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))
    write_run(out_dir, frame, config_yaml, meta, files)
    log.info("wrote %s", out_dir)
