"""Round-to-nearest: the AWQ paper's asymmetric min/max group quantizer (no calibration, no search)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.quant import RANGE_RULES, quantize_weight
from core.spec import QuantizedWeights, QuantSpec
from methods.base import Method, QuantizationResult, register_method
from structure.architectures import ModelLayout


@dataclass(frozen=True)
class RTNConfig:
    """`method=rtn`. `range_rule`: "minmax" is the AWQ paper's RTN (default); "minmax_zero" widens each
    group's range to include 0 as the GPTQ paper's RTN does."""

    name: str = "rtn"
    range_rule: str = "minmax"

    def __post_init__(self) -> None:
        if self.range_rule not in RANGE_RULES:
            raise ValueError(f"method.range_rule={self.range_rule!r}; allowed values: {list(RANGE_RULES)}")


@register_method("rtn", RTNConfig)
class RTN(Method):
    needs_calibration = False

    def quantize_blocks(self, pipeline, spec, calib) -> QuantizationResult:
        def step(prefix, block):
            return quantize_block(block, prefix, pipeline.layout, spec, self.config.range_rule, pipeline.device)

        return QuantizationResult(pipeline.map_blocks(step, "rtn", writeback=False))


def quantize_block(block: nn.Module, prefix: str, layout: ModelLayout, spec: QuantSpec, rule: str = "minmax",
                   device: torch.device | None = None) -> dict[str, QuantizedWeights]:
    """Round every linear of a (materialized) block to nearest -> {full name: artifact on CPU}. With "minmax" this
    is also AWQ's quantizer, applied to the scaled and clipped block."""
    return {f"{prefix}.{name}": quantize_weight(lin.weight.data.to(device), spec, rule).to("cpu")
            for name, lin in layout.block_linears(block).items()}
