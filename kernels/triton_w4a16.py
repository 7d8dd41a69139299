"""Triton W4A16 GEMM: fp16 activations x packed int4 weights (fp16 scales and zeros per group), fp32 accumulation.

Weight layout (kernels.pack.pack_triton_w4): qweight int32 [Kp/8, N] holds 8 consecutive input rows per word
(row k in bits 4*(k%8)..+3), scales/zeros fp16 [Kp/G, N], W[k, n] = (q - zeros[k//G, n]) * scales[k//G, n].
Kp is K padded up to a multiple of G; columns k >= K are masked off the activations, so padding adds nothing.

Two kernels share one dequantization helper:
- `_w4a16_splitk_kernel` (decode, M <= 16): one BLOCK_M=16 row tile, the K loop split over SPLIT_K programs
  that write fp32 partial sums [SPLIT_K, M, N], reduced by the launcher (deterministic, no atomics), so a
  skinny GEMM still launches enough programs to stream the weights from every SM.
- `_w4a16_tiled_kernel` (prefill): classic tiled GEMM with grouped program ordering for L2 reuse.
Each K tile lies inside one group (BLOCK_K divides G), so scales/zeros are one row per tile.

This module imports triton; import it lazily. Set TRITON_INTERPRET=1 *before* importing it to run the kernels
on CPU tensors (Triton's interpreter: fp16 tl.dot is exact there, bf16 is not, autotune is unavailable,
out-of-bounds loads are not caught - hence fixed configs and explicit masks everywhere).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters. split_k > 1 selects the split-K (decode) kernel, 1 the tiled (prefill) kernel.
    block_m >= 16 (tl.dot's minimum); block_k must divide the group size; block_n, block_k powers of two."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8  # tiled kernel: rows of output tiles visited together, for L2 reuse of weight tiles
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name}={v} must be a power of two >= 16")
        if self.split_k < 1:
            raise ValueError(f"KernelConfig.split_k={self.split_k} must be >= 1")


@triton.jit
def _dequant_tile(qw_ptr, scales_ptr, zeros_ptr, offs_k, offs_n, group, N,
                  stride_qk, stride_qn, stride_sg, stride_sn):
    """fp16 [BLOCK_K, BLOCK_N] weight tile of rows offs_k (all in `group`) and columns offs_n."""
    mask_n = offs_n < N
    words = tl.load(qw_ptr + (offs_k // 8)[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                    mask=mask_n[None, :], other=0)
    q = (words >> ((offs_k % 8) * 4)[:, None]) & 0xF
    s = tl.load(scales_ptr + group * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0)
    z = tl.load(zeros_ptr + group * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0)
    return (q.to(tl.float16) - z[None, :]) * s[None, :]


@triton.jit
def _tile_product(x_ptr, qw_ptr, scales_ptr, zeros_ptr, offs_m, offs_n, kt, mask_m, N, K,
                  stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn,
                  GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] = x[offs_m, K tile kt] @ dequantized W[K tile kt, offs_n] (K beyond K masked)."""
    offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
    w = _dequant_tile(qw_ptr, scales_ptr, zeros_ptr, offs_k, offs_n, (kt * BLOCK_K) // GROUP_SIZE, N,
                      stride_qk, stride_qn, stride_sg, stride_sn)
    return tl.dot(x, w)


