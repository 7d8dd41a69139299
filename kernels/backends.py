"""Execution backends for packed weight-only linears, one small class each, found by name in BACKENDS.

A backend says what it supports (`unsupported_reason`, `check_device`), how it packs an artifact (`pack`: a dict
of tensors that QuantLinear keeps as buffers), how it runs (`run`), and how the pack-time self-check exercises it
(`check_sizes`: activation rows reaching each of its regimes; `tolerance`: the largest relative error against
x @ dequantize(artifact).T it may show). Adding a backend is one registered class; nothing dispatches on names.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch

from core.registry import Registry
from core.spec import QuantizedWeights
from kernels.cpu_int4 import DENSE_FROM_M, FAST_DTYPE, cpu_int4_linear
from kernels.pack import cpu_int4_group_size, pack_cpu_int4, pack_gptq, pack_triton_w4, triton_group_size
from kernels.reference import gptq_linear


class Backend(ABC):
    name: ClassVar[str]
    # The pack-time self-check. A wrong layout gives relative errors of order 1 (1.3-1.8 on the AVX-512 layout bug
    # of the CPU int4 path), so bounds set by each backend's compute dtype separate cleanly.
    tolerance: ClassVar[float]
    check_sizes: ClassVar[tuple[int, ...]]

    def unsupported_reason(self, art: QuantizedWeights) -> str | None:
        """Why this backend cannot run the artifact (a short phrase), or None when it can."""
        if art.bits != 4:
            return f"bits={art.bits} (needs 4)"
        if art.g_idx is not None:
            return "act-order g_idx"
        return None

    def check_device(self, device: torch.device) -> None:
        """Raise ValueError when the backend cannot run on `device` at all (not a per-layer fallback case)."""

    @abstractmethod
    def pack(self, art: QuantizedWeights) -> dict[str, torch.Tensor]:
        """The artifact in this backend's layout, as named tensors."""

    @abstractmethod
    def run(self, x: torch.Tensor, packed: Mapping[str, torch.Tensor], art_meta: "LayerMeta",
            bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., in] (any float dtype) -> [..., out] in x.dtype."""


class LayerMeta:
    """What a backend needs to know of a packed layer besides its tensors."""

    __slots__ = ("in_features", "out_features", "bits", "group_size")

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None) -> None:
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size


BACKENDS: Registry[Backend] = Registry("kernel backend")


def register_backend(cls: type[Backend]) -> type[Backend]:
    BACKENDS.add(cls.name, cls())
    return cls


def default_backend(device: torch.device | str) -> str:
    """The fast backend for `device`: triton on CUDA, cpu_int4 on CPU."""
    return "triton" if torch.device(device).type == "cuda" else "cpu_int4"


@register_backend
class ReferenceBackend(Backend):
    """The oracle as a layer: GPTQ-packed (fp32 scales), unpacked and dequantized every call, fp32 matmul. Any bits,
    act-order, any group."""

    name = "reference"
    tolerance = 1e-5  # the same fp32 maths
    check_sizes = (1,)

    def unsupported_reason(self, art: QuantizedWeights) -> str | None:
        return None

    def pack(self, art: QuantizedWeights) -> dict[str, torch.Tensor]:
        return pack_gptq(art, scale_dtype=torch.float32)  # fp32 scales: exactly the artifact

    def run(self, x, packed, meta, bias):
        return gptq_linear(x, dict(packed), meta.bits, meta.group_size, bias)


@register_backend
class CpuInt4Backend(Backend):
    """torch's CPU int4 op below DENSE_FROM_M rows (bf16 activations and scales), a dense GEMM from our own copy of
    the artifact above (see kernels.cpu_int4)."""

    name = "cpu_int4"
    tolerance = 2e-2  # bf16 activations, scales and float zeros
    check_sizes = (1, DENSE_FROM_M)  # the int4 op, then the dense path

    def unsupported_reason(self, art: QuantizedWeights) -> str | None:
        reason = super().unsupported_reason(art)
        if reason is None and cpu_int4_group_size(art) is None:
            if art.out_features % 16:
                return f"out_features={art.out_features} (needs a multiple of 16)"
            return f"group_size={art.group_size} (needs a multiple of 32)"
        return reason

    def check_device(self, device: torch.device) -> None:
        if torch.device(device).type != "cpu":
            raise ValueError(f"backend='cpu_int4' runs on CPU only; the model is on {device}")

    def pack(self, art: QuantizedWeights) -> dict[str, torch.Tensor]:
        return pack_cpu_int4(art.to("cpu"), dtype=FAST_DTYPE)

    def run(self, x, packed, meta, bias):
        return cpu_int4_linear(x, packed, meta.in_features, meta.group_size, bias)


@register_backend
class TritonBackend(Backend):
    """The Triton W4A16 kernel: fp16 activations, fp16 dequantization, fp32 accumulation (CUDA; CPU tensors only
    under TRITON_INTERPRET=1, for tests). triton is imported only when this backend runs."""

    name = "triton"
    tolerance = 1e-2  # fp16 activations and scales
    check_sizes = (1, 17)  # the split-K kernel (M <= 16), then the tiled one

    def unsupported_reason(self, art: QuantizedWeights) -> str | None:
        reason = super().unsupported_reason(art)
        if reason is None and triton_group_size(art) is None:
            return f"group_size={art.group_size} (needs a multiple of 16 or per-channel)"
        return reason

    def check_device(self, device: torch.device) -> None:
        if torch.device(device).type == "cpu":
            from kernels.triton_w4a16 import is_interpreted  # lazy: imports triton

            if not is_interpreted():
                raise ValueError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 set before "
                                 "kernels.triton_w4a16 is imported, for tests); on CPU use backend='cpu_int4' or "
                                 "'reference'")

    def pack(self, art: QuantizedWeights) -> dict[str, torch.Tensor]:
        return pack_triton_w4(art)

    def run(self, x, packed, meta, bias):
        from kernels.triton_w4a16 import w4a16_matmul  # lazy: imports triton

        x2 = x.reshape(-1, meta.in_features).to(torch.float16).contiguous()
        y = w4a16_matmul(x2, packed["qweight"], packed["scales"], packed["zeros"], meta.in_features).to(x.dtype)
        if bias is not None:
            y = y + bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], meta.out_features)
