"""The oracle: unpack, dequantize and matmul in plain torch (fp32). Every fast backend is tested against it."""
from __future__ import annotations

import torch

from kernels.pack import unpack_bit_stream, unpack_gptq


def dequantize_gptq(tensors: dict[str, torch.Tensor], bits: int, group_size: int | None) -> torch.Tensor:
    """GPTQ tensors (kernels.pack.pack_gptq) -> fp32 weight [out, in]."""
    return unpack_gptq(tensors, bits, group_size).dequantize(torch.float32)


def gptq_linear(x: torch.Tensor, tensors: dict[str, torch.Tensor], bits: int, group_size: int | None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] -> [..., out] in x.dtype, computed in fp32 from GPTQ-packed weights (any bits, act-order allowed)."""
    w = dequantize_gptq(tensors, bits, group_size).to(x.device)
    y = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


def dequantize_triton_w4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         in_features: int) -> torch.Tensor:
    """Triton W4 layout (pack_triton_w4): qweight int32 [Kp/8, N], scales/zeros fp16 [Kp/G, N] -> fp32 [N, K]."""
    Kp = qweight.shape[0] * 8
    G = Kp // scales.shape[0]
    codes = unpack_bit_stream(qweight, 4, Kp).float()  # [Kp, N]
    g = torch.arange(Kp, device=qweight.device) // G
    w = (codes - zeros.float()[g]) * scales.float()[g]
    return w[:in_features].t()


def w4a16_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    in_features: int) -> torch.Tensor:
    """The Triton kernel's oracle: x [M, K] -> fp32 [M, N] with the same fp16 scales/zeros, fp32 maths."""
    return x.float() @ dequantize_triton_w4(qweight, scales, zeros, in_features).t()
