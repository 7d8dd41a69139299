"""CPU int4 weight-only matmul through torch's own kernels (aten._weight_int4pack_mm_for_cpu).

Conventions established by experiment on torch 2.13 (and pinned by tests/test_kernels.py):
- `_convert_weight_to_int4pack_for_cpu(codes int32 [N, K] in [0, 16), inner_k_tiles)` -> opaque uint8 [N, K/2];
  N must be a multiple of 16.
- `_weight_int4pack_mm_for_cpu(x [M, K], packed, g, scales_and_zeros [K/g, N, 2])` computes
  x @ W.T with W[n, k] = (q[n, k] - 8) * scale[k//g, n] + zero[k//g, n]; g in {32, 64, 128, 256}, g | K;
  x and scales_and_zeros share one dtype. bf16 takes the fast vectorised kernel; fp32 and fp16 inputs take a
  path an order of magnitude slower on these machines, so bf16 is the default compute dtype.
Packing from the artifact is kernels.pack.pack_cpu_int4.
"""
from __future__ import annotations

import torch

from kernels.pack import unpack_cpu_int4_codes

FAST_DTYPE = torch.bfloat16
# From this many rows on, dequantize to fp32 once per call and use the dense GEMM instead of the int4 kernel.
# Measured on 4096x4096, 1 thread, loaded shared machine (see docs/kernels.md): int4 kernel 972 ms vs dequant +
# sgemm 745 ms at M=512, 242 vs 555 ms at M=128; the int4 kernel is ~2x slower than sgemm per row at large M.
DENSE_FROM_M = 512


def dequantize_cpu_int4(qweight: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int) -> torch.Tensor:
    """fp32 [N, Kp] weight from torch's int4 pack (uint8 [N, Kp/2]) and scales_and_zeros [Kp/g, N, 2]."""
    n_groups = scales_and_zeros.shape[0]
    sz = scales_and_zeros.float()
    scale = sz[..., 0].t().unsqueeze(-1)  # [N, n_groups, 1]
    zero = (sz[..., 1] - 8 * sz[..., 0]).t().unsqueeze(-1)  # folds torch's -8 offset: W = q * scale + zero'
    w = unpack_cpu_int4_codes(qweight, out_features).view(out_features, n_groups, -1).float()
    return w.mul_(scale).add_(zero).view(out_features, -1)


def cpu_int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int,
                    bias: torch.Tensor | None = None, dense_from_m: int | None = DENSE_FROM_M) -> torch.Tensor:
    """x [..., K] (any float dtype, CPU) -> [..., N] in x.dtype.

    Fewer than `dense_from_m` rows (None: always): torch's int4 kernel in scales_and_zeros.dtype with fp32
    accumulation. Otherwise (prefill): dequantize once and run an fp32 GEMM, which amortises the dequantization.
    """
    if x.device.type != "cpu" or qweight.device.type != "cpu":
        raise ValueError(f"cpu_int4_linear runs on CPU tensors only; got x on {x.device}, qweight on {qweight.device}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has K={x.shape[-1]} but in_features={in_features}")
    Kp = qweight.shape[1] * 2
    g = Kp // scales_and_zeros.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if dense_from_m is not None and x2.shape[0] >= dense_from_m:
        w = dequantize_cpu_int4(qweight, scales_and_zeros, qweight.shape[0])[:, :in_features]
        y = torch.nn.functional.linear(x2.float(), w)
    else:
        x2 = x2.to(scales_and_zeros.dtype)
        if Kp != in_features:  # zero activations against the zero-padded codes: padding contributes nothing
            x2 = torch.nn.functional.pad(x2, (0, Kp - in_features))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), qweight, g, scales_and_zeros)
    y = y.to(x.dtype)
    if bias is not None:  # added in x.dtype, not the (possibly bf16) compute dtype
        y = y + bias.to(x.dtype)
    return y.reshape(*lead, -1)
