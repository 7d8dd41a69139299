"""The block-level AWQ search: per decoder block, capture the linears' inputs once, grid-search each scaling
group's scale on the unscaled block, fold them, then search the clips on the scaled weights."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from core.quant import fake_quantize
from core.spec import QuantSpec
from methods.awq.apply import apply_clips, apply_scales
from methods.awq.config import AWQConfig
from methods.awq.maths import act_mean, awq_scale, sample_tokens, search_clip, weight_mean
from methods.awq.state import AWQSearch, BlockSearch, GroupScale
from structure.architectures import ModelLayout, ScaleGroup, get_submodule
from structure.blockwise import BlockContext
from structure.pipeline import BlockPipeline


def _accepted_kwargs(module: nn.Module, kwargs: dict) -> dict:
    """The block kwargs `module.forward` can take: all of them for attention (**kwargs), none for an MLP/linear."""
    params = inspect.signature(module.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


@torch.no_grad()
def _run(module: nn.Module, x: torch.Tensor, kwargs: dict, batch_size: int) -> torch.Tensor:
    """module over x [N, L, D] in batches of samples -> [N, L, D_out] (first element of tuple outputs)."""
    outs = []
    for i in range(0, x.shape[0], batch_size):
        out = module(x[i:i + batch_size], **kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return torch.cat(outs)


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared difference over all elements, accumulated in fp64 (each difference and square exact in fp64)."""
    total = 0.0
    for ca, cb in zip(torch.split(a.reshape(-1), 1 << 22), torch.split(b.reshape(-1), 1 << 22)):
        d = ca.double()
        d.sub_(cb)  # cb is promoted element by element: no second fp64 copy
        total += d.mul_(d).sum().item()
    return total / a.numel()


def feature_keys(layout: ModelLayout) -> dict[str, str]:
    """{linear name: name of the linear whose input it shares}: layers of one scaling group read the same input."""
    keys = {}
    for g in layout.spec.scale_groups:
        for name in g.layers:
            keys[name] = g.layers[0]
    return {name: keys.get(name, name) for name in layout.spec.linears}


def _group_applies(block: nn.Module, group: ScaleGroup) -> bool:
    """A linear prev op can only be folded when its outputs are the layers' inputs (not under grouped-query v->o)."""
    prev = get_submodule(block, group.prev)
    if not isinstance(prev, nn.Linear):
        return True
    return all(prev.out_features == get_submodule(block, n).in_features for n in group.layers)


@torch.no_grad()
def capture_features(ctx: BlockContext, layout: ModelLayout) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run the unmodified block once -> ({feature key: linear input [N, L, in]}, fp block output [N, L, D])."""
    keys = sorted(set(feature_keys(layout).values()))
    chunks: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    with ctx.input_hooks(keys, lambda name, x: chunks[name].append(x)):
        out = ctx.forward()
    return {k: torch.cat(v) for k, v in chunks.items()}, out


@torch.no_grad()
def search_group_scale(block: nn.Module, group: ScaleGroup, x: torch.Tensor, kwargs: dict, spec: QuantSpec,
                       config: AWQConfig) -> GroupScale:
    """Grid-search one scaling group's s on inputs x [N, L, in]; the block's weights are left as they were."""
    layers = [get_submodule(block, n) for n in group.layers]
    module = get_submodule(block, group.inspect)
    kwargs = _accepted_kwargs(module, kwargs)
    x_mean = act_mean(x)
    w_mean = (weight_mean(torch.cat([lin.weight.data for lin in layers]), spec.group_size)
              if config.duo_scaling else None)
    fp_out = _run(module, x, kwargs, config.batch_size)
    originals = [lin.weight.data for lin in layers]
    best = GroupScale(group.prev, group.layers, torch.ones_like(x_mean), None, float("inf"))
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
                best = GroupScale(group.prev, group.layers, s.cpu(), alpha, loss)
    finally:
        for lin, w in zip(layers, originals):
            lin.weight.data = w
    return best


@torch.no_grad()
def search_block(ctx: BlockContext, layout: ModelLayout, spec: QuantSpec, config: AWQConfig,
                 features: dict[str, torch.Tensor]) -> BlockSearch:
    """Search (and apply, because clipping is searched on the scaled weights) one block's scales and clips."""
    result = BlockSearch()
    keys = feature_keys(layout)
    if config.auto_scale:
        groups = [g for g in layout.spec.scale_groups if _group_applies(ctx.block, g)]
        result.scales = [search_group_scale(ctx.block, g, features[keys[g.layers[0]]], ctx.kwargs, spec, config)
                         for g in groups]
        apply_scales(ctx.block, result.scales, layout.spec.norm_weight_offset)
        for g in result.scales:  # the layers now see x / s
            key = keys[g.layers[0]]
            features[key] = features[key] / g.s.to(features[key].device, features[key].dtype)
    if config.auto_clip:
        for name, lin in layout.block_linears(ctx.block).items():
            if name in layout.spec.no_clip:  # q/k (the table says which; the references match names)
                continue
            x = sample_tokens(features[keys[name]], config.clip_n_tokens)
            result.clips[name] = search_clip(lin.weight.data, x, spec, config.clip_grid, config.clip_max_shrink)
        apply_clips(ctx.block, result.clips, spec.group_size)
    return result


def run_awq_search(pipeline: BlockPipeline, spec: QuantSpec, calib: torch.Tensor, config: AWQConfig,
                   desc: str = "awq", on_block=None) -> tuple[AWQSearch, dict]:
    """Search and apply AWQ over all blocks (the model changed in place): (the search, the artifacts that
    `on_block(ctx)` returned for each block after its search, e.g. the block quantized)."""
    search = AWQSearch(spec.bits, spec.group_size, spec.symmetric)
    layout = pipeline.layout

    def step(ctx: BlockContext) -> dict:
        features, fp_out = capture_features(ctx, layout)
        ctx.next_inputs = fp_out  # the reference feeds the next block the full-precision output
        search.blocks[ctx.prefix] = search_block(ctx, layout, spec, config, features)
        return {} if on_block is None else on_block(ctx)

    artifacts = pipeline.calibrated_pass(step, calib, desc, config.batch_size)
    return search, artifacts
