"""One run, start to finish: preflight, reuse or plan (harness/plan.py), then a straight line of numbered stages.

Data flows one way: RunConfig -> run plan -> model + tokens -> QuantizationResult -> evaluators -> tidy rows ->
results/<run_id>/. Each stage takes the plan and what the stages before returned and returns rows; nothing is
shared by mutation. A run whose results directory is complete and verified is skipped (resume), unless
`force=true`.
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
from harness.identity import (calibrates, config_hash, declared_spec, quantizes, replicate_of, result_key, run_dir,
                              run_id, source_of)
from harness.models import (PACKAGED_NOTE, cache_dir_of, load_model, load_streamed_model, model_fingerprint,
                            resolve_device, weights_stamp)
from harness.pack_stage import pack, probe_window
from harness.plan import PackAt, Resume, RunPlan, plan_run
from harness.preflight import export_refusal, preflight
from harness.perplexity import eval_windows, evaluate_perplexity
from harness.provenance import device_name, git_sha, peak_memory_mb, versions
from harness.quantize_stage import quantize_stage
from harness.journal import note
from harness.locks import run_lock
from harness.preemption import StopRequest
from analysis.results import (BLOCKS_FILE, DOCS_FILE, RunCheck, check_run, read_run, set_aside, to_frame, update_done,
                             write_run)
from harness.teacher import teachers
from kernels.backends import default_backend
from structure.architectures import BlockArtifacts, layout_for
from structure.pipeline import BlockPipeline

log = logging.getLogger(__name__)


def execute(cfg: RunConfig, config_yaml: str | None = None, stop: StopRequest | None = None) -> pd.DataFrame:
    """Run `cfg` (or reuse its finished results, verified and measured on the same weights) and return its rows.
    Bad input is a ConfigError from the preflight, before anything is written (the run's lock directory included).
    `stop` (harness/preemption.py) is checked at the run's safe points: between the blocks of a quantization and
    between stages, where what was computed is in the cache; it raises Preempted there once a signal asked for it."""
    preflight(cfg, cache_dir_of(cfg), resolve_device(cfg.device))
    out_dir = run_dir(cfg)
    stamp = weights_stamp(cfg.model)
    check = check_run(out_dir)
    if not cfg.force and _reusable(out_dir, check, stamp):
        return read_run(out_dir)
    with run_lock(out_dir, stop=stop) as waited:
        check = check_run(out_dir) if waited else check
        if waited and not cfg.force and _reusable(out_dir, check, stamp):
            return read_run(out_dir)
        if check.state == "damaged":
            set_aside(out_dir, check.reason)
        confirm = check.meta.get("model_fingerprint") if check.state == "complete" and not cfg.force else None
        clock = StageClock()
        with clock("plan"):  # the packaged model's one-time conversion happens here
            plan = plan_run(cfg, out_dir, Resume(stamp, confirm))
        return run_plan(cfg, plan, config_yaml, clock, stop or StopRequest())


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


def run_plan(cfg: RunConfig, plan: RunPlan, config_yaml: str | None, clock: StageClock,
             stop: StopRequest) -> pd.DataFrame:
    """The run as numbered stages, each taking the plan and what the stages before it returned. Each stage's wall
    time is a `suite=stage` row (plan_s, load_s, fingerprint_s, baseline_s, quantize_s, pack_s, ppl_s, lm_eval_s,
    timing_s), so a run shows where its time went. `clock` was started before planning (plan_s, where the packaged
    model is converted): the run's wall time starts with it."""
    started_at, t0 = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), clock.started
    torch.manual_seed(cfg.seed)
    with clock("load"), _loaded(cfg, plan) as (pipeline, tokenizer):
        clock.stop("load")
        # 1. a streamed run that needs the model whole must fit it packed: refused before any weight is read
        if plan.streamed and plan.whole_model:
            check_packed_fits(cfg, plan, pipeline)
        # 1b. a checkpoint made elsewhere must belong to this model, an export must fit its shapes (the preflight
        # checked both if the model was on this machine)
        check_model_fits_method(cfg, pipeline, tokenizer)
        check_export_fits(cfg, pipeline)
        # 2. what the run measures: the weights' fingerprint (the same weights behind touched files: result stands)
        with clock("fingerprint"):
            fingerprint = model_fingerprint(pipeline.model, pipeline.read)
        if plan.resume.confirm_fingerprint is not None:
            if fingerprint == plan.resume.confirm_fingerprint:
                return _confirmed(plan, fingerprint)
            log.info("%s: the weights changed (fingerprint %s, was %s): re-running", plan.out_dir, fingerprint,
                     plan.resume.confirm_fingerprint)
        # 3. the eval windows, and the unquantized model on them (the KLD baseline), before any method runs
        with clock("baseline"):
            windows, prints = eval_windows(cfg, tokenizer, pipeline.layout.spec.needs_bos, plan.cache)
            baseline = teachers(pipeline, windows, prints, fingerprint, plan.cache) if cfg.eval.kld else None
        stop.check("after the baseline, kept in the cache")
        probe = probe_window(windows, pipeline.model.config.vocab_size, cfg.eval.seqlen, cfg.seed)
        shapes = linear_shapes(pipeline)  # the unpacked linears' shapes, for timing's GEMM microbenchmark
        # 4. quantize, or reuse the cache: artifacts, and the model fake-quantized
        with clock("quantize"):
            quant = quantize_stage(cfg, pipeline, tokenizer, fingerprint, plan.cache, stop) \
                if plan.quantizes else None
        stop.check("after the quantization, kept in the cache")
        artifacts, rows = (quant.result.artifacts, quant.rows) if quant else ({}, [])
        exported = {}
        if cfg.export is not None:  # the checkpoint of exactly the weights evaluated below, before anything packs
            from harness.export_stage import export_files, made_by

            with clock("export"):
                exported = export_files(pipeline.model, artifacts, cfg.export, declared_spec(cfg), tokenizer,
                                        made_by(run_columns(cfg)))
        prepare = _block_preparer(pipeline, artifacts)
        # 5. pack here when every evaluator is to see the packed layers (kernel=...)
        if plan.pack_at is PackAt.BEFORE_PPL:
            with clock("pack"):
                rows += pack(pipeline, artifacts, plan.backend, probe, prepare)
        # 6. perplexity, KLD against the baseline, per-block records (a streamed model: layer by layer)
        with clock("ppl"):
            ppl_rows, blocks = evaluate_perplexity(pipeline, windows, baseline, cfg.eval.ci_block, prepare)
        rows, records = rows + ppl_rows, {BLOCKS_FILE: blocks}
        stop.check("after perplexity (the quantization and the baseline are in the cache)")
        # 7. a streamed model needed whole: made whole, its linears packed block by block as they arrive
        if plan.pack_at is PackAt.AFTER_PPL:
            with clock("pack"):
                rows += pack(pipeline, artifacts, plan.backend, probe, prepare)
        # 8. lm-eval
        if cfg.eval.lm_eval is not None:
            from harness.lmeval import run_lm_eval

            with clock("lm_eval"):
                lm_rows, records[DOCS_FILE] = run_lm_eval(pipeline.model, tokenizer, cfg.eval.lm_eval, plan.device)
            rows += lm_rows
        # 9. timing, through packed layers (packed here when the evaluators before saw fake-quantized weights)
        if plan.pack_at is PackAt.BEFORE_TIMING:
            with clock("pack"):
                rows += pack(pipeline, artifacts, plan.backend, probe)
        if cfg.eval.timing is not None:
            with clock("timing"):
                rows += _timing(cfg, plan, pipeline, shapes)
        # 10. the rows with their provenance, written atomically (DONE, with every file's checksum, last)
        rows += clock.rows()
        log.info("stage wall times: %s", clock.text())
        calib = {f"calib:{cfg.calib.source}": quant.calib_fingerprint} if quant and quant.calib_fingerprint else {}
        provenance = {"git_sha": git_sha(), "versions": versions(), "model_fingerprint": fingerprint,
                      "data_fingerprint": json.dumps({**prints, **calib}, sort_keys=True),
                      "device": device_name(plan.device), "started_at": started_at, "wall_s": time.perf_counter() - t0,
                      "peak_mem_mb": peak_memory_mb(plan.device)}
        frame = to_frame({**run_columns(cfg), **provenance, **row} for row in rows)
        extras = quant.result.extras if quant else {}
        _write(cfg, plan, frame, config_yaml, extras, records, fingerprint, exported)
        return frame


