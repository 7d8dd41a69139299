"""AWQ (Lin et al., 2024): activation-aware per-channel scaling + weight clipping, then the AWQ quantizer.

Per decoder block, as in llm-awq / AutoAWQ:
1. run the full-precision block once, recording the inputs of its linears; that output feeds the next block;
2. for every scaling group of the architecture table, grid-search s over alpha (weights restored between
   trials); all groups are searched on the unscaled block, then folded together (prev op /= s, layers *= s);
3. search a clipping threshold per (output row, group) on the scaled weights and scaled inputs; clamp;
4. quantize every linear with the min/max quantizer.
The searched scales and clips form an `AWQSearch`, which can be saved and re-applied without searching.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from harness.architectures import ModelLayout, ScaleGroup, get_submodule
from harness.blockwise import BlockContext, iterate_blocks
from methods.awq_search import (act_mean, awq_scale, clip_weight, fold_scale_into_norm, sample_tokens, search_clip,
                                weight_mean)
from methods.base import Method, QuantizedWeights, QuantSpec, register_method
from methods.quant import fake_quantize, quantize_weight
from methods.gptq import GPTQ, GPTQConfig

SEARCH_FORMAT = "awq_search/v1"
SEARCH_FILE = "awq_search.pt"


@dataclass(frozen=True)
class AWQConfig:
    """`method=awq`. Defaults are AutoAWQ 0.2.9's.

    n_grid: alpha grid {0, 1/n_grid, ..., (n_grid-1)/n_grid} for the scale search.
    duo_scaling: True = AutoAWQ's s = x_mean^a / w_mean^(1-a); False = llm-awq's activation-only s = x_mean^a.
    auto_scale / auto_clip: run the scale search / the clip search.
    clip_grid, clip_max_shrink: clip candidates max_val = amax * (1 - i/clip_grid), i < clip_grid * clip_max_shrink.
    clip_n_tokens: tokens subsampled (evenly strided) for the clip loss; None = all calibration tokens.
    batch_size: calibration samples per forward inside the searches (memory knob; results do not depend on it).
    load_search: path of a saved awq_search.pt to re-apply instead of searching (calibration data is then unused).
    """

    name: str = "awq"
    n_grid: int = 20
    duo_scaling: bool = True
    auto_scale: bool = True
    auto_clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_n_tokens: Optional[int] = 512
    batch_size: int = 8
    load_search: Optional[str] = None

    def __post_init__(self) -> None:
        for key in ("n_grid", "clip_grid", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"method.{key}={value!r} must be an integer >= 1")
        if not 0.0 <= self.clip_max_shrink < 1.0:
            raise ValueError(f"method.clip_max_shrink={self.clip_max_shrink!r} must be in [0, 1) "
                             "(1 would clip weights to zero)")
        if self.clip_n_tokens is not None and (not isinstance(self.clip_n_tokens, int) or self.clip_n_tokens < 1):
            raise ValueError(f"method.clip_n_tokens={self.clip_n_tokens!r} must be an integer >= 1 "
                             "or None (all tokens)")
        if self.load_search is not None and not str(self.load_search).strip():
            raise ValueError("method.load_search is an empty string; give a path to awq_search.pt or leave it None")


@dataclass
class GroupScale:
    """A searched scale of one scaling group: prev op /= s, layers' input columns *= s. Names relative to a block."""

    prev: str
    layers: tuple[str, ...]
    s: torch.Tensor  # [in_features of layers], fp32 (fp64 for an fp64 model)
    alpha: Optional[float] = None
    loss: Optional[float] = None


@dataclass
class BlockSearch:
    """Everything searched for one decoder block."""

    scales: list[GroupScale] = field(default_factory=list)
    clips: dict[str, torch.Tensor] = field(default_factory=dict)  # linear name -> max_val [out, n_groups], as s


