"""CPU int4 weight-only matmul through torch's own kernels (aten._weight_int4pack_mm_for_cpu).

The op's contract (pinned by tests/test_kernels.py, on every CPU kernel family):
- `_convert_weight_to_int4pack_for_cpu(codes int32 [N, K] in [0, 16), inner_k_tiles)` -> an opaque uint8 tensor;
  N must be a multiple of 16. Its byte layout differs between kernel families (ATEN_CPU_CAPABILITY=default, avx2,
  avx512), so nothing here ever reads it: it is only handed back to the op.
- `_weight_int4pack_mm_for_cpu(x [M, K], packed, g, scales_and_zeros [K/g, N, 2])` computes
  x @ W.T with W[n, k] = (q[n, k] - 8) * scale[k//g, n] + zero[k//g, n]; g in {32, 64, 128, 256}, g | K;
  x and scales_and_zeros share one dtype. bf16 takes the fast vectorised kernel; fp32 and fp16 inputs take a
  path an order of magnitude slower on these machines, so bf16 is the default compute dtype.

Large M (prefill) runs densely instead: the weight is dequantized from our own copy of the artifact (codes in
kernels.pack.pack_nibbles layout, fp32 scales, integer zeros), never from torch's pack. Packing is
kernels.pack.pack_cpu_int4.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import torch

from core.spec import group_index
from kernels.pack import unpack_nibbles

FAST_DTYPE = torch.bfloat16
# From this many rows on, dequantize once per call and use the dense GEMM instead of the int4 kernel.
# Measured on 4096x4096, 1 thread, loaded shared machine (see docs/kernels.md): int4 kernel 972 ms vs dequant +
# sgemm 745 ms at M=512, 242 vs 555 ms at M=128; the int4 kernel is ~2x slower than sgemm per row at large M.
DENSE_FROM_M = 512


@lru_cache(maxsize=1)
def native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX): bf16 dense GEMMs are then the fast ones."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def dense_dtype() -> torch.dtype:
    """The dtype of the dense (large-M) path: bf16 where the CPU has native bf16, else fp32 (bf16 is emulated and
    slow on AVX2-only CPUs)."""
    return torch.bfloat16 if native_bf16() else torch.float32


def dequantize_own(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int,
                   group_size: int | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] weight in `dtype` from our own layout: codes uint8 [N, ceil(K/2)] (pack_nibbles), scales fp32
    [N, n_groups], zeros uint8 [N, n_groups]; contiguous groups of `group_size` (None: one per row)."""
    q = unpack_nibbles(codes, in_features).float()
    g = group_index(in_features, group_size)
    return ((q - zeros.float()[:, g]) * scales[:, g]).to(dtype)


def cpu_int4_linear(x: torch.Tensor, packed: Mapping[str, torch.Tensor], in_features: int, group_size: int | None,
                    bias: torch.Tensor | None = None, dense_from_m: int | None = DENSE_FROM_M,
                    dense: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] (any float dtype, CPU) -> [..., N] in x.dtype; `packed` is pack_cpu_int4's dict.

    Fewer than `dense_from_m` rows (None: always): torch's int4 kernel in scales_and_zeros.dtype with fp32
    accumulation. Otherwise (prefill): dequantize our own copy of the artifact once and run a dense GEMM in
    `dense` (default: dense_dtype()), which amortises the dequantization.
    """
    qweight, scales_and_zeros = packed["qweight"], packed["scales_and_zeros"]
    if x.device.type != "cpu" or qweight.device.type != "cpu":
        raise ValueError(f"cpu_int4_linear runs on CPU tensors only; got x on {x.device}, qweight on {qweight.device}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has K={x.shape[-1]} but in_features={in_features}")
    Kp = qweight.shape[1] * 2
    g = Kp // scales_and_zeros.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if dense_from_m is not None and x2.shape[0] >= dense_from_m:
        dtype = dense or dense_dtype()
        w = dequantize_own(packed["codes"], packed["scales"], packed["zeros"], in_features, group_size, dtype)
        y = torch.nn.functional.linear(x2.to(dtype), w)
    else:
        x2 = x2.to(scales_and_zeros.dtype)
        if Kp != in_features:  # zero activations against the zero-padded codes: padding contributes nothing
            x2 = torch.nn.functional.pad(x2, (0, Kp - in_features))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), qweight, g, scales_and_zeros)
    y = y.to(x.dtype)
    if bias is not None:  # added in x.dtype, not the (possibly bf16) compute dtype
        y = y + bias.to(x.dtype)
    return y.reshape(*lead, -1)
