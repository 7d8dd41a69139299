"""The quantize stage: calibrate, quantize through the common interface (or reuse the cached result), apply the
artifacts to the model (fake-quant), and turn what the method reports into `quant` rows."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoints.base import CheckpointError
from harness import cache as quant_cache
from harness.config import ConfigError, RunConfig
from harness.data import calibration_tokens
from harness.export_stage import stored_artifacts
from harness.identity import quantization_key, spec_of
from harness.journal import note
from harness.locks import computed_once
from harness.preemption import StopRequest
from harness.progress import ProgressStore, progress_directory
from analysis.results import quant_row
from methods import build_method
from methods.base import QuantizationResult
from structure.architectures import ModelLayout, apply_artifacts
from structure.pipeline import BlockPipeline

log = logging.getLogger(__name__)
# How a per-layer statistic of a method becomes one number (default: sum over layers).
STAT_AGGREGATES = {"damp_percent": "max", "n_tokens": "min", "rel_error": "max"}


@dataclass
class QuantStage:
    """What the stage hands on: the method's result, its rows, and the calibration tokens' fingerprint."""

    result: QuantizationResult
    rows: list[dict]
    calib_fingerprint: str | None


def short_group_layers(model: torch.nn.Module, layout: ModelLayout, cfg: RunConfig) -> dict[str, int]:
    """{layer name: in_features} of layers whose last group is shorter than group_size; a ConfigError under
    strict_groups=true."""
    spec = spec_of(cfg)
    short = {name: lin.in_features for name, lin in layout.quantizable_linears(model).items()
             if spec.has_short_group(lin.in_features)}
    if short and cfg.strict_groups:
        raise ConfigError(f"group_size={cfg.group_size} does not divide the input features of {len(short)} "
                          f"layers (e.g. {next(iter(short))}: {next(iter(short.values()))}) and "
                          "strict_groups=true; allowed: a group size dividing every layer, or strict_groups=false")
    if short:
        log.warning("%d of %d layers have a short last group (in_features %s, group_size %d): the last group of "
                    "each is shorter, as in the GPTQ reference", len(short), len(layout.quantizable_linears(model)),
                    sorted(set(short.values())), cfg.group_size)
    return short


def quantize_stage(cfg: RunConfig, pipeline: BlockPipeline, tokenizer, fingerprint: str, cache: Path,
                   stop: StopRequest | None = None) -> QuantStage:
    """Calibrate and quantize (or reuse a cached result, restoring what the method changed in place); fake-quantize
    the model with the artifacts (a streamed model: evaluation applies them block by block).

    Jobs that need the same quantization at once compute it once (the others wait for the entry's lock, then reuse
    it verified). A calibrated pass keeps its finished blocks beside the entry (harness/progress.py): a run stopped
    by a signal (`stop`, checked between blocks), killed or requeued resumes after them, with identical results."""
    model, layout = pipeline.model, pipeline.layout
    method = build_method(cfg.method)
    short = short_group_layers(model, layout, cfg) if method.artifact_source() is None else {}
    calib = calib_print = None
    if method.needs_calibration:
        calib_set = calibration_tokens(cfg.calib.source, cfg.data.sources[cfg.calib.source], tokenizer, cache,
                                       cfg.calib.n_samples, cfg.calib.seqlen, cfg.calib_seed)
        calib, calib_print = calib_set.tokens, calib_set.fingerprint
    key = quantization_key(cfg, fingerprint, calib_print, quant_cache.code_fingerprint(type(method).__module__))
    path = quant_cache.entry_path(cache, key)

    def load():  # ((result, meta), cached): the verified entry, None without one
        found = None if cfg.force else quant_cache.load_entry(path, key)
        return None if found is None else (found, True)

    def compute():
        progress = ProgressStore(progress_directory(path), key, stop, cfg.progress_every_s)
        if cfg.force:
            progress.discard()
        start = time.perf_counter()
        result = method.quantize_blocks(pipeline.with_progress(progress), spec_of(cfg), calib)
        meta = {"quant_wall_s": time.perf_counter() - start}  # the cost of producing them, not of reading them
        result = quant_cache.save_entry(path, key, result, meta)
        progress.discard()
        if progress.passes:
            blocks = progress.summary()
            note(log, "blocks", "blocks of %s: %s", cfg.method.name, "; ".join(
                f"{desc}: {n['computed']} computed, {n['reused']} reused from kept progress"
                for desc, n in blocks.items()), passes=blocks)
        return (result, meta), False

    try:
        (result, meta), cached = computed_once(path, "quantization", f"quantized weights ({cfg.method.name})", load,
                                               compute, stop=stop)  # a signal while another job quantizes: leave
        if cached:
            log.info("reusing quantized weights from %s (same model, method, spec, calibration and code)", path)
        method.check_result(result)  # before anything is evaluated, a cached result too
    except CheckpointError as err:  # a checkpoint that cannot be judged: bad input, one line
        raise ConfigError(f"method.path={getattr(cfg.method, 'path', None)!r}: {err}") from None
    result = dataclasses.replace(result, artifacts=stored_artifacts(result.artifacts, cfg.export))
    pipeline.adopt(result.modified)  # a streamed model: the checkpoint + what the method folded, from now on
    if not pipeline.streamed:  # a streamed model gets its artifacts block by block, as evaluation loads it
        apply_artifacts(model, result.artifacts)
    rows = [quant_row("quant_wall_s", meta["quant_wall_s"], {"cached": cached}),
            *artifact_rows(result, short), *stat_rows(result.stats),
            *expert_rows(result, layout, None if calib is None else calib.numel())]
    return QuantStage(result, rows, calib_print)


def expert_rows(result: QuantizationResult, layout: ModelLayout, calib_tokens: int | None) -> list[dict]:
    """For a mixture of experts: `experts_fallback` (experts with a matrix rounded to nearest because the router sent
    it too few calibration tokens; quantized expert matrices in the detail) and, per expert of every block, a
    `suite=routing` row of the tokens the router sent it (`routed_tokens`, n = calibration tokens) and of those its
    statistics rested on (`stat_tokens`: the same when routed, every token with calib.moe_routing=all)."""
    moe = layout.spec.moe
    if moe is None:
        return []
    path = moe.experts.path
    experts = {name.rpartition(".")[0] for name in result.artifacts if f".{path}." in name}
    if not experts:
        return []
    fell_back = {name.rpartition(".")[0] for name, stat in result.stats.items()
                 if stat.get("fallback") and name.rpartition(".")[0] in experts}
    rows = [quant_row("experts_fallback", len(fell_back),
                      {"experts": len(experts), "expert_matrices": sum(f".{path}." in n for n in result.artifacts),
                       "fell_back": sorted(fell_back)[:20]})]
    for prefix, counts in sorted(result.routing.items(), key=lambda kv: _block_order(kv[0])):
        for e, count in enumerate(counts):
            expert = f"{prefix}.{path}.{e}"
            rows.append({"suite": "routing", "task": expert, "metric": "routed_tokens", "value": count,
                         "n": calib_tokens})
            stat = result.stats.get(f"{expert}.gate_proj", {}).get("n_tokens")
            if stat is not None:
                rows.append({"suite": "routing", "task": expert, "metric": "stat_tokens", "value": stat})
    return rows


def _block_order(prefix: str) -> tuple:
    head, _, index = prefix.rpartition(".")
    return (head, int(index)) if index.isdigit() else (prefix, -1)


def artifact_rows(result: QuantizationResult, short: dict[str, int]) -> list[dict]:
    arts = result.artifacts.values()
    n_weights = sum(a.out_features * a.in_features for a in arts)
    bits_pw = sum(a.storage_bits_per_weight() * a.out_features * a.in_features for a in arts) / max(1, n_weights)
    return [quant_row("quantized_layers", len(result.artifacts)),
            quant_row("short_group_layers", len(short),
                      {"in_features": sorted(set(short.values()))} if short else None),
            quant_row("storage_bits_per_weight", bits_pw, {"params": n_weights})]


def stat_rows(stats: dict[str, dict[str, float]]) -> list[dict]:
    """One `stat_<name>` row per statistic the method reported per layer (GPTQ: damp_retries, loss, ...),
    aggregated over layers as STAT_AGGREGATES says; the detail names the layer with the largest value."""
    rows = []
    for name in sorted({k for layer in stats.values() for k in layer}):
        values = {layer: float(s[name]) for layer, s in stats.items() if name in s}
        how = STAT_AGGREGATES.get(name, "sum")
        value = {"sum": sum, "max": max, "min": min}[how](values.values())
        worst = max(values, key=values.get)
        rows.append(quant_row(f"stat_{name}", value, {"aggregate": how, "layers": len(values),
                                                      "max_layer": worst, "max": values[worst]}))
    return rows
