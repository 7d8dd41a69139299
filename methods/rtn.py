"""Round-to-nearest: the AWQ paper's asymmetric min/max group quantizer (no calibration, no search)."""
from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from core.quant import RANGE_RULES, quantize_weight
from methods.base import Method, QuantizationResult, register_method


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
        linears = layout.quantizable_linears(model)
        return QuantizationResult({name: quantize_weight(lin.weight.data.to(device), spec, self.config.range_rule).to("cpu")
                for name, lin in tqdm(linears.items(), desc="rtn", unit="layer", leave=False)})
