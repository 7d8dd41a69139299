"""The forward pass layer by layer: every window passes through block i before block i + 1 is loaded.

The same maths as the model's own forward in a different loop order, so a model larger than memory can be
evaluated with one block resident (plus the windows' hidden states, on disk when they do not fit in memory). The
model's own forward still does everything outside the blocks: the embeddings (and their scaling), the masks and
position embeddings each block gets, and the final norm.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from structure.blockwise import block_output, blocks_replaced, record_block_calls, run_until_blocks_end
from structure.head import lm_head_input
from structure.pipeline import BlockPipeline
from structure.streaming import available_memory

log = logging.getLogger(__name__)

# The windows' hidden states go to a file on disk when they would take more than this share of the free memory.
SPILL_FRACTION = 0.25


def _hidden_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                   spill_dir: Path | None) -> torch.Tensor:
    """An [n, L, D] buffer on `device`, or a file-backed CPU tensor when it would not fit comfortably."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if spill_dir is None or nbytes < SPILL_FRACTION * available_memory(device):
        return torch.empty(shape, dtype=dtype, device=device)
    spill_dir.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=spill_dir, prefix="hidden-", suffix=".bin")
    os.close(fd)
    log.info("layer-wise eval: the windows' hidden states (%.1f GiB) go to %s", nbytes / 2**30, path)
    return torch.from_file(str(path), shared=True, size=torch.Size(shape).numel(), dtype=dtype).view(shape)


@torch.no_grad()
def layerwise_lm_head_inputs(pipeline: BlockPipeline, windows: torch.Tensor,
                             prepare_block: Callable[[int, nn.Module], None] | None = None,
                             spill_dir: Path | None = None, desc: str = "layer-wise") -> torch.Tensor:
    """The lm_head inputs of windows [n, L] -> [n, L, hidden] (at least fp32), computed block by block through the
    pipeline's walk. `prepare_block(i, block)` runs on each materialized block first (e.g. writes its quantized
    weights)."""
    model, device = pipeline.model, pipeline.device
    blocks = pipeline.layout.blocks(model)
    block_kwargs: list[dict] = [{} for _ in blocks]
    state: dict = {"hidden": None, "window": 0}

    def keep_input(x: torch.Tensor) -> None:
        if state["hidden"] is None:
            state["hidden"] = _hidden_buffer((windows.shape[0], *x.shape[1:]), x.dtype,
                                             x.device if spill_dir is None else torch.device("cpu"), spill_dir)
        state["hidden"][state["window"]] = x[0].to(state["hidden"].device)

    with pipeline.outside_blocks(head=False), record_block_calls(blocks, block_kwargs, keep_input):
        for j, row in enumerate(windows):
            state["window"] = j
            run_until_blocks_end(model, row[None].to(device))
    hidden = state["hidden"]
    for i, _, block in pipeline.walk(desc, writeback=False, prepare=prepare_block):
        for j in range(hidden.shape[0]):
            out = block_output(block(hidden[j:j + 1].to(device), **block_kwargs[i]))
            hidden[j] = out[0].to(hidden.device)

    def final(index):  # block 0 hands over the window's last hidden state; the others pass it on
        return (lambda *args, **kwargs: hidden[state["window"]:state["window"] + 1].to(device)) if index == 0 \
            else (lambda *args, **kwargs: args[0] if args else kwargs["hidden_states"])

    inputs = None
    with pipeline.outside_blocks(head=False), blocks_replaced(blocks, final):
        for j, row in enumerate(windows):
            state["window"] = j
            h = lm_head_input(model, row[None].to(device))  # the model's own final norm
            if inputs is None:
                inputs = hidden if h.dtype == hidden.dtype else _hidden_buffer(
                    tuple(hidden.shape), h.dtype, hidden.device, spill_dir)
            inputs[j] = h.to(inputs.device)  # row j of `hidden` is not read again
    return inputs

