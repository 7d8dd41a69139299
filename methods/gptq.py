"""GPTQ (Frantar et al. 2022), faithful to IST-DASLab/gptq and AutoGPTQ/GPTQModel.

Two layers, kept apart:
- the layer-level core (`HessianAccumulator`, `gptq_quantize_layer`): pure tensor maths on one weight
  matrix and its Hessian; knows nothing about models (AWQ's `awq_gptq` variant calls it too);
- the `GPTQ` method: per decoder block (the block pipeline walks them), collects each linear's Hessian in the
  architecture's true-sequential order and writes the quantized weights back so later linears and blocks see
  them.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from core.quant import RANGE_RULES, qparams, quantize_weight
from core.spec import QuantizedWeights, QuantSpec
from methods.base import Method, QuantizationResult, min_tokens, register_method
from structure.blockwise import BlockContext, OutputCache

log = logging.getLogger(__name__)

COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class HessianAccumulator:
    """Running mean of H = 2/n * sum_t x_t x_t^T over n input rows (the GPTQ proxy Hessian), in `dtype`.

    n counts token rows, as GPTQModel does (IST-DASLab counts sequences); the factor only rescales H,
    and damping is relative to mean(diag(H)), so the quantized result does not depend on it.
    H is symmetric, so only its lower triangle is accumulated, a band of TRIANGLE_ROWS rows at a time (the band's
    product runs up to the diagonal): 54-67% of the full product's multiplications at SmolLM2's widths, the same
    fp64 sums blocked differently; `H` mirrors the triangle.
    """

    TRIANGLE_ROWS = 128

    def __init__(self, in_features: int, device: torch.device | str, name: str = "layer",
                 dtype: torch.dtype = torch.float64) -> None:
        self.name = name
        self.n = 0
        self._H = torch.zeros(in_features, in_features, dtype=dtype, device=device)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Accumulate activations x [..., in] (any float dtype)."""
        if x.shape[-1] != self._H.shape[0]:
            raise ValueError(f"{self.name}: activation width {x.shape[-1]} != in_features {self._H.shape[0]}")
        x = x.reshape(-1, x.shape[-1]).to(device=self._H.device, dtype=self._H.dtype)
        m = x.shape[0]
        if m == 0:
            return
        # Running mean: rescale what is there, then add the new rows with weight 2/n.
        self._H.mul_(self.n / (self.n + m))
        self.n += m
        width, band = x.shape[1], self.TRIANGLE_ROWS
        for start in range(0, width, band):
            stop = min(width, start + band)
            self._H[start:stop, :stop].addmm_(x[:, start:stop].T, x[:, :stop], alpha=2.0 / self.n)

    @property
    def H(self) -> torch.Tensor:
        """[in, in] in the accumulator's dtype (exactly symmetric); ValueError when no activation was ever added
        (empty calibration)."""
        if self.n == 0:
            raise ValueError(f"{self.name}: no calibration activations reached this layer (empty calibration), "
                             "cannot build its GPTQ Hessian")
        lower = torch.tril(self._H)
        return lower + torch.tril(lower, -1).T


