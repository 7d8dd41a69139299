"""One run, start to finish: validate, load, calibrate, quantize, apply, evaluate, write rows.

Data flows one way: RunConfig -> model + tokens -> method artifacts -> evaluators -> tidy rows ->
results/<run_id>/. A run whose results directory is already complete is skipped (resume), unless
`force=true`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import logging
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from harness import cache as quant_cache
from harness import data as datasets_
from harness.architectures import ModelLayout, apply_artifacts, layout_for
from harness.config import ConfigError, RunConfig
from harness.models import (PACKAGED_NOTE, check_model_location, default_cache_dir, load_model, model_fingerprint,
                            resolve_device)
from harness.perplexity import check_agreement, make_windows, perplexity
from harness.provenance import device_name, git_sha, peak_memory_mb, versions
from harness.results import is_complete, read_run, to_frame, write_run
from methods import METHODS, build_method
from methods.base import QuantSpec

log = logging.getLogger(__name__)


def _quantizes(cfg: RunConfig) -> bool:
    return cfg.method.name != "fp"


def _calibrates(cfg: RunConfig) -> bool:
    return METHODS[cfg.method.name].needs_calibration


def used_sources(cfg: RunConfig) -> set[str]:
    """Names of the data sources this run reads: its eval sets, plus the calibration source if it calibrates."""
    return set(cfg.eval.ppl_sets) | ({cfg.calib.source} if _calibrates(cfg) else set())


def spec_of(cfg: RunConfig) -> QuantSpec:
    return QuantSpec(cfg.bits, cfg.group_size, cfg.symmetric)


def result_key(cfg: RunConfig) -> dict:
    """Everything that can change a run's numbers (and nothing else: paths, force and device are out)."""
    used = used_sources(cfg)
    key = {
        "model": dataclasses.asdict(cfg.model),
        "method": dataclasses.asdict(cfg.method),
        "data": {name: dataclasses.asdict(cfg.data.sources[name]) for name in sorted(used)},
        "eval": dataclasses.asdict(cfg.eval),
        "seed": cfg.seed,
    }
    if cfg.kernel is not None:
        key["kernel"] = cfg.kernel
    if _quantizes(cfg):
        key["spec"] = dataclasses.asdict(spec_of(cfg))
    if _calibrates(cfg):
        key["calib"] = dataclasses.asdict(cfg.calib)
    return key


