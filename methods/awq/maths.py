"""Pure tensor maths of AWQ's two searches (activation-aware scales, weight clipping). Knows nothing about models.

Formulas follow llm-awq (`auto_scale.py`, `auto_clip.py`) and AutoAWQ (`quantizer.py`); the clip error is
computed through a per-group Gram matrix instead of materialising every (channel, token, group) product, which
gives the same numbers (up to float rounding) at a fraction of the cost.
"""
from __future__ import annotations

import torch

from core.quant import dequantize_codes, qparams, quantize_codes
from core.spec import QuantSpec, group_index


def group_segments(in_features: int, group_size: int | None) -> list[tuple[int, int, int]]:
    """(start, n_groups, width) runs of equal-width groups: the full groups, then the short last group if any."""
    if group_size is None:
        return [(0, 1, in_features)]
    n_full, rest = divmod(in_features, group_size)
    segments = [(0, n_full, group_size)] if n_full else []
    if rest:
        segments.append((n_full * group_size, 1, rest))
    return segments


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """The precision the searches compute in: fp32, or fp64 for an fp64 model (whose discrete choices must then not
    flip under last-bit differences between CPU kernel families)."""
    return torch.promote_types(t.dtype, torch.float32)


def act_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-input-channel mean of |x| over all tokens: x [..., in] -> [in] in work_dtype(x)."""
    x = x.reshape(-1, x.shape[-1])
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for chunk in torch.split(x, 65536):  # fp64 accumulation: sums over 10^5+ tokens stay exact enough
        total += chunk.abs().sum(0, dtype=torch.float64)
    return (total / x.shape[0]).to(work_dtype(x))


def weight_mean(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """AutoAWQ's w_mean: |w| normalised by its quantization group's max, averaged over output rows.

    w [out, in] (the scaled layers' weights concatenated along out) -> [in] in work_dtype(w). The short last group
    is normalised by its own max, as it is quantized on its own.
    """
    w = w.to(work_dtype(w)).abs()
    out = w.shape[0]
    parts = []
    for start, n, width in group_segments(w.shape[1], group_size):
        g = w[:, start:start + n * width].reshape(out, n, width)
        parts.append((g / (g.amax(dim=-1, keepdim=True) + 1e-6)).reshape(out, n * width))
    return torch.cat(parts, dim=1).mean(0)


def awq_scale(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """Candidate per-input-channel scale s [in] (in x_mean's dtype, at least fp32) for one grid point alpha in [0, 1).

    duo (w_mean given, AutoAWQ's default): s = x_mean^alpha / (w_mean^(1-alpha) + 1e-4);
    llm-awq (w_mean None):               s = x_mean^alpha.
    Both are clamped to >= 1e-4 and normalised by sqrt(max(s) * min(s)) so the scale is centred around 1.
    """
    dtype = work_dtype(x_mean)
    s = x_mean.to(dtype).pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.to(dtype).pow(1 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    # As in the references: a channel whose scale overflowed is left unscaled rather than poisoning the layer.
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def fold_scale_into_norm(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor,
                         offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Divide a norm's effective gain (offset + weight) [D] and its bias [D] by s [D]; returns the new (weight, bias).

    offset=1 is Gemma's RMSNorm, whose output is x * (1 + weight): the effective gain is what must shrink.
    """
    s = s.to(weight.dtype)
    new_weight = (weight + offset) / s - offset
    return new_weight, None if bias is None else bias / s


def sample_tokens(x: torch.Tensor, n_tokens: int | None) -> torch.Tensor:
    """x [..., in] -> [T', in]: every (T // n_tokens)-th token, the references' deterministic subsample."""
    x = x.reshape(-1, x.shape[-1])
    if n_tokens is None:
        return x
    return x[:: max(1, x.shape[0] // n_tokens)]


def _fake_quantize_rows(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """AWQ quantize-dequantize of every row of w [rows, width] as one group (in w's dtype, at least fp32)."""
    scale, zero = qparams(w, spec.bits, spec.symmetric, "minmax")
    return dequantize_codes(quantize_codes(w, scale[:, None], zero[:, None], spec.bits), scale[:, None], zero[:, None])


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, n_grid: int = 20, max_shrink: float = 0.5,
                oc_batch: int = 1024) -> torch.Tensor:
    """Best clipping threshold per (output row, group): w [out, in], x [T, in] -> max_val [out, n_groups] in
    work_dtype(w).

    For i < int(max_shrink * n_grid): max_val = amax * (1 - i / n_grid); clamp w to [-max_val, max_val], quantize,
    and score mean over tokens of (x_g . (Q(w_g) - w_g))^2 per group g, computed as dw_g^T (X_g^T X_g / T) dw_g.
    """
    out, inp = w.shape
    if x.shape[-1] != inp:
        raise ValueError(f"clip search: inputs have {x.shape[-1]} features, weight has {inp}")
    w = w.to(work_dtype(w))
    x = x.reshape(-1, inp).to(torch.float64)
    n_steps = int(max_shrink * n_grid)
    parts = []
    for start, n, width in group_segments(inp, spec.group_size):
        xg = x[:, start:start + n * width].reshape(-1, n, width)
        gram = torch.einsum("tgk,tgl->gkl", xg, xg) / xg.shape[0]  # [n, width, width] fp64
        wg_all = w[:, start:start + n * width].reshape(out, n, width)
        best_parts = []
        for o in range(0, out, oc_batch):  # bounded memory on wide layers
            wg = wg_all[o:o + oc_batch]
            amax = wg.abs().amax(dim=-1)  # [oc, n]
            best = amax.clone()
            min_err = torch.full_like(amax, float("inf"), dtype=torch.float64)
            for i in range(n_steps):
                max_val = amax * (1 - i / n_grid)
                cw = torch.clamp(wg, -max_val[..., None], max_val[..., None])
                qw = _fake_quantize_rows(cw.reshape(-1, width), spec).reshape(cw.shape)
                dw = (qw - wg).to(torch.float64)  # error against the unclipped weight, as in the references
                err = (torch.einsum("cgk,gkl->cgl", dw, gram) * dw).sum(-1)
                better = err < min_err
                min_err = torch.where(better, err, min_err)
                best = torch.where(better, max_val, best)
            best_parts.append(best)
        parts.append(torch.cat(best_parts, dim=0))
    return torch.cat(parts, dim=1)


def clip_weight(w: torch.Tensor, max_val: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Clamp w [out, in] to [-max_val, max_val] per (row, group); max_val [out, n_groups]. Returns a new tensor."""
    g = group_index(w.shape[1], group_size, w.device)
    if max_val.shape != (w.shape[0], int(g[-1]) + 1):
        raise ValueError(f"clip max_val has shape {tuple(max_val.shape)}, expected {(w.shape[0], int(g[-1]) + 1)}")
    m = max_val.to(w.dtype)[:, g]
    return torch.maximum(torch.minimum(w, m), -m)