class StageClock:
    """Wall time per named stage of a run (a stage entered twice adds up): `with clock("ppl"): ...`."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self._open: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        note(log, "stage", None, stage=name)
        self._open[name] = time.perf_counter()
        try:
            yield
        finally:
            self.stop(name)

    def stop(self, name: str) -> None:
        """End `name` now (a no-op when it already ended), e.g. inside the `with` that opened it."""
        start = self._open.pop(name, None)
        if start is not None:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def rows(self) -> list[dict]:
        return [{"suite": "stage", "task": "all", "metric": f"{name}_s", "value": value}
                for name, value in self.seconds.items()]

    def text(self) -> str:
        return ", ".join(f"{name} {value:.1f} s" for name, value in self.seconds.items())


def check_packed_fits(cfg: RunConfig, plan: RunPlan, pipeline: BlockPipeline) -> None:
    """A streamed run that needs the whole model (lm-eval, timing, kernel) holds it packed; refuse, before any
    weight is read, when even that would not fit comfortably."""
    from harness.pack_stage import packed_size_estimate
    from structure.streaming import available_memory

    size = packed_size_estimate(pipeline.model, pipeline.layout, cfg.bits if plan.quantizes else None,
                                cfg.group_size)
    free = available_memory(plan.device)
    if size > 0.6 * free:
        wants = plan.whole_model
        raise ConfigError(f"{', '.join(wants)} need the model whole in memory: packed it would take ~"
                          f"{size / 2**30:.1f} GiB of the {free / 2**30:.1f} GiB free on {plan.device}; set "
                          f"{'=null '.join(wants)}=null (perplexity and KLD stream), or run on a larger machine")
    log.info("this streamed run packs the model into memory for %s (~%.1f GiB)", ", ".join(plan.whole_model),
             size / 2**30)


def check_model_fits_method(cfg: RunConfig, pipeline: BlockPipeline, tokenizer) -> None:
    """The method's own refusal of this model (method=checkpoint: a checkpoint of another model), before anything is
    measured."""
    from methods import build_method

    try:
        build_method(cfg.method).check_model(pipeline.model, tokenizer)
    except ValueError as err:
        raise ConfigError(f"method={cfg.method.name}: {err}") from None


def check_export_fits(cfg: RunConfig, pipeline: BlockPipeline) -> None:
    """export=...: the format can hold this model's linears (a group size dividing each one's inputs, ...), checked
    on the loaded model before anything is quantized."""
    if cfg.export is None:
        return
    why = export_refusal(cfg, pipeline.model)
    if why is not None:
        raise ConfigError(f"export={cfg.export}: {why}")


def _confirmed(plan: RunPlan, fingerprint: str) -> pd.DataFrame:
    """The finished result, re-stamped: the model files changed, the weights did not."""
    log.info("%s: the model files changed but their weights did not (fingerprint %s): the finished result stands",
             plan.out_dir, fingerprint)
    update_done(plan.out_dir, weights_stamp=plan.resume.stamp)
    return read_run(plan.out_dir)


def linear_shapes(pipeline: BlockPipeline) -> list[tuple[int, int]]:
    """The distinct (in_features, out_features) of the quantizable linears (read from a skeleton too)."""
    model = pipeline.model
    return sorted({(m.in_features, m.out_features) for m in pipeline.layout.quantizable_linears(model).values()})


@contextlib.contextmanager
def _loaded(cfg: RunConfig, plan: RunPlan):
    """(the model's block pipeline, tokenizer): the model loaded whole, or a streamed skeleton whose scratch files go
    when the run ends."""
    if not plan.streamed:
        model, tokenizer = load_model(cfg.model, plan.device, plan.cache)
        yield BlockPipeline(model, layout_for(model), plan.device, moe_routing=_routing(cfg)), tokenizer
        return
    plan.cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=plan.cache, prefix=".streaming-"))  # in the cache: artifacts move by rename
    try:
        model, tokenizer, residency = load_streamed_model(cfg.model, plan.device, plan.cache, scratch)
        yield BlockPipeline(model, layout_for(model), plan.device, residency, _routing(cfg)), tokenizer
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _routing(cfg: RunConfig) -> str:
    return cfg.calib.moe_routing or "routed"


def _block_preparer(pipeline: BlockPipeline, artifacts) -> BlockArtifacts | None:
    """How layer-wise evaluation of a streamed model writes each block's quantized weights, without reading the
    unquantized ones (None: nothing to do, an ordinary model already holds them)."""
    if not artifacts:
        return None
    return BlockArtifacts(pipeline.layout, artifacts, pipeline.device, pipeline.model)


def _timing(cfg: RunConfig, plan: RunPlan, pipeline: BlockPipeline, shapes: list[tuple[int, int]]) -> list[dict]:
    """Time the packed model against a freshly loaded unquantized baseline. A streamed run's unquantized baseline
    does not fit: it gets no baseline rows."""
    from harness.timing import evaluate_timing

    backend = plan.backend or default_backend(plan.device)
    baseline = load_model(cfg.model, plan.device, plan.cache)[0] if plan.quantizes and not plan.streamed else None
    return evaluate_timing(cfg.eval.timing, pipeline.model, baseline, plan.device, cfg.seed, shapes, cfg.group_size,
                           backend)


def run_columns(cfg: RunConfig) -> dict:
    """The run-level columns repeated on every row (None where the run has no such setting)."""
    q, c, source = quantizes(cfg), calibrates(cfg), source_of(cfg)
    calibration = {"calib_source": cfg.calib.source if c else None,
                   "calib_samples": cfg.calib.n_samples if c else None, "calib_seqlen": cfg.calib.seqlen if c else None,
                   "calib_seed": cfg.calib_seed if c else None}
    if source is not None:  # a checkpoint: named and specified by what it holds
        named = {"method": source.label, "bits": source.bits, "group_size": source.group_size,
                 "symmetric": source.symmetric}
        from harness.export_stage import calibration_of

        # our own export: the calibration draw it was made from (its numbers are conditional on it, as the run's)
        calibration = calibration_of(getattr(cfg.method, "path", None)) or calibration
    else:
        named = {"method": cfg.method.name, "bits": cfg.bits if q else None,
                 "group_size": cfg.group_size if q else None, "symmetric": cfg.symmetric if q else None}
    return {"run_id": run_id(cfg), "config_hash": config_hash(cfg), "model": cfg.model.name, **named, **calibration,
            "seed": cfg.seed, "replicate_of": replicate_of(cfg)}


def measured_config(cfg: RunConfig, config_yaml: str) -> str:
    """The composed config as the run measured it: a checkpoint's own bits, group size and symmetry in place of the
    run-level defaults it does not use (what its rows record too)."""
    source = source_of(cfg)
    if source is None:
        return config_yaml
    config = yaml.safe_load(config_yaml)
    config.update(bits=source.bits, group_size=source.group_size, symmetric=source.symmetric)
    return yaml.safe_dump(config, sort_keys=False)


def _write(cfg: RunConfig, plan: RunPlan, frame: pd.DataFrame, config_yaml: str | None, extras: dict,
           records: dict[str, pd.DataFrame], fingerprint: str, exported: dict[str, bytes]) -> None:
    stamp = plan.resume.stamp or weights_stamp(cfg.model)  # a hub id's files are on this machine now
    meta = {"run_id": run_id(cfg), "result_key": result_key(cfg), "model_fingerprint": fingerprint,
            "weights_stamp": stamp, "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if cfg.model.source == "packaged":
        meta["note"] = PACKAGED_NOTE
    files = dict(exported)  # the exported checkpoint's files, checksummed with the rest
    for name, obj in extras.items():  # e.g. awq_search.pt: written on a cache hit too
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        files[name] = buffer.getvalue()
    for name, table in records.items():  # per-block and per-document records: paired comparisons after the fact
        if not table.empty:
            files[name] = table.to_parquet(index=False)
    config_yaml = config_yaml or yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))
    write_run(plan.out_dir, frame, measured_config(cfg, config_yaml), meta, files)
    log.info("wrote %s", plan.out_dir)
