"""Pure tensor maths for uniform integer quantization. Knows nothing about models.

Two range rules exist in the reference code and both are kept, because they give different numbers:
- "minmax" (llm-awq / AutoAWQ, the AWQ paper's RTN): the group's [min, max] as it is.
- "minmax_zero" (IST-DASLab/gptq, GPTQModel): the range is widened to include 0.
Symmetric quantization likewise follows the family it belongs to (see `qparams`).
"""
from __future__ import annotations

from typing import Literal

import torch

from core.spec import QuantizedWeights, QuantSpec, group_index

RangeRule = Literal["minmax", "minmax_zero"]
RANGE_RULES: tuple[str, ...] = ("minmax", "minmax_zero")  # the one list every config validates against


def qparams(w: torch.Tensor, bits: int, symmetric: bool, rule: RangeRule = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point per row of `w` [rows, cols] -> (scale [rows] fp32, zero [rows] fp32 holding ints).

    rule="minmax" (AWQ): asym scale = (max-min).clamp(1e-5)/(2^b-1), zero = clamp(-round(min/scale), 0, 2^b-1);
                         sym scale = amax.clamp(1e-5)/(2^(b-1)-1), zero = 2^(b-1).
    rule="minmax_zero" (GPTQ): min<=0<=max forced; an all-zero row gets range [-1, 1];
                         sym uses [-amax, amax], scale = 2*amax/(2^b-1), zero = 2^(b-1).
    """
    w = w.float()
    maxq = 2**bits - 1
    if rule == "minmax":
        if symmetric:
            amax = w.abs().amax(dim=1).clamp(min=1e-5)
            scale = amax / (2 ** (bits - 1) - 1)
            zero = torch.full_like(scale, 2 ** (bits - 1))
        else:
            wmax, wmin = w.amax(dim=1), w.amin(dim=1)
            scale = (wmax - wmin).clamp(min=1e-5) / maxq
            zero = (-torch.round(wmin / scale)).clamp(0, maxq)
        return scale, zero
    if rule == "minmax_zero":
        wmin = w.amin(dim=1).clamp(max=0)
        wmax = w.amax(dim=1).clamp(min=0)
        if symmetric:
            wmax = torch.maximum(wmin.abs(), wmax)
            wmin = torch.where(wmin < 0, -wmax, wmin)
        dead = (wmin == 0) & (wmax == 0)
        wmin, wmax = torch.where(dead, -1.0, wmin), torch.where(dead, 1.0, wmax)
        scale = (wmax - wmin) / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2) if symmetric else torch.round(-wmin / scale)
        return scale, zero
    raise ValueError(f"range rule {rule!r} unknown; allowed values: {list(RANGE_RULES)}")


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes clamp(round(w/scale) + zero, 0, 2^b-1); scale/zero broadcast against w. Returns float."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


def group_slices(in_features: int, group_size: int | None) -> list[slice]:
    """Column slices of each group; the last group is shorter when group_size does not divide in_features."""
    if group_size is None:
        return [slice(0, in_features)]
    return [slice(s, min(s + group_size, in_features)) for s in range(0, in_features, group_size)]


def grouped_qparams(w: torch.Tensor, spec: QuantSpec, rule: RangeRule = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) for w [out, in] -> two fp32 tensors [out, n_groups]. Groups are contiguous."""
    out, inp = w.shape
    if spec.group_size is None:
        s, z = qparams(w, spec.bits, spec.symmetric, rule)
        return s[:, None], z[:, None]
    gs = spec.group_size
    n_full = inp // gs
    scales, zeros = [], []
    if n_full:  # all full groups at once
        s, z = qparams(w[:, : n_full * gs].reshape(out * n_full, gs), spec.bits, spec.symmetric, rule)
        scales.append(s.reshape(out, n_full))
        zeros.append(z.reshape(out, n_full))
    if inp % gs:  # the short last group
        s, z = qparams(w[:, n_full * gs:], spec.bits, spec.symmetric, rule)
        scales.append(s[:, None])
        zeros.append(z[:, None])
    return torch.cat(scales, dim=1), torch.cat(zeros, dim=1)


def quantize_weight(w: torch.Tensor, spec: QuantSpec, rule: RangeRule = "minmax") -> QuantizedWeights:
    """Round-to-nearest quantization of w [out, in] into the common artifact (the RTN core)."""
    scale, zero = grouped_qparams(w, spec, rule)
    g = group_index(w.shape[1], spec.group_size, w.device)
    codes = quantize_codes(w.float(), scale[:, g], zero[:, g], spec.bits)
    return QuantizedWeights(codes=codes.to(torch.uint8), scales=scale, zeros=zero.to(torch.uint8),
                            bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric)


def fake_quantize(w: torch.Tensor, spec: QuantSpec, rule: RangeRule = "minmax") -> torch.Tensor:
    """Quantize-dequantize w [out, in] in one step, in w's dtype (used inside search loops)."""
    return quantize_weight(w, spec, rule).dequantize(w.dtype)