@dataclass
class AWQSearch:
    """The searched parameters of a whole model, keyed by block prefix; saved with torch.save(search.to_state())."""

    bits: int
    group_size: Optional[int]
    symmetric: bool
    blocks: dict[str, BlockSearch] = field(default_factory=dict)

    def to_state(self) -> dict:
        """Plain dict of tensors/str/numbers (loads with torch.load(weights_only=True))."""
        return {"format": SEARCH_FORMAT, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "blocks": {prefix: {"scales": [{"prev": g.prev, "layers": list(g.layers), "s": g.s.detach().cpu(),
                                                "alpha": g.alpha, "loss": g.loss} for g in b.scales],
                                    "clips": {n: v.detach().cpu() for n, v in b.clips.items()}}
                           for prefix, b in self.blocks.items()}}

    @classmethod
    def from_state(cls, state: dict) -> "AWQSearch":
        if not isinstance(state, dict) or state.get("format") != SEARCH_FORMAT:
            raise ValueError(f"not an AWQ search file: expected format {SEARCH_FORMAT!r}")
        blocks = {prefix: BlockSearch([GroupScale(g["prev"], tuple(g["layers"]), g["s"], g["alpha"], g["loss"])
                                       for g in b["scales"]], dict(b["clips"]))
                  for prefix, b in state["blocks"].items()}
        return cls(state["bits"], state["group_size"], state["symmetric"], blocks)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.to_state(), path)

    @classmethod
    def load(cls, path: str | Path) -> "AWQSearch":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"method.load_search={str(path)!r}: no such file "
                             f"(expected an {SEARCH_FILE} written by a previous awq run)")
        return cls.from_state(torch.load(path, map_location="cpu", weights_only=True))

    def check_matches(self, model: nn.Module, layout: ModelLayout, spec: QuantSpec) -> None:
        """Raise ValueError unless this search fits `model` (block names, layer names, shapes) and `spec`."""
        for key in ("bits", "group_size", "symmetric"):
            if getattr(self, key) != getattr(spec, key):
                raise ValueError(f"method.load_search: saved search has {key}={getattr(self, key)!r}, "
                                 f"the run has {key}={getattr(spec, key)!r}")
        prefixes = [layout.block_prefix(i) for i in range(len(layout.blocks(model)))]
        if sorted(self.blocks) != sorted(prefixes):
            raise ValueError(f"method.load_search: saved search covers {len(self.blocks)} blocks "
                             f"({sorted(self.blocks)[:2]}...), the model has {len(prefixes)} ({prefixes[:2]}...)")
        for prefix, b in self.blocks.items():
            block = model.get_submodule(prefix)
            for g in b.scales:
                layers = [_find(block, prefix, n) for n in g.layers]
                prev = _find(block, prefix, g.prev)
                expected = {lin.in_features for lin in layers}
                prev_width = prev.out_features if isinstance(prev, nn.Linear) else prev.weight.shape[0]
                if expected != {g.s.numel()} or prev_width != g.s.numel():
                    raise ValueError(f"method.load_search: scale of {prefix}.{g.prev} -> {list(g.layers)} has "
                                     f"{g.s.numel()} channels; the model's layers have {sorted(expected)} inputs "
                                     f"and the prev op {prev_width} outputs")
            for name, max_val in b.clips.items():
                lin = _find(block, prefix, name)
                want = (lin.out_features, spec.n_groups(lin.in_features))
                if tuple(max_val.shape) != want:
                    raise ValueError(f"method.load_search: clip of {prefix}.{name} has shape {tuple(max_val.shape)}, "
                                     f"the model needs {want}")


def _find(block: nn.Module, prefix: str, name: str) -> nn.Module:
    try:
        return get_submodule(block, name)
    except AttributeError:
        raise ValueError(f"method.load_search: module {prefix}.{name} does not exist in this model") from None


# ----------------------------------------------------------------------------------------------- apply

@torch.no_grad()
def apply_scales(block: nn.Module, scales: list[GroupScale], norm_weight_offset: float) -> None:
    """Fold each group's scale into the block in place: prev op's output /= s, the layers' input columns *= s."""
    for g in scales:
        prev = get_submodule(block, g.prev)
        s = g.s.to(prev.weight.device)
        if isinstance(prev, nn.Linear):
            # The rows of prev produce exactly the channels the layers consume (shapes checked when searched).
            prev.weight.data = prev.weight.data / s.to(prev.weight.dtype)[:, None]
            if prev.bias is not None:
                prev.bias.data = prev.bias.data / s.to(prev.bias.dtype)
        else:
            bias = getattr(prev, "bias", None)
            weight, new_bias = fold_scale_into_norm(prev.weight.data, None if bias is None else bias.data, s,
                                                    norm_weight_offset)
            prev.weight.data = weight
            if bias is not None:
                bias.data = new_bias
        for name in g.layers:
            lin = get_submodule(block, name)
            lin.weight.data = lin.weight.data * s.to(lin.weight.dtype)[None, :]


@torch.no_grad()
def apply_clips(block: nn.Module, clips: dict[str, torch.Tensor], group_size: Optional[int]) -> None:
    """Clamp each named linear's weight per (row, group) to its searched max_val, in place."""
    for name, max_val in clips.items():
        lin = get_submodule(block, name)
        lin.weight.data = clip_weight(lin.weight.data, max_val.to(lin.weight.device), group_size)


def apply_search(model: nn.Module, layout: ModelLayout, search: AWQSearch) -> None:
    """Re-apply a saved search (scales, then clips) to every block of `model`, in place."""
    for prefix, b in search.blocks.items():
        block = model.get_submodule(prefix)
        apply_scales(block, b.scales, layout.spec.norm_weight_offset)
        apply_clips(block, b.clips, search.group_size)


