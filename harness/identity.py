"""What a run is: its quantization spec, which sources it reads, and the keys and hashes that name it.

`result_key` holds everything that can change a run's numbers (it names results/<run_id>/); `quantization_key`
holds what determines the quantized weights (it names the quantization cache entry). Both hash through
`stable_hash`, the project's one hash of a JSON-able key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from core.spec import QuantSpec
from harness.config import RunConfig
from methods import METHODS, build_method
from methods.base import ArtifactSource


def stable_hash(key, length: int) -> str:
    """sha256 of the key's canonical JSON (sorted keys; non-JSON values by str), cut to `length` hex digits."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:length]


def quantizes(cfg: RunConfig) -> bool:
    return cfg.method.name != "fp"


def calibrates(cfg: RunConfig) -> bool:
    return METHODS.get(cfg.method.name).needs_calibration


def spec_of(cfg: RunConfig) -> QuantSpec:
    return QuantSpec(cfg.bits, cfg.group_size, cfg.symmetric)


def source_of(cfg: RunConfig) -> ArtifactSource | None:
    """Where the run's artifacts come from when the spec does not say (a checkpoint made elsewhere), else None."""
    return build_method(cfg.method).artifact_source()


def declared_spec(cfg: RunConfig) -> QuantSpec:
    """The spec the run's weights have: the run's own, or the nominal one of the checkpoint they are read from."""
    source = source_of(cfg)
    if source is None:
        return spec_of(cfg)
    return QuantSpec(source.bits, source.group_size, bool(source.symmetric))


def used_sources(cfg: RunConfig) -> set[str]:
    """Names of the data sources this run reads: its eval sets, plus the calibration source if it calibrates."""
    return set(cfg.eval.ppl_sets) | ({cfg.calib.source} if calibrates(cfg) else set())


def _model_key(cfg: RunConfig) -> dict:
    """The model config minus how it is held in memory (streaming gives bit-identical results)."""
    key = dataclasses.asdict(cfg.model)
    key.pop("streaming")
    return key


def method_key(method) -> dict:
    """A method config as a key: its fields, minus those its class lists in SPEED_ONLY (speed and memory knobs that
    give bit-identical results) or CHECKS_ONLY (bounds that decide whether a run is refused, not its numbers),
    recursively into nested method configs (awq_gptq's halves)."""
    skip = set(getattr(type(method), "SPEED_ONLY", ())) | set(getattr(type(method), "CHECKS_ONLY", ()))
    key = {}
    for f in dataclasses.fields(method):
        if f.name in skip:
            continue
        value = getattr(method, f.name)
        key[f.name] = method_key(value) if dataclasses.is_dataclass(value) else value
    return key


def result_key(cfg: RunConfig) -> dict:
    """Everything that can change a run's numbers (and nothing else: paths, force, device and streaming are out)."""
    key = {
        "model": _model_key(cfg),
        "method": method_key(cfg.method),
        "data": {name: dataclasses.asdict(cfg.data.sources[name]) for name in sorted(used_sources(cfg))},
        "eval": dataclasses.asdict(cfg.eval),
        "seed": cfg.seed,
    }
    if cfg.kernel is not None:
        key["kernel"] = cfg.kernel
    if cfg.export is not None:  # the run evaluates the weights as the checkpoint stores them (fp16 scales)
        key["export"] = cfg.export
    source = source_of(cfg)
    if source is not None:  # the checkpoint, not bits/group_size, decides the weights
        key["source"] = dataclasses.asdict(source)
    elif quantizes(cfg):
        key["spec"] = dataclasses.asdict(spec_of(cfg))
    if calibrates(cfg):
        key["calib"] = dataclasses.asdict(cfg.calib)
    return key


def _without_none(value):
    """Drop None-valued entries recursively, so a new option that defaults to None keeps old hashes valid."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def config_hash(cfg: RunConfig) -> str:
    return stable_hash(_without_none(result_key(cfg)), 10)


def replicate_of(cfg: RunConfig) -> str:
    """The configuration a run is a replicate draw of: the hash of its result key without `calib.seed`. Runs that
    differ only in the calibration draw share it (and differ in `calib_seed`), so analysis treats them as replicates
    of one configuration; a method that does not calibrate has one "draw", its run."""
    key = _without_none(result_key(cfg))
    key.get("calib", {}).pop("seed", None)
    return stable_hash(key, 10)


def run_id(cfg: RunConfig) -> str:
    source = source_of(cfg)
    if source is not None:
        return f"{cfg.model.name}-{source.label.replace(':', '-')}-{config_hash(cfg)}"
    label = spec_of(cfg).tag() if quantizes(cfg) else "baseline"
    return f"{cfg.model.name}-{cfg.method.name}-{label}-{config_hash(cfg)}"


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.results_dir) / run_id(cfg)


def quantization_key(cfg: RunConfig, model_fingerprint: str, calib_fingerprint: str | None, code: str) -> dict:
    """What determines the quantized weights (not the evaluation): the cache key. `code` fingerprints the source
    of the quantization path."""
    key = {"model_fingerprint": model_fingerprint, "model": _model_key(cfg),
           "method": method_key(cfg.method), "spec": dataclasses.asdict(spec_of(cfg)), "seed": cfg.seed,
           "code": code, "device": cfg.device}
    source = source_of(cfg)
    if source is not None:
        key["source"] = dataclasses.asdict(source)
    if calibrates(cfg):
        key["calib"] = _without_none(dataclasses.asdict(cfg.calib))  # calib.seed=null keeps older entries valid
        key["calib_source"] = dataclasses.asdict(cfg.data.sources[cfg.calib.source])
        key["calib_tokens"] = calib_fingerprint
    return key
