"""The unquantized baseline: quantizes nothing, so every evaluator sees the original weights."""
from __future__ import annotations

from dataclasses import dataclass

from methods.base import Method, QuantizationResult, register_method


@dataclass(frozen=True)
class FPConfig:
    """`method=fp`: the full-precision reference row of every comparison."""

    name: str = "fp"


@register_method("fp", FPConfig)
class FullPrecision(Method):
    needs_calibration = False

    def quantize_blocks(self, pipeline, spec, calib):
        return QuantizationResult({})