# ---------------------------------------------------------------------------------------------- search

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
    """Mean squared difference over all elements, accumulated in fp64."""
    total = 0.0
    for ca, cb in zip(torch.split(a.reshape(-1), 1 << 22), torch.split(b.reshape(-1), 1 << 22)):
        total += (ca.double() - cb.double()).pow(2).sum().item()
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


def quantize_block(block: nn.Module, prefix: str, layout: ModelLayout, spec: QuantSpec) -> dict[str, QuantizedWeights]:
    """AWQ min/max quantization of every linear of a (scaled, clipped) block -> {full name: artifact on CPU}."""
    return {f"{prefix}.{name}": quantize_weight(lin.weight.data, spec, "minmax").to("cpu")
            for name, lin in layout.block_linears(block).items()}


def run_awq_search(model: nn.Module, layout: ModelLayout, spec: QuantSpec, calib: torch.Tensor,
                   device: torch.device, config: AWQConfig, desc: str = "awq",
                   on_block=None) -> AWQSearch:
    """Search and apply AWQ over all blocks (model modified in place); `on_block(ctx, features)` runs after each."""
    search = AWQSearch(spec.bits, spec.group_size, spec.symmetric)
    for ctx in iterate_blocks(model, layout, calib, device, desc=desc, batch_size=config.batch_size):
        features, fp_out = capture_features(ctx, layout)
        ctx.next_inputs = fp_out  # the reference feeds the next block the full-precision output
        search.blocks[ctx.prefix] = search_block(ctx, layout, spec, config, features)
        if on_block is not None:
            on_block(ctx, features)
    return search


@register_method("awq", AWQConfig)
class AWQ(Method):
    """Searches (or loads) scales and clips, folds them into the model in place, returns min/max artifacts."""

    needs_calibration = True

    def quantize(self, model, layout, spec, calib, device) -> dict[str, QuantizedWeights]:
        if self.config.load_search is not None:
            search = AWQSearch.load(self.config.load_search)
            search.check_matches(model, layout, spec)
            apply_search(model, layout, search)
            self.search = search
            return {name: quantize_weight(lin.weight.data.to(device), spec, "minmax").to("cpu")
                    for name, lin in layout.quantizable_linears(model).items()}
        artifacts: dict[str, QuantizedWeights] = {}

        def finish(ctx, features):
            artifacts.update(quantize_block(ctx.block, ctx.prefix, layout, spec))

        self.search = run_awq_search(model, layout, spec, calib, device, self.config, on_block=finish)
        run_dir = getattr(self, "run_dir", None)
        if run_dir is not None:
            self.search.save(Path(run_dir) / SEARCH_FILE)
        return artifacts


def _gptq_half() -> GPTQConfig:
    # AWQ's quantizer range, the one the clip thresholds were searched for ("minmax_zero" = GPTQ's own)
    return GPTQConfig(range_rule="minmax")


@dataclass(frozen=True)
class AWQGPTQConfig:
    """`method=awq_gptq`: AWQ's scale + clip search (and fold), then GPTQ instead of round-to-nearest.

    `awq` and `gptq` are the two methods' own configs (method.awq.n_grid=..., method.gptq.desc_act=...);
    the GPTQ half defaults to AWQ's "minmax" quantizer range.
    """

    name: str = "awq_gptq"
    awq: AWQConfig = field(default_factory=AWQConfig)
    gptq: GPTQConfig = field(default_factory=_gptq_half)


@register_method("awq_gptq", AWQGPTQConfig)
class AWQGPTQ(Method):
    """AWQ search (or a loaded one) applied over the whole model first, then a standard GPTQ pass over the
    transformed model (its blocks see quantized outputs, as GPTQ's do): the AWQ + GPTQ recipe of llm-awq."""

    needs_calibration = True

    def quantize(self, model, layout, spec, calib, device) -> dict[str, QuantizedWeights]:
        awq_config = self.config.awq
        if awq_config.load_search is not None:
            search = AWQSearch.load(awq_config.load_search)
            search.check_matches(model, layout, spec)
            apply_search(model, layout, search)
        else:
            search = run_awq_search(model, layout, spec, calib, device, awq_config, desc="awq_gptq: awq")
            run_dir = getattr(self, "run_dir", None)
            if run_dir is not None:
                search.save(Path(run_dir) / SEARCH_FILE)
        self.search = search
        gptq = GPTQ(self.config.gptq)
        artifacts = gptq.quantize(model, layout, spec, calib, device)
        self.layer_stats = gptq.layer_stats
        return artifacts