def _damped_inverse_factor(H: torch.Tensor, damp_percent: float, damp_increment: float, max_damp_retries: int,
                           name: str) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1 for H [in, in] -> (Hinv, damp used, retries).

    The first damp is `damp_percent` (the reference); on a failed factorization it grows by `damp_increment`
    (GPTQModel's damp_auto_increment walk) at most `max_damp_retries` times.
    """
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for retry in range(max_damp_retries + 1):
        damp = damp_percent + retry * damp_increment
        L, info = torch.linalg.cholesky_ex(H + (damp * mean_diag) * eye)
        if info.item() == 0:
            # Both steps must succeed: an extreme dynamic range can pass the first and fail the second.
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                if retry:
                    log.warning("%s: Hessian Cholesky succeeded after %d damp retries at damp_percent=%.4f",
                                name, retry, damp)
                return U, damp, retry
        log.warning("%s: Hessian not positive definite at damp_percent=%.4f%s", name, damp,
                    "; raising the damping" if retry < max_damp_retries else "")
        if damp_increment <= 0:
            break
    raise ValueError(f"{name}: GPTQ Hessian stays singular (not positive definite) after {max_damp_retries} damp "
                     f"retries up to damp_percent={damp_percent + max_damp_retries * damp_increment:.4f}; "
                     "use more calibration data or raise method.damp_percent / method.max_damp_retries")


@torch.no_grad()
def gptq_quantize_layer(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, *, block_size: int = 128,
                        damp_percent: float = 0.01, desc_act: bool = False, static_groups: bool = False,
                        range_rule: str = "minmax_zero", max_damp_retries: int = 10, damp_increment: float = 0.01,
                        dtype: torch.dtype = torch.float64, name: str = "layer") -> tuple[QuantizedWeights, dict]:
    """GPTQ one weight W [out, in] (any float dtype) with Hessian H [in, in] -> (artifact, stats).

    `dtype` is the precision of the inverse and the column loop: float64 keeps the rounding choices from flipping
    under last-bit differences of H (thread count, CPU kernel family); float32 is the reference's precision.
    Scales are computed in fp32 (as stored), so the artifact's codes are exactly the ones the loop chose.
    stats: damp_percent (used), damp_retries, loss (IST-DASLab's sum of (w-q)^2/Hinv_ii^2/2), n_dead.
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"{name}: W {tuple(W.shape)} and H {tuple(H.shape)} do not match (need [out, in], [in, in])")
    if range_rule not in RANGE_RULES:
        raise ValueError(f"{name}: range_rule={range_rule!r}; allowed values: {list(RANGE_RULES)}")
    if block_size <= 0:
        raise ValueError(f"{name}: block_size={block_size} must be a positive integer")
    if not torch.isfinite(W).all():
        raise ValueError(f"{name}: weight contains NaN/Inf")
    if not torch.isfinite(H).all():
        raise ValueError(f"{name}: Hessian contains NaN/Inf (non-finite calibration activations?)")
    W = W.detach().to(dtype).clone()
    H = H.detach().to(device=W.device, dtype=dtype).clone()
    out_features, columns = W.shape
    gs = spec.group_size
    maxq = spec.maxq

    # Per-channel params come from the untouched W, before dead columns are zeroed (as the reference does).
    if gs is None:
        row_scale, row_zero = _qparams(W, spec, range_rule)

    dead = torch.diag(H) == 0
    n_dead = int(dead.sum())
    if n_dead == columns:
        raise ValueError(f"{name}: the Hessian is all zero (every input channel is dead): no calibration signal")
    # An input that never fires carries no information: pin its curvature and drop its weights.
    H[dead, dead] = 1
    W[:, dead] = 0

    static_params = None
    if gs is not None and static_groups:
        static_params = [_qparams(W[:, s:s + gs], spec, range_rule) for s in range(0, columns, gs)]

    perm = None
    if desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]

    Hinv, damp, retries = _damped_inverse_factor(H, damp_percent, damp_increment, max_damp_retries, name)
    del H

    codes = torch.zeros_like(W)
    loss = torch.zeros((), dtype=dtype, device=W.device)
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    if gs is None:
        scale, zero = row_scale, row_zero
    perm_list = perm.tolist() if perm is not None else None
    q = torch.empty(out_features, dtype=dtype, device=W.device)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        # Work on the block transposed ([cols, out]) so each column is one contiguous row: fewer, cheaper kernels.
        W1 = W[:, i1:i2].T.contiguous()
        Q1 = torch.empty_like(W1)
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        # Per-column views and the diagonal as Python floats, made once per block: the loop below is
        # dispatch-bound (one small op per line), so every indexing op it does not do is time saved.
        w_rows, q_rows, err_rows, h_rows = W1.unbind(0), Q1.unbind(0), Err1.unbind(0), Hinv1.unbind(0)
        h_diag = Hinv1.diagonal().tolist()
        for i in range(i2 - i1):
            c = i1 + i
            if static_params is not None:
                scale, zero = static_params[(perm_list[c] if desc_act else c) // gs]
            elif gs is not None and c % gs == 0:
                # Dynamic groups read W, which already holds the updates of earlier blocks but not yet those of
                # earlier columns of this block: exactly the reference's find_params(W[:, c:c+gs]).
                scale, zero = _qparams(W[:, c:c + gs], spec, range_rule)
                scales.append(scale)
                zeros.append(zero)
            w, code, err = w_rows[i], q_rows[i], err_rows[i]
            torch.div(w, scale, out=code).round_().add_(zero).clamp_(0, maxq)
            torch.sub(code, zero, out=q).mul_(scale)  # the dequantized weight s * (code - z)
            torch.sub(w, q, out=err).div_(h_diag[i])
            W1[i + 1:].sub_(torch.outer(h_rows[i][i + 1:], err))
        codes[:, i1:i2] = Q1.T
        # Each err is already divided by Hinv_ii: the reference's (w - q)^2 / Hinv_ii^2 / 2 is err^2 / 2.
        loss += Err1.square().sum() / 2
        # Lazy batch update: the rest of the matrix sees this block's errors in one matmul.
        W[:, i2:] -= Err1.T @ Hinv[i1:i2, i2:]

    if gs is None:
        scales, zeros = [row_scale], [row_zero]
    elif static_params is not None:
        scales, zeros = [s for s, _ in static_params], [z for _, z in static_params]
    S = torch.stack(scales, dim=1).float()  # exact: the scales were fp32 values all along
    Z = torch.stack(zeros, dim=1)
    g_idx = None
    if perm is not None:
        invperm = torch.argsort(perm)
        codes = codes[:, invperm]
        if gs is not None:
            # Column j was processed at position invperm[j]; dynamic groups are numbered in processing order,
            # static groups keep the original contiguous numbering.
            g_pos = torch.arange(columns, device=W.device) // gs
            g_idx = (g_pos[invperm] if static_params is None else g_pos).to(torch.int32)

    loss_value = float(loss)
    if not math.isfinite(loss_value):
        raise ValueError(f"{name}: GPTQ produced a non-finite loss ({loss_value}); check the Hessian and weights")
    art = QuantizedWeights(codes=codes.to(torch.uint8), scales=S, zeros=Z.to(torch.uint8), bits=spec.bits,
                           group_size=gs, symmetric=spec.symmetric, g_idx=g_idx)
    stats = {"damp_percent": damp, "damp_retries": retries, "loss": loss_value, "n_dead": n_dead}
    return art, stats


def _qparams(w: torch.Tensor, spec: QuantSpec, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """qparams in fp32 (the precision they are stored in), returned in w's dtype for the column loop."""
    scale, zero = qparams(w, spec.bits, spec.symmetric, rule)
    return scale.to(w.dtype), zero.to(w.dtype)


@dataclass(frozen=True)
class GPTQConfig:
    """`method=gptq`. Defaults follow IST-DASLab/gptq (and AutoGPTQ); see conf/method/gptq.yaml and docs/gptq.md.

    damp_percent: relative dampening, H += damp_percent * mean(diag H) * I.
    block_size: columns per lazy batch update.
    desc_act: act-order, process columns by descending diag(H); records g_idx.
    static_groups: group params from the original W up front (instead of at each group boundary).
    true_sequential: quantize the architecture's sequential groups in turn within a block (else all at once).
    range_rule: "minmax_zero" (the reference quantizer, range includes 0) or "minmax".
    damp_increment / max_damp_retries: if Cholesky fails, damp += damp_increment, at most this many times.
    batch_size: calibration samples per block forward.
    hessian_dtype: precision of the Hessian, its inverse and the column loop. "float64" (default, a deliberate
        difference from the fp32 reference): results do not move with thread count or CPU kernel family;
        "float32": the reference's precision (faster; see docs/gptq.md for both).
    output_cache_gb: memory for the outputs of a block's already-quantized linears, which the block's later
        partial forwards reuse instead of recomputing (structure.blockwise.OutputCache); at most a quarter of the
        memory free when the block starts; 0 recomputes them. Speed and memory only: the result is bit-identical for
        every value, so it is not part of the run's key.
    moe_min_tokens: a routed expert whose Hessian rests on fewer calibration tokens than this ("0.5%" of them, or a
        count such as "64"; null: "0.5%") is rounded to nearest (`range_rule`) instead, as GPTQModel's default fallback does;
        counted in the rows (`stat_fallback`, `experts_fallback`) and warned about. Dense linears see every token.
    """

    SPEED_ONLY: ClassVar[tuple[str, ...]] = ("output_cache_gb",)

    name: str = "gptq"
    damp_percent: float = 0.01
    block_size: int = 128
    desc_act: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    range_rule: str = "minmax_zero"
    damp_increment: float = 0.01
    max_damp_retries: int = 10
    batch_size: int = 1
    hessian_dtype: str = "float64"
    output_cache_gb: float = 2.0
    moe_min_tokens: Optional[str] = None

    def __post_init__(self) -> None:
        if self.hessian_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"method.hessian_dtype={self.hessian_dtype!r}; allowed values: {list(COMPUTE_DTYPES)}")
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"method.damp_percent={self.damp_percent} must be in (0, 1)")
        if not 0 <= self.damp_increment < 1:
            raise ValueError(f"method.damp_increment={self.damp_increment} must be in [0, 1)")
        for key in ("block_size", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"method.{key}={value!r} must be a positive integer")
        if not isinstance(self.output_cache_gb, (int, float)) or not 0 <= self.output_cache_gb < float("inf"):
            raise ValueError(f"method.output_cache_gb={self.output_cache_gb!r} must be a number >= 0 (0 = no cache)")
        if not isinstance(self.max_damp_retries, int) or self.max_damp_retries < 0:
            raise ValueError(f"method.max_damp_retries={self.max_damp_retries!r} must be a non-negative integer")
        if self.range_rule not in RANGE_RULES:
            raise ValueError(f"method.range_rule={self.range_rule!r}; allowed values: {list(RANGE_RULES)}")
        min_tokens(self.moe_min_tokens, 1)  # the value parses


