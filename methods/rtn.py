"""Round-to-nearest: the AWQ paper's asymmetric min/max group quantizer (no calibration, no search)."""
from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from core.quant import RANGE_RULES, quantize_weight
from methods.base import Method, QuantizationResult, register_method
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
                for name, lin in layout.block_linears(block).items():
                    artifacts[f"{layout.block_prefix(i)}.{name}"] = quantize_weight(
                        lin.weight.data.to(device), spec, self.config.range_rule).to("cpu")
        return QuantizationResult(artifacts)
