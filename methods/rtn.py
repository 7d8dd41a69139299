"""Round-to-nearest: the AWQ paper's asymmetric min/max group quantizer (no calibration, no search)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from core.quant import RANGE_RULES, quantize_weight
from core.spec import QuantizedWeights, QuantSpec
from methods.base import Method, QuantizationResult, register_method
from structure.architectures import ModelLayout
from structure.streaming import residency_of


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

    def quantize(self, model, layout, spec, calib, device) -> QuantizationResult:
        residency = residency_of(model)
        artifacts = residency.artifact_store()
        for i in tqdm(range(len(layout.blocks(model))), desc="rtn", unit="block", leave=False):
            with residency.block(model, layout, i, writeback=False) as block:
                artifacts.update(quantize_block(block, layout.block_prefix(i), layout, spec, self.config.range_rule,
                                                device))
        return QuantizationResult(artifacts)


def quantize_block(block: nn.Module, prefix: str, layout: ModelLayout, spec: QuantSpec, rule: str = "minmax",
                   device: torch.device | None = None) -> dict[str, QuantizedWeights]:
    """Round every linear of a (materialized) block to nearest -> {full name: artifact on CPU}. With "minmax" this
    is also AWQ's quantizer, applied to the scaled and clipped block."""
    return {f"{prefix}.{name}": quantize_weight(lin.weight.data.to(device), spec, rule).to("cpu")
            for name, lin in layout.block_linears(block).items()}