class _GroupDone(Exception):
    """Raised by an input hook once every linear of the current group has seen its input."""


@torch.no_grad()
def collect_hessians(ctx: BlockContext, names: tuple[str, ...], device: torch.device,
                     dtype: torch.dtype = torch.float64, routed: frozenset[str] = frozenset(),
                     experts: str | None = None) -> dict[str, HessianAccumulator]:
    """Run the block over its calibration inputs and return {name: Hessian of that linear's inputs}.

    Linears fed the very same tensor (q/k/v, gate/up; every expert when every token goes through every expert) share
    one accumulator, and the forward stops as soon as the group is complete, before anything after it runs (later
    layers of the block are not needed): when the last linear of the group has its input, and, if the group holds
    routed experts (`routed`: their names; `experts`: the experts module), once that module has run. A routed expert
    the router never chose gets an empty accumulator (n = 0); any other linear without input is an error. Linears of
    earlier groups serve their outputs from ctx.output_cache where it holds them.
    """
    linears = {n: ctx.block.get_submodule(n) for n in names}
    dense = [n for n in names if n not in routed]
    accs: dict[str, HessianAccumulator] = {}
    alias: dict[str, str] = {}  # linear -> linear whose accumulator it shares
    seen: dict[tuple, str] = {}
    held: list[torch.Tensor] = []  # keep this batch's inputs alive so an address is never reused within it
    state = {"experts_done": not routed}

    def complete() -> bool:
        # after the first batch, a linear that shares its input with one already seen has it too (up_proj with
        # gate_proj): the forward stops before computing gate_proj
        return state["experts_done"] and all(n in seen_names or (known and alias[n] in seen_names) for n in dense)

    def on_input(name: str, x: torch.Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x._version)
        owner = seen.get(key)
        if owner is None:
            seen[key] = name
            held.append(x)
            if name not in accs:
                accs[name] = HessianAccumulator(linears[name].in_features, device, name=ctx.full_name(name), dtype=dtype)
            accs[name].add(x)
            owner = name
        if alias.setdefault(name, owner) != owner:
            raise RuntimeError(f"{ctx.full_name(name)}: shared-input pattern changed between calibration batches")
        seen_names.add(name)
        if complete():
            raise _GroupDone

    def on_experts_done(*_) -> None:
        state["experts_done"] = True
        if complete():
            raise _GroupDone

    seen_names: set[str] = set()
    known = False  # whether the first batch has shown which linears share an input
    done_hook = ctx.block.get_submodule(experts).register_forward_hook(on_experts_done) if routed else None
    try:
        with ctx.input_hooks(list(names), on_input):
            for i in range(0, ctx.inputs.shape[0], ctx.batch_size):
                seen.clear()
                held.clear()
                seen_names.clear()
                state["experts_done"] = not routed
                try:
                    with ctx.calibration_batch(i):
                        ctx.block(ctx.inputs[i:i + ctx.batch_size], **ctx.kwargs)
                except _GroupDone:
                    pass
                known = all(n in alias for n in dense)
    finally:
        if done_hook is not None:
            done_hook.remove()
    missing = [n for n in dense if n not in alias]
    if missing:
        raise ValueError(f"{ctx.prefix}: no calibration activations reached {missing}")
    for n in routed:  # experts the router never chose: nothing to build a Hessian from
        if n not in alias:
            alias[n] = n
            accs[n] = HessianAccumulator(linears[n].in_features, device, name=ctx.full_name(n), dtype=dtype)
    return {n: accs[alias[n]] for n in names}