@triton.jit
def _w4a16_splitk_kernel(
    x_ptr, qw_ptr, scales_ptr, zeros_ptr, part_ptr,  # pointers
    M, N, K, Kp,  # sizes
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_ps, stride_pm, stride_pn,  # strides
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(pid_k, Kp // BLOCK_K, SPLIT_K):
        acc += _tile_product(x_ptr, qw_ptr, scales_ptr, zeros_ptr, offs_m, offs_n, kt, mask_m, N, K,
                             stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, GROUP_SIZE, BLOCK_K)
    tl.store(part_ptr + pid_k * stride_ps + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn, acc,
             mask=mask_m[:, None] & (offs_n < N)[None, :])


@triton.jit
def _w4a16_tiled_kernel(
    x_ptr, qw_ptr, scales_ptr, zeros_ptr, out_ptr,  # pointers
    M, N, K, Kp,  # sizes
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_om, stride_on,  # strides
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped ordering (as in Triton's matmul tutorial): consecutive programs share weight tiles in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, Kp // BLOCK_K):
        acc += _tile_product(x_ptr, qw_ptr, scales_ptr, zeros_ptr, offs_m, offs_n, kt, mask_m, N, K,
                             stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, GROUP_SIZE, BLOCK_K)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to(tl.float16),
             mask=mask_m[:, None] & (offs_n < N)[None, :])


def is_interpreted() -> bool:
    """True when this module's kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return isinstance(_w4a16_tiled_kernel, InterpretedFunction)


def _largest_pow2_divisor(n: int, cap: int) -> int:
    b = 16
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def pick_config(M: int, N: int, Kp: int, group_size: int, n_sm: int) -> KernelConfig:
    """Fixed heuristic (no autotune, which the interpreter lacks): split-K for M <= 16, tiled otherwise."""
    if M <= 16:
        block_n, block_k = 64, _largest_pow2_divisor(group_size, 128)
        n_tiles_n, n_tiles_k = -(-N // block_n), Kp // block_k
        # enough programs for ~2 waves on the device, but at least 2 K tiles per program
        split_k = max(1, min(-(-2 * n_sm // n_tiles_n), n_tiles_k // 2))
        return KernelConfig(16, block_n, block_k, split_k=split_k, num_warps=4, num_stages=3)
    block_m = 64 if M <= 64 else 128
    return KernelConfig(block_m, 128, _largest_pow2_divisor(group_size, 64), num_warps=8 if block_m == 128 else 4,
                        num_stages=3)


def _check_inputs(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  in_features: int) -> int:
    """Validate shapes/dtypes/devices; return the group size."""
    if x.dim() != 2 or x.dtype != torch.float16:
        raise ValueError(f"x must be fp16 [M, K]; got {x.dtype} {tuple(x.shape)}")
    if qweight.dtype != torch.int32 or scales.dtype != torch.float16 or zeros.dtype != torch.float16:
        raise ValueError(f"expected qweight int32, scales/zeros fp16; got {qweight.dtype}, {scales.dtype}, "
                         f"{zeros.dtype}")
    Kp, N = qweight.shape[0] * 8, qweight.shape[1]
    if x.shape[1] != in_features:
        raise ValueError(f"x has K={x.shape[1]} but in_features={in_features}")
    if scales.shape != zeros.shape or scales.shape[1] != N or Kp % scales.shape[0]:
        raise ValueError(f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} do not fit "
                         f"qweight {tuple(qweight.shape)}")
    G = Kp // scales.shape[0]
    if G % 16 or not Kp - G < in_features <= Kp:
        raise ValueError(f"group size {G} must be a multiple of 16 and K={in_features} must pad to Kp={Kp} "
                         "by less than one group")
    devices = {t.device for t in (x, qweight, scales, zeros)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not is_interpreted():
        raise ValueError("Triton W4A16 on CPU tensors needs TRITON_INTERPRET=1 set before kernels.triton_w4a16 is "
                         "imported; otherwise use a CUDA device or backend='cpu_int4'/'reference'")
    return G


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 in_features: int, config: KernelConfig | None = None) -> torch.Tensor:
    """x fp16 [M, K] @ dequant(qweight int32 [Kp/8, N], scales/zeros fp16 [Kp/G, N]).T -> fp16 [M, N]."""
    G = _check_inputs(x, qweight, scales, zeros, in_features)
    M, K = x.shape
    Kp, N = qweight.shape[0] * 8, qweight.shape[1]
    if config is None:
        n_sm = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        config = pick_config(M, N, Kp, G, n_sm)
    if G % config.block_k:
        raise ValueError(f"config.block_k={config.block_k} must divide the group size {G}")
    strides = (x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1))
    if config.split_k > 1:
        if config.block_m < M:
            raise ValueError(f"the split-K kernel covers M <= block_m={config.block_m}; got M={M}")
        part = torch.empty(config.split_k, M, N, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(N, config.block_n), config.split_k)
        _w4a16_splitk_kernel[grid](
            x, qweight, scales, zeros, part, M, N, K, Kp, *strides, part.stride(0), part.stride(1), part.stride(2),
            GROUP_SIZE=G, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            SPLIT_K=config.split_k, num_warps=config.num_warps, num_stages=config.num_stages)
        return part.sum(dim=0).to(torch.float16)
    out = torch.empty(M, N, dtype=torch.float16, device=x.device)
    grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n),)
    _w4a16_tiled_kernel[grid](
        x, qweight, scales, zeros, out, M, N, K, Kp, *strides, out.stride(0), out.stride(1),
        GROUP_SIZE=G, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages)
    return out