def _without_none(value):
    """Drop None-valued entries recursively, so a new option that defaults to None keeps old hashes valid."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def config_hash(cfg: RunConfig) -> str:
    key = _without_none(result_key(cfg))
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_id(cfg: RunConfig) -> str:
    label = spec_of(cfg).tag() if _quantizes(cfg) else "baseline"
    return f"{cfg.model.name}-{cfg.method.name}-{label}-{config_hash(cfg)}"


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.results_dir) / run_id(cfg)


def cache_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()


def quantization_key(cfg: RunConfig, fingerprint: str, data_prints: dict) -> dict:
    """What determines the quantized weights (not the evaluation): the cache key."""
    key = {"model_fingerprint": fingerprint, "model": dataclasses.asdict(cfg.model),
           "method": dataclasses.asdict(cfg.method), "spec": dataclasses.asdict(spec_of(cfg)), "seed": cfg.seed,
           "code": quant_cache.code_fingerprint(), "device": cfg.device}
    if _calibrates(cfg):
        key["calib"] = dataclasses.asdict(cfg.calib)
        key["calib_source"] = dataclasses.asdict(cfg.data.sources[cfg.calib.source])
        key["calib_tokens"] = data_prints.get(f"calib:{cfg.calib.source}")
    return key


def short_group_layers(model: torch.nn.Module, layout: ModelLayout, spec: QuantSpec) -> dict[str, int]:
    """{layer name: in_features} for layers whose last group is shorter than group_size."""
    return {name: lin.in_features for name, lin in layout.quantizable_linears(model).items()
            if spec.has_short_group(lin.in_features)}


def preflight(cfg: RunConfig, cache: Path, device: torch.device) -> None:
    """Fail fast with a ConfigError, before any model loads: a model that cannot be found, a kernel that cannot run
    on the device, missing data packages or files, a source that cannot be split, unknown lm-eval tasks."""
    from kernels.quant_linear import check_backend_device

    check_model_location(cfg.model)
    if cfg.kernel is not None:
        try:
            check_backend_device(cfg.kernel, device)
        except ValueError as err:
            raise ConfigError(f"kernel={cfg.kernel!r} cannot run on device {device}: {err}") from None
    for name in sorted(used_sources(cfg)):
        try:
            datasets_.check_source(name, cfg.data.sources[name], cache)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(str(err)) from None
    if cfg.eval.lm_eval is not None:
        from harness.lmeval import check_tasks

        check_tasks(cfg.eval.lm_eval)


def _quant_row(metric: str, value: float, detail: dict | None = None) -> dict:
    return {"suite": "quant", "task": "all", "metric": metric, "value": value,
            "detail": json.dumps(detail) if detail else None}


def quantize(cfg: RunConfig, model, tokenizer, layout: ModelLayout, fingerprint: str, cache: Path,
             device: torch.device, out_dir: Path, data_prints: dict) -> tuple[dict, list[dict]]:
    """Calibrate and quantize (or reuse a cached result); fake-quantize the model. Returns (artifacts, rows)."""
    method, spec = build_method(cfg.method), spec_of(cfg)
    short = short_group_layers(model, layout, spec)
    if short and cfg.strict_groups:
        raise ConfigError(f"group_size={cfg.group_size} does not divide the input features of {len(short)} "
                          f"layers (e.g. {next(iter(short))}: {next(iter(short.values()))}) and "
                          "strict_groups=true; allowed: a group size dividing every layer, or strict_groups=false")
    if short:
        log.warning("%d of %d layers have a short last group (in_features %s, group_size %d): the last group of "
                    "each is shorter, as in the GPTQ reference", len(short), len(layout.quantizable_linears(model)),
                    sorted(set(short.values())), cfg.group_size)
    calib = None
    if method.needs_calibration:
        calib_set = datasets_.calibration_tokens(cfg.calib.source, cfg.data.sources[cfg.calib.source], tokenizer,
                                                 cache, cfg.calib.n_samples, cfg.calib.seqlen, cfg.seed)
        calib = calib_set.tokens
        data_prints[f"calib:{cfg.calib.source}"] = calib_set.fingerprint
    key = quantization_key(cfg, fingerprint, data_prints)
    entry_path = cache / "quantized" / f"{quant_cache.key_hash(key)}.pt"
    cached = None if cfg.force else quant_cache.load_entry(entry_path, key)
    if cached is not None:
        log.info("reusing quantized weights from %s (same model, method, spec, calibration and code)", entry_path)
        artifacts, modified, meta = cached
        model.load_state_dict(modified, strict=False)
        quant_wall = meta["quant_wall_s"]  # the cost of producing them, not of reading the cache
    else:
        method.run_dir = out_dir
        before = quant_cache.param_checksums(model)
        start = time.perf_counter()
        artifacts = method.quantize(model, layout, spec, calib, device)
        quant_wall = time.perf_counter() - start
        modified = quant_cache.changed_tensors(model, before, exclude=set(artifacts))
        quant_cache.save_entry(entry_path, key, artifacts, modified, {"quant_wall_s": quant_wall})
    apply_artifacts(model, artifacts)
    n_weights = sum(a.codes.numel() for a in artifacts.values())
    bits_pw = sum(a.storage_bits_per_weight() * a.codes.numel() for a in artifacts.values()) / max(1, n_weights)
    rows = [
        _quant_row("quant_wall_s", quant_wall, {"cached": cached is not None}),
        _quant_row("quantized_layers", len(artifacts)),
        _quant_row("short_group_layers", len(short), {"in_features": sorted(set(short.values()))} if short else None),
        _quant_row("storage_bits_per_weight", bits_pw, {"params": n_weights}),
    ]
    return artifacts, rows


def probe_window(cfg: RunConfig, windows: dict[str, torch.Tensor], vocab_size: int) -> tuple[str, torch.Tensor]:
    """(label, one window [1, seqlen]) on which the packed model is checked against the fake-quantized one: the
    first window of the first eval set, or seeded random tokens when no set is evaluated."""
    if windows:
        name = next(iter(windows))
        return f"eval set {name!r}, window 0", windows[name][:1]
    g = torch.Generator().manual_seed(cfg.seed)
    return "random tokens", torch.randint(0, vocab_size, (1, cfg.eval.seqlen), generator=g)


def pack(cfg: RunConfig, model, artifacts: dict, backend: str, probe: tuple[str, torch.Tensor],
         device: torch.device) -> list[dict]:
    """Swap the fake-quantized linears for packed QuantLinear layers (one GEMM per shared-input group: q/k/v,
    gate/up), each checked against its artifact; then check the packed model's ppl on the probe window against
    the fake-quantized model's (DisagreementError beyond PACKED_PPL_RTOL). Rows say which backend each layer got
    and the ppl ratio packed / fake-quantized on the probe."""
    from kernels.quant_linear import pack_model

    label, window = probe
    reference = perplexity(model, window, device, desc="probe: fake-quant")["nll"]
    used = pack_model(model, artifacts, backend, layout_for(model).shared_input_groups(model))
    packed = perplexity(model, window, device, desc="probe: packed")["nll"]
    check_agreement(f"kernel={backend}, {label}", packed, reference)
    fallbacks = sorted(name for name, b in used.items() if b != backend)
    if fallbacks:
        log.warning("kernel=%s: %d layers fell back to another backend: %s", backend, len(fallbacks), fallbacks[:5])
    detail = {"kernel": backend, "fallbacks": {n: used[n] for n in fallbacks}} if fallbacks else {"kernel": backend}
    if backend == "cpu_int4":
        from kernels.cpu_int4 import DENSE_FROM_M, dense_dtype

        detail["dense_from_m"], detail["dense_dtype"] = DENSE_FROM_M, str(dense_dtype()).removeprefix("torch.")
    return [_quant_row("kernel_fallback_layers", len(fallbacks), detail),
            _quant_row("packed_ppl_ratio", float(torch.tensor(packed - reference).exp()), {"probe": label})]


def eval_windows(cfg: RunConfig, tokenizer, layout: ModelLayout, cache: Path,
                 data_prints: dict) -> dict[str, torch.Tensor]:
    """{eval set: windows [n, seqlen]} for every set in eval.ppl_sets (tokenized once per run)."""
    bos_id = tokenizer.bos_token_id if layout.spec.needs_bos else None
    body = cfg.eval.seqlen - (bos_id is not None)
    windows = {}
    for name in cfg.eval.ppl_sets:
        n_tokens = None if cfg.eval.max_windows is None else cfg.eval.max_windows * body
        tokens = datasets_.eval_tokens(name, cfg.data.sources[name], tokenizer, cache, n_tokens)
        data_prints[f"eval:{name}"] = tokens.fingerprint
        windows[name] = make_windows(tokens.tokens, cfg.eval.seqlen, cfg.eval.max_windows, bos_id)
    return windows


def evaluate_perplexity(model, windows: dict[str, torch.Tensor], device: torch.device) -> list[dict]:
    rows = []
    for name, w in windows.items():
        result = perplexity(model, w, device, desc=f"ppl {name}")
        log.info("ppl %-8s %.3f (%d windows, %d tokens, %.1fs)", name, result["ppl"], result["windows"],
                 result["tokens"], result["wall_s"])
        rows.append({"suite": "ppl", "task": name, "metric": "ppl", "value": result["ppl"], "n": result["tokens"]})
        rows += [{"suite": "ppl", "task": name, "metric": m, "value": result[m]} for m in ("tokens", "windows", "wall_s")]
    return rows


def default_kernel(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "cpu_int4"


def evaluate_timing(cfg: RunConfig, model, cache: Path, device: torch.device,
                    shapes: list[tuple[int, int]]) -> list[dict]:
    """Prefill/decode speed of this (packed) model and of a freshly loaded unquantized baseline, same process."""
    from harness.timing import gemm_microbench, time_generation
    from kernels.cpu_int4 import native_bf16

    t = cfg.eval.timing
    vocab = model.config.vocab_size

    def timed(m, label: str) -> list[dict]:
        rows = time_generation(m, vocab, t.prompt_len, t.decode_tokens, t.batch_sizes, device, t.warmup, t.repeats,
                               cfg.seed)
        return [{**r, "metric": f"{label}_{r['metric']}" if label else r["metric"]} for r in rows]

    rows = timed(model, "")
    if _quantizes(cfg):
        baseline, _ = load_model(cfg.model, device, cache)
        baselines = [("baseline", baseline)]
        if baseline.dtype != torch.bfloat16 and (device.type == "cuda" or native_bf16()):
            baselines.append(("baseline_bf16", baseline))  # where bf16 is native it is the fair 16-bit baseline
        for label, base in baselines:
            base = base.to(torch.bfloat16) if label.endswith("bf16") else base
            base_rows = timed(base, label)
            by_key = {(r["task"], r["metric"].removeprefix(f"{label}_")): r["value"] for r in base_rows}
            speedup = f"speedup_vs_{label}"
            rows += base_rows + [
                {"suite": "timing", "task": r["task"], "metric": r["metric"].replace("tokens_per_s", speedup),
                 "value": r["value"] / by_key[(r["task"], r["metric"])], "detail": r.get("detail")}
                for r in rows if not r["metric"].startswith("baseline") and (r["task"], r["metric"]) in by_key]
        del baseline, baselines
    if t.gemm:  # the model's own linear shapes, packed kernel against dense
        rows += gemm_microbench(shapes, [1, 16, 128], cfg.group_size, [cfg.kernel or default_kernel(device)], device,
                                t.repeats)
    return rows


@contextlib.contextmanager
def run_lock(out_dir: Path):
    """Hold an exclusive lock on a run directory; yields True if another process held it first.

    Parallel sweep jobs can share a run (fp in a sweep over bits): the second waits for the first
    instead of computing the same rows twice. The OS drops the lock when a process dies."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as handle:
        waited = False
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s is being computed by another process: waiting for it", out_dir)
            fcntl.flock(handle, fcntl.LOCK_EX)
            waited = True
        try:
            yield waited
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def execute(cfg: RunConfig, config_yaml: str | None = None) -> pd.DataFrame:
    """Run `cfg` (or reuse its finished results) and return its rows."""
    out_dir = run_dir(cfg)
    if is_complete(out_dir) and not cfg.force:
        log.info("%s is complete: skipping (force=true re-runs it)", out_dir)
        return read_run(out_dir)
    with run_lock(out_dir) as waited:
        if waited and is_complete(out_dir):
            return read_run(out_dir)
        return _execute(cfg, out_dir, config_yaml)


