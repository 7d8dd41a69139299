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


def folded_names(block: nn.Module, scales: list[GroupScale]) -> list[str]:
    """Names (relative to the block) of what apply_scales changes that no artifact covers: a norm's weight and
    bias, a previous linear's bias (every linear weight of a block is quantized, so its artifact covers it)."""
    names = []
    for g in scales:
        prev = get_submodule(block, g.prev)
        if not isinstance(prev, nn.Linear):
            names.append(f"{g.prev}.weight")
        if getattr(prev, "bias", None) is not None:
            names.append(f"{g.prev}.bias")
    return names


def folded_tensors(pipeline: BlockPipeline, search: AWQSearch) -> dict[str, torch.Tensor]:
    """{state_dict key: CPU copy} of every tensor a (searched or re-applied) AWQ search folded its scales into."""
    found = {}
    for prefix, b in search.blocks.items():
        for name in folded_names(pipeline.model.get_submodule(prefix), b.scales):  # names only: meta answers too
            found[f"{prefix}.{name}"] = pipeline.read(f"{prefix}.{name}").clone()
    return found
