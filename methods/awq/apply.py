"""Applying searched AWQ parameters to a model in place: fold scales into the previous op and the scaled layers,
clamp weights to the searched clips."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from methods.awq.maths import clip_weight, fold_scale_into_norm
from methods.awq.state import AWQSearch, GroupScale
from structure.architectures import get_submodule
from structure.pipeline import BlockPipeline


@torch.no_grad()
def apply_scales(block: nn.Module, scales: list[GroupScale], norm_weight_offset: float) -> None:
    """Fold each group's scale into the block in place: prev op's output /= s, the layers' input columns *= s (and
    those of the unquantized modules fed the same input, a router)."""
    for g in scales:
        prev = get_submodule(block, g.prev)
        s = g.s.to(prev.weight.device)
        if isinstance(prev, nn.Linear):
            # The rows of prev produce exactly the channels the layers consume (shapes checked when searched); with
            # prev_rows="last", its last s.numel() rows do (phi3's gate_up_proj: the up half).
            rows = slice(None) if g.prev_rows == "all" else slice(prev.out_features - s.numel(), None)
            weight = prev.weight.data.clone()
            weight[rows] /= s.to(weight.dtype)[:, None]
            prev.weight.data = weight
            if prev.bias is not None:
                bias = prev.bias.data.clone()
                bias[rows] /= s.to(bias.dtype)
                prev.bias.data = bias
        else:
            bias = getattr(prev, "bias", None)
            weight, new_bias = fold_scale_into_norm(prev.weight.data, None if bias is None else bias.data, s,
                                                    norm_weight_offset)
            prev.weight.data = weight
            if bias is not None:
                bias.data = new_bias
        for name in (*g.layers, *g.also_scaled):
            lin = get_submodule(block, name)
            lin.weight.data = lin.weight.data * s.to(lin.weight.dtype)[None, :]


@torch.no_grad()
def apply_clips(block: nn.Module, clips: dict[str, torch.Tensor], group_size: Optional[int]) -> None:
    """Clamp each named linear's weight per (row, group) to its searched max_val, in place."""
    for name, max_val in clips.items():
        lin = get_submodule(block, name)
        lin.weight.data = clip_weight(lin.weight.data, max_val.to(lin.weight.device), group_size)


def apply_search(pipeline: BlockPipeline, search: AWQSearch, on_block=None) -> dict:
    """Re-apply a saved search (scales, then clips) to every block, in place; returns the artifacts that
    `on_block(block, prefix)` returns for each block after (e.g. the block quantized)."""
    layout = pipeline.layout

    def step(prefix: str, block: nn.Module) -> dict:
        b = search.blocks[prefix]  # check_matches made sure the search covers every block
        apply_scales(block, b.scales, layout.spec.norm_weight_offset)
        apply_clips(block, b.clips, search.group_size)
        return {} if on_block is None else on_block(block, prefix)

    return pipeline.map_blocks(step, "awq: apply search")


def folded_names(block: nn.Module, scales: list[GroupScale], matrices: dict) -> list[str]:
    """Names (relative to the block) of what apply_scales changes that no artifact covers: a norm's weight and
    bias, a previous linear's bias, a router's weight (every quantized matrix of a block, `matrices`, has an
    artifact that covers it)."""
    names = []
    for g in scales:
        if g.prev in matrices:
            if not isinstance(matrices[g.prev], nn.Linear):
                if getattr(matrices[g.prev], "bias", None) is not None:
                    raise ValueError(f"{g.prev}: folding a scale into an expert with biases is not supported")
                continue
            prev = matrices[g.prev]
        else:
            prev = get_submodule(block, g.prev)
            names.append(f"{g.prev}.weight")
        if getattr(prev, "bias", None) is not None:
            names.append(f"{g.prev}.bias")
        names += [f"{name}.weight" for name in g.also_scaled]
    return names


def folded_tensors(pipeline: BlockPipeline, search: AWQSearch) -> dict[str, torch.Tensor]:
    """{state_dict key: CPU copy} of every tensor a (searched or re-applied) AWQ search folded its scales into."""
    found = {}
    for prefix, b in search.blocks.items():
        block = pipeline.model.get_submodule(prefix)  # names and shapes only: a meta block answers too
        for name in folded_names(block, b.scales, pipeline.layout.matrices(block)):
            found[f"{prefix}.{name}"] = pipeline.read(f"{prefix}.{name}").clone()
    return found
