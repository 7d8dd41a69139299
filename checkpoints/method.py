"""`method=checkpoint method.path=...`: the artifacts are read from a checkpoint made elsewhere instead of computed,
and judged against the base model (`model=...`) on the same tokens as every other run.

The whole checkpoint is evaluated as it would be deployed: its quantized linears as artifacts, and every other
tensor it stores (embeddings, norms with AWQ's folded scales, a GGUF's quantized embedding table) in place of the
base model's.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

from checkpoints.base import CheckpointError, Description, check_belongs, digest, reader_for
from checkpoints.hub import resolve_checkpoint_path
from checkpoints.plausibility import relative_errors
from methods.base import ArtifactSource, Method, QuantizationResult, register_method
from structure.architectures import layout_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointConfig:
    """`method=checkpoint`. `path`: a GGUF file or a checkpoint directory, or a Hub id `org/name[@revision]` (its
    snapshot in the local Hugging Face cache, found as model=hf finds a model; `org/name/FILE.gguf` for one file of a
    GGUF repository). `format`: auto (detected) or a reader's name. `label`: how its rows are named (method column
    "ckpt:<label>"); None: the format and the first digits of the checkpoint's sha256, e.g. gguf-Q4_K_M-1a2b3c4d, so
    two checkpoints of one format never share a name (reports would take the later for a re-run of the earlier).
    `max_rel_error`: the largest relative error a stored tensor may have against the base model's
    (checkpoints.plausibility; 1.0 is what a tensor of zeros has) before the checkpoint is refused as damaged or
    foreign; it decides whether a run is refused, never its numbers, so it is not part of the run's key."""

    name: str = "checkpoint"
    path: Optional[str] = None
    format: str = "auto"
    label: Optional[str] = None
    max_rel_error: float = 1.0
    # fields that decide whether a run is refused, never its numbers: left out of the run's and the cache's keys
    CHECKS_ONLY: ClassVar[tuple[str, ...]] = ("max_rel_error",)

    def __post_init__(self) -> None:
        from checkpoints.base import READERS

        if not self.path:
            raise ValueError("method.path is missing; allowed values: a GGUF file or a quantized checkpoint directory "
                             "(e.g. method=checkpoint method.path=model-Q4_0.gguf)")
        if self.format != "auto" and self.format not in READERS:
            raise ValueError(f"method.format={self.format!r} is invalid; allowed values: {['auto', *READERS.names()]}")
        if self.label is not None and not self.label.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"method.label={self.label!r} is invalid; allowed values: letters, digits, '-', '_', '.'")
        if not self.max_rel_error > 0:
            raise ValueError(f"method.max_rel_error={self.max_rel_error!r} is invalid; allowed values: a positive "
                             "number (default 1.0, the error of a tensor of zeros)")


@register_method("checkpoint", CheckpointConfig)
class FromCheckpoint(Method):
    needs_calibration = False
    spec_from_source = True

    @property
    def path(self) -> Path:
        """The checkpoint on this machine: method.path itself, or a Hub id's file or directory in its snapshot."""
        return resolve_checkpoint_path(self.config.path)

    def describe(self) -> Description:
        """What the checkpoint is, from its metadata."""
        return reader_for(self.path, self.config.format).describe(self.path)

    def artifact_source(self) -> ArtifactSource:
        about = self.describe()
        sha = digest(self.path)
        return ArtifactSource(f"ckpt:{self.config.label or f'{about.label}-{sha[:8]}'}", about.bits, about.group_size,
                              about.symmetric, sha, about.packable)

    def check_model(self, model, tokenizer=None) -> None:
        """Refuse (CheckpointError) a checkpoint that is not a quantization of `model` (a skeleton is enough)."""
        check_belongs(reader_for(self.path, self.config.format).header(self.path, model), model, layout_for(model),
                      tokenizer)

    def quantize_blocks(self, pipeline, spec, calib) -> QuantizationResult:
        model = pipeline.model
        reader = reader_for(self.path, self.config.format)
        check_belongs(reader.header(self.path, model), model, pipeline.layout)
        contents = reader.read(self.path, model)
        dtype = next(model.parameters()).dtype
        others = sum(t.numel() for t in contents.tensors.values())
        log.info("read %d quantized linears and %d other tensors (%.2f bits per weight as stored) from %s",
                 len(contents.artifacts), len(contents.tensors), contents.other_bits / max(1, others), self.path)
        if not contents.artifacts:
            raise CheckpointError(f"{self.path} holds no quantized linear of the base model: nothing to judge")
        stats = {"(other tensors)": {"other_params": others, "other_stored_bits": contents.other_bits}}
        errors = relative_errors(contents.artifacts, contents.tensors, pipeline.layout, model, pipeline.read)
        for name, error in errors.items():
            stats.setdefault(name, {})["rel_error"] = error
        return QuantizationResult(contents.artifacts, {k: t.to(dtype) for k, t in contents.tensors.items()}, stats)

    def check_result(self, result: QuantizationResult) -> None:
        """Refuse (CheckpointError) a checkpoint whose worst tensor is further from the base model's than
        method.max_rel_error, or not finite (checkpoints.plausibility); run on a cache hit too."""
        errors = {name: s["rel_error"] for name, s in result.stats.items() if "rel_error" in s}
        if not errors:
            return
        worst = max(errors, key=lambda name: (not math.isfinite(errors[name]), errors[name]))
        if not math.isfinite(errors[worst]):
            raise CheckpointError(f"{worst} holds non-finite values (inf or NaN): the checkpoint is damaged")
        if errors[worst] > self.config.max_rel_error:
            raise CheckpointError(f"{worst} has a relative error of {errors[worst]:.4g} against the base model's "
                                  f"weight, above method.max_rel_error={self.config.max_rel_error:g} (a tensor of "
                                  "zeros has 1.0): the checkpoint is damaged or not of this model; allowed values: "
                                  f"method.max_rel_error above {errors[worst]:.4g} to judge it anyway")