@register_method("gptq", GPTQConfig)
class GPTQ(Method):
    """Blocks in order; within a block the sequential groups in turn; the next block sees quantized outputs.

    GPTQ writes dequantize(artifact) into each linear as it goes (later linears and blocks must see the quantized
    weights); applying the artifacts again is idempotent. Per-layer statistics come back in the result's `stats`.
    """

    needs_calibration = True

    def quantize_blocks(self, pipeline, spec: QuantSpec, calib: torch.Tensor | None) -> QuantizationResult:
        if calib is None or calib.numel() == 0:
            raise ValueError("method=gptq needs calibration data; got none (calib is empty)")
        budget = int(self.config.output_cache_gb * 2**30)

        def step(ctx: BlockContext) -> dict[str, QuantizedWeights]:
            ctx.output_cache = OutputCache(ctx.block, budget)
            try:  # the block's statistics go into its record (a resumed pass hands them back)
                artifacts = self.quantize_block(ctx, pipeline.layout, spec, pipeline.device, ctx.record)
                ctx.next_inputs = ctx.forward()  # the next block sees this block quantized
            finally:
                ctx.output_cache = None
            return artifacts

        records: dict[str, dict] = {}
        artifacts, routing = pipeline.calibrated_pass(step, calib, "gptq", self.config.batch_size, records)
        layer_stats = {name: s for block in records.values() for name, s in block.items()}
        fallbacks = [name for name, s in layer_stats.items() if s.get("fallback")]
        if fallbacks:
            log.warning("gptq: %d routed expert matrices saw fewer than %s of the calibration tokens and were rounded "
                        "to nearest instead (e.g. %s: %d tokens)", len(fallbacks), self.config.moe_min_tokens,
                        fallbacks[0], layer_stats[fallbacks[0]]["n_tokens"])
        return QuantizationResult(artifacts, stats=layer_stats, routing=routing)

    def quantize_block(self, ctx: BlockContext, layout, spec: QuantSpec, device: torch.device,
                       layer_stats: dict[str, dict]) -> dict[str, QuantizedWeights]:
        """GPTQ one block, its sequential groups in turn: {full name: artifact (CPU)}; each linear's weight becomes
        its dequantized artifact, and its statistics go into layer_stats."""
        cfg, artifacts = self.config, {}
        parts = layout.parts(ctx.block)
        linears = layout.block_linears(ctx.block)
        groups = parts.sequential if cfg.true_sequential else (tuple(linears),)
        fewest = min_tokens(cfg.moe_min_tokens, ctx.inputs.shape[0] * ctx.inputs.shape[1])
        for group in groups:
            dtype = COMPUTE_DTYPES[cfg.hessian_dtype]
            routed = frozenset(n for n in group if parts.is_expert(n))
            hessians = collect_hessians(ctx, group, device, dtype, routed,
                                        parts.moe.experts.path if routed else None)
            for n in group:
                lin, full = linears[n], ctx.full_name(n)
                if hessians[n].n < fewest:  # a starved expert: round to nearest (GPTQModel's fallback)
                    art = quantize_weight(lin.weight.data.to(device), spec, cfg.range_rule)
                    stats = {"fallback": 1}
                else:
                    art, stats = gptq_quantize_layer(
                        lin.weight.data.to(device), hessians[n].H, spec, block_size=cfg.block_size,
                        damp_percent=cfg.damp_percent, desc_act=cfg.desc_act, static_groups=cfg.static_groups,
                        range_rule=cfg.range_rule, max_damp_retries=cfg.max_damp_retries,
                        damp_increment=cfg.damp_increment, dtype=dtype, name=full)
                    stats["fallback"] = 0
                lin.weight.data = art.dequantize(lin.weight.dtype).to(lin.weight.device)
                artifacts[full] = art.to("cpu")
                layer_stats[full] = {**stats, "n_tokens": hessians[n].n}
            del hessians
            if ctx.output_cache is not None and group is not groups[-1]:
                ctx.output_cache.finalize(group)  # later groups' forwards reuse these outputs
        return artifacts