def _execute(cfg: RunConfig, out_dir: Path, config_yaml: str | None) -> pd.DataFrame:
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    cache = cache_dir_of(cfg)
    device = resolve_device(cfg.device)
    preflight(cfg, cache, device)

    model, tokenizer = load_model(cfg.model, device, cache)
    layout = layout_for(model)
    fingerprint = model_fingerprint(model)  # of the loaded weights, before any method touches them
    shapes = sorted({(m.in_features, m.out_features) for m in layout.quantizable_linears(model).values()})
    rows: list[dict] = []
    data_prints: dict[str, str] = {}
    artifacts: dict = {}
    windows = eval_windows(cfg, tokenizer, layout, cache, data_prints)
    probe = probe_window(cfg, windows, model.config.vocab_size)
    if _quantizes(cfg):
        artifacts, quant_rows = quantize(cfg, model, tokenizer, layout, fingerprint, cache, device, out_dir, data_prints)
        rows += quant_rows
        if cfg.kernel is not None:  # evaluate through the packed layers themselves
            rows += pack(cfg, model, artifacts, cfg.kernel, probe, device)
    rows += evaluate_perplexity(model, windows, device)
    if cfg.eval.lm_eval is not None:
        from harness.lmeval import run_lm_eval

        rows += run_lm_eval(model, tokenizer, cfg.eval.lm_eval, device)
    if cfg.eval.timing is not None:
        if artifacts and cfg.kernel is None:  # fake-quant weights run at fp speed: time the packed model
            rows += pack(cfg, model, artifacts, default_kernel(device), probe, device)
        rows += evaluate_timing(cfg, model, cache, device, shapes)

    run_columns = {
        "run_id": run_id(cfg), "config_hash": config_hash(cfg), "model": cfg.model.name, "method": cfg.method.name,
        "bits": cfg.bits if _quantizes(cfg) else None,
        "group_size": cfg.group_size if _quantizes(cfg) else None,
        "symmetric": cfg.symmetric if _quantizes(cfg) else None,
        "calib_source": cfg.calib.source if _calibrates(cfg) else None,
        "calib_samples": cfg.calib.n_samples if _calibrates(cfg) else None,
        "calib_seqlen": cfg.calib.seqlen if _calibrates(cfg) else None,
        "seed": cfg.seed,
        "git_sha": git_sha(), "versions": versions(), "model_fingerprint": fingerprint,
        "data_fingerprint": json.dumps(data_prints, sort_keys=True), "device": device_name(device),
        "started_at": started_at, "wall_s": time.perf_counter() - t0, "peak_mem_mb": peak_memory_mb(device),
    }
    frame = to_frame({**run_columns, **row} for row in rows)
    meta = {"run_id": run_id(cfg), "result_key": result_key(cfg),
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if cfg.model.source == "packaged":
        meta["note"] = PACKAGED_NOTE
    write_run(out_dir, frame, config_yaml or yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg), default=str))),
              meta)
    log.info("wrote %s", out_dir)
    return frame
