"""The block-level AWQ search: per decoder block, capture the linears' inputs once, grid-search each scaling
group's scale on the unscaled block, fold them, then search the clips on the scaled weights."""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from torch import nn

from core.quant import fake_quantize
from core.spec import QuantSpec
from methods.awq.apply import apply_clips, apply_scales
from methods.awq.config import AWQConfig
from methods.awq.maths import act_mean, awq_scale, sample_tokens, search_clip, weight_mean
from methods.awq.state import AWQSearch, BlockSearch, GroupScale
from methods.base import min_tokens
from structure.architectures import ModelLayout, ScaleGroup, get_submodule
from structure.blockwise import BlockContext
from structure.pipeline import BlockPipeline

log = logging.getLogger(__name__)


def _accepted_kwargs(module: nn.Module, kwargs: dict) -> dict:
    """The block kwargs `module.forward` can take: all of them for attention (**kwargs), none for an MLP/linear."""
    params = inspect.signature(module.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


@torch.no_grad()
def _run(module: nn.Module, x: torch.Tensor, kwargs: dict, batch_size: int) -> torch.Tensor:
    """module over x [N, L, D] in batches of samples -> [N, L, D_out] (first element of tuple outputs); x [T, D] (one
    expert's routed tokens) in chunks of tokens."""
    outs = []
    step = batch_size if x.dim() > 2 else TOKEN_CHUNK
    for i in range(0, x.shape[0], step):
        out = module(x[i:i + step], **kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return torch.cat(outs)


TOKEN_CHUNK = 4096  # tokens per forward when a module's inputs are a bag of routed tokens, not [N, L] windows


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared difference over all elements, accumulated in fp64 (each difference and square exact in fp64)."""
    total = 0.0
    for ca, cb in zip(torch.split(a.reshape(-1), 1 << 22), torch.split(b.reshape(-1), 1 << 22)):
        d = ca.double()
        d.sub_(cb)  # cb is promoted element by element: no second fp64 copy
        total += d.mul_(d).sum().item()
    return total / a.numel()


def _group_applies(block: nn.Module, group: ScaleGroup) -> bool:
    """A linear prev op can only be folded when its outputs (its last rows, prev_rows="last") are the layers' inputs
    (not under grouped-query v->o)."""
    prev = get_submodule(block, group.prev)
    if not isinstance(prev, nn.Linear):
        return True
    widths = {get_submodule(block, n).in_features for n in group.layers}
    if group.prev_rows == "last":
        return len(widths) == 1 and widths.pop() <= prev.out_features
    return widths == {prev.out_features}


@dataclass
class Features:
    """What one full-precision forward of a block recorded: each linear's input (linears fed the same tensor share
    one entry), the inputs of the scaling groups' input modules, and the block's output."""

    inputs: dict[str, torch.Tensor]  # key -> [N, L, in], or [T, in] for a routed expert
    keys: dict[str, str]  # module name -> key of its input in `inputs` (absent: never called, a starved expert)
    output: torch.Tensor

    def of(self, name: str) -> torch.Tensor | None:
        key = self.keys.get(name)
        return None if key is None else self.inputs[key]

    def tokens(self, name: str) -> int:
        x = self.of(name)
        return 0 if x is None else x.reshape(-1, x.shape[-1]).shape[0]

    def rescale(self, names, s: torch.Tensor) -> None:
        """The modules named now see x / s (their scale was folded into the op before them)."""
        for key in {self.keys[n] for n in names if n in self.keys}:
            self.inputs[key] = self.inputs[key] / s.to(self.inputs[key].device, self.inputs[key].dtype)


@torch.no_grad()
def capture_features(ctx: BlockContext, layout: ModelLayout) -> Features:
    """Run the unmodified block once, recording the inputs of every linear and of every scaling group's input
    module. Modules that receive the very same tensor in a batch share one record (q/k/v; an expert's gate and up;
    every expert when every token goes through every expert)."""
    parts = layout.parts(ctx.block)
    names = list(dict.fromkeys([*parts.names, *(g.input_module for g in parts.scale_groups)]))
    chunks: dict[str, list[torch.Tensor]] = {}
    keys: dict[str, str] = {}
    seen: dict[tuple, str] = {}

    def record(name: str, x: torch.Tensor) -> None:
        tensor_key = (x.data_ptr(), tuple(x.shape), x.stride(), x._version)
        owner = seen.setdefault(tensor_key, name)
        if owner == name:
            chunks.setdefault(name, []).append(x)
        if keys.setdefault(name, owner) != owner:
            raise RuntimeError(f"{ctx.full_name(name)}: shared-input pattern changed between calibration batches")

    outs = []
    with ctx.input_hooks(names, record):
        for i in range(0, ctx.inputs.shape[0], ctx.batch_size):
            seen.clear()
            outs.append(ctx.forward(ctx.inputs[i:i + ctx.batch_size]))
    return Features({k: torch.cat(v) for k, v in chunks.items()}, keys, torch.cat(outs))


@torch.no_grad()
def search_group_scale(block: nn.Module, group: ScaleGroup, x: torch.Tensor, kwargs: dict, spec: QuantSpec,
                       config: AWQConfig) -> GroupScale:
    """Grid-search one scaling group's s on the group's inputs x; the block's weights are left as they were. Modules
    the group scales without quantizing (a router) keep their weights during the search: their input is unchanged."""
    layers = [get_submodule(block, n) for n in group.layers]
    module = get_submodule(block, group.inspect)
    kwargs = _accepted_kwargs(module, kwargs)
    x_mean = act_mean(x)
    w_mean = (weight_mean(torch.cat([lin.weight.data for lin in layers]), spec.group_size)
              if config.duo_scaling else None)
    fp_out = _run(module, x, kwargs, config.batch_size)
    originals = [lin.weight.data for lin in layers]
    also = group.also_scaled if config.scale_router is not False else ()
    best = GroupScale(group.prev, group.layers, torch.ones_like(x_mean), None, float("inf"), also, group.prev_rows)
    try:
        for i in range(config.n_grid):
            alpha = i / config.n_grid
            s = awq_scale(x_mean, w_mean, alpha)
            for lin, w in zip(layers, originals):
                sw = s.to(w.dtype)[None, :]
                lin.weight.data = fake_quantize(w * sw, spec, "minmax") / sw
            loss = _mse(_run(module, x, kwargs, config.batch_size), fp_out)
            if loss != loss:  # NaN: never let it be silently "not better"
                raise ValueError(f"AWQ scale search: NaN loss for {group.prev} -> {list(group.layers)} "
                                 f"at alpha={alpha}")
            if loss < best.loss:
                best = GroupScale(group.prev, group.layers, s.cpu(), alpha, loss, also, group.prev_rows)
    finally:
        for lin, w in zip(layers, originals):
            lin.weight.data = w
    return best


@torch.no_grad()
def search_block(ctx: BlockContext, layout: ModelLayout, spec: QuantSpec, config: AWQConfig,
                 features: Features) -> tuple[BlockSearch, dict[str, dict]]:
    """Search (and apply, because clipping is searched on the scaled weights) one block's scales and clips ->
    (the search, per-linear stats: calibration tokens seen and whether it fell back to plain rounding).

    A routed expert that saw fewer than `method.moe_min_tokens` tokens gets no scale of its own (up -> down) and no
    clip search: it is rounded to nearest after the shared gate/up scale (the reference fallback, counted)."""
    result = BlockSearch()
    parts = layout.parts(ctx.block)
    fewest = min_tokens(config.moe_min_tokens, ctx.inputs.shape[0] * ctx.inputs.shape[1])
    starved = {n for n in parts.names if parts.is_expert(n) and features.tokens(n) < fewest}
    stats = {ctx.full_name(n): {"n_tokens": features.tokens(n), "fallback": int(n in starved)} for n in parts.names}
    if config.auto_scale:
        groups = [g for g in parts.scale_groups if _group_applies(ctx.block, g)
                  and not set(g.layers) <= starved and g.prev not in starved]
        result.scales = [search_group_scale(ctx.block, g, features.of(g.input_module), ctx.kwargs, spec, config)
                         for g in groups]
        apply_scales(ctx.block, result.scales, layout.spec.norm_weight_offset)
        for group, found in zip(groups, result.scales):  # the layers (and the group's input module) now see x / s
            features.rescale((*group.layers, group.input_module), found.s)
    if config.auto_clip:
        for name, lin in layout.block_linears(ctx.block).items():
            if name in layout.spec.no_clip or name in starved:  # q/k (the table says which); starved experts
                continue
            x = sample_tokens(features.of(name), config.clip_n_tokens)
            result.clips[name] = search_clip(lin.weight.data, x, spec, config.clip_grid, config.clip_max_shrink)
        apply_clips(ctx.block, result.clips, spec.group_size)
    return result, stats


def run_awq_search(pipeline: BlockPipeline, spec: QuantSpec, calib: torch.Tensor, config: AWQConfig,
                   desc: str = "awq", on_block=None) -> tuple[AWQSearch, dict, dict, dict]:
    """Search and apply AWQ over all blocks (the model changed in place): (the search, the artifacts that
    `on_block(ctx)` returned for each block after its search, e.g. the block quantized, per-linear stats, the
    routing of the calibration tokens per block with experts)."""
    search = AWQSearch(spec.bits, spec.group_size, spec.symmetric)
    layout = pipeline.layout

    def step(ctx: BlockContext) -> dict:
        features = capture_features(ctx, layout)
        ctx.next_inputs = features.output  # the reference feeds the next block the full-precision output
        # the search and its stats go into the block's record: a resumed pass hands them back
        ctx.record["search"], ctx.record["stats"] = search_block(ctx, layout, spec, config, features)
        return {} if on_block is None else on_block(ctx)

    records: dict[str, dict] = {}
    artifacts, routing = pipeline.calibrated_pass(step, calib, desc, config.batch_size, records)
    search.blocks.update({prefix: record["search"] for prefix, record in records.items()})
    stats = {name: s for record in records.values() for name, s in record["stats"].items()}
    fallbacks = [name for name, s in stats.items() if s["fallback"]]
    if fallbacks:
        log.warning("%s: %d routed expert matrices saw fewer than %s of the calibration tokens and were rounded to "
                    "nearest without a search of their own (e.g. %s: %d tokens)", desc, len(fallbacks),
                    config.moe_min_tokens, fallbacks[0], stats[fallbacks[0]]["n_tokens"])
    return search, artifacts, stats, routing
