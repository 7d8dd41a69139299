"""The common quantizer interface: QuantSpec in, one QuantizedWeights artifact per linear layer out.

Every method (RTN, GPTQ, AWQ, ...) returns the same artifact, so evaluation, export and the packed
kernels never need to know which method produced the weights.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:  # the layout lives in harness/, imported only for type hints
    from harness.architectures import ModelLayout

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize to: bit-width, group size (None = one group per output row) and symmetry."""

    bits: int
    group_size: int | None
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; allowed values: {list(SUPPORTED_BITS)}")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size} must be a positive integer or None (per-channel)")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def n_groups(self, in_features: int) -> int:
        """Number of groups along the input dimension; the last one is shorter when it does not divide."""
        return 1 if self.group_size is None else -(-in_features // self.group_size)

    def has_short_group(self, in_features: int) -> bool:
        return self.group_size is not None and in_features % self.group_size != 0

    def tag(self) -> str:
        """Short human label, e.g. 'w4g128', 'w3gC' (per-channel), with an 's' suffix when symmetric."""
        g = "C" if self.group_size is None else str(self.group_size)
        return f"w{self.bits}g{g}" + ("s" if self.symmetric else "")


@dataclass
class QuantizedWeights:
    """The per-layer artifact every method returns.

    W_hat[o, i] = (codes[o, i] - zeros[o, g(i)]) * scales[o, g(i)], with g = group_index().

    codes:  uint8 [out, in], values in [0, 2^bits - 1]
    scales: float32 [out, n_groups]
    zeros:  uint8 [out, n_groups], integer zero points in [0, 2^bits - 1]
    g_idx:  int32 [in] or None; None means contiguous groups, column i in group i // group_size
            (act-order GPTQ records an explicit g_idx).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int | None
    symmetric: bool = False
    g_idx: torch.Tensor | None = None

    def __post_init__(self) -> None:
        out, inp = self.codes.shape
        if self.scales.shape != self.zeros.shape or self.scales.shape[0] != out:
            raise ValueError(f"scales {tuple(self.scales.shape)} / zeros {tuple(self.zeros.shape)} do not match codes {(out, inp)}")
        if self.g_idx is not None and self.g_idx.shape != (inp,):
            raise ValueError(f"g_idx has shape {tuple(self.g_idx.shape)}, expected ({inp},)")

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def has_short_group(self) -> bool:
        return self.group_size is not None and self.in_features % self.group_size != 0

    def group_index(self) -> torch.Tensor:
        """int64 [in]: the group of each input column."""
        if self.g_idx is not None:
            return self.g_idx.long()
        device = self.codes.device
        if self.group_size is None:
            return torch.zeros(self.in_features, dtype=torch.long, device=device)
        return torch.arange(self.in_features, device=device) // self.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in] weights in `dtype` (the fake-quantized weight every evaluation uses)."""
        g = self.group_index()
        w = (self.codes.float() - self.zeros.float()[:, g]) * self.scales.float()[:, g]
        return w.to(dtype)

    def storage_bits_per_weight(self, scale_bits: int = 16) -> float:
        """Average bits per weight including one fp16 scale and one `bits`-wide zero per group."""
        per_group = scale_bits + self.bits
        return self.bits + per_group * self.n_groups / self.in_features

    def to(self, device: torch.device | str) -> "QuantizedWeights":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeights(move(self.codes), move(self.scales), move(self.zeros), self.bits,
                                self.group_size, self.symmetric, move(self.g_idx))


class Method(ABC):
    """A weight-only quantization method.

    `quantize` may change the model in place only in these ways: function-preserving transformations
    (AWQ folds its scales into the preceding norms), clipping a linear's weights before quantizing it
    (AWQ's clip search), and writing `artifact.dequantize()` into a linear's weight (GPTQ does, so later
    layers see quantized inputs). The caller then applies the returned
    artifacts (fake-quant or packed kernels), which is idempotent with the latter.
    """

    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config

    @abstractmethod
    def quantize(self, model: torch.nn.Module, layout: "ModelLayout", spec: QuantSpec,
                 calib: torch.Tensor | None, device: torch.device) -> dict[str, QuantizedWeights]:
        """Return {fully qualified linear name: artifact}. `calib` is int64 [n_samples, seqlen] or None."""


METHODS: dict[str, type[Method]] = {}
METHOD_CONFIGS: dict[str, type] = {}


def register_method(name: str, config_class: type):
    """Class decorator: make a Method selectable as `method=<name>` with `config_class` as its Hydra schema."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        METHOD_CONFIGS[name] = config_class
        return cls

    return wrap


def build_method(config: Any) -> Method:
    """Instantiate the registered method whose name is `config.name`."""
    if config.name not in METHODS:
        raise ValueError(f"method={config.name!r} is not registered; allowed values: {sorted(METHODS)}")
    return METHODS[config.name](config)
