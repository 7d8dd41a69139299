"""What a block sees during a calibrated pass, and how the inputs of the blocks are captured.

`capture_block_inputs` runs the model's own forward on the calibration tokens up to decoder block 0 and keeps
block 0's inputs and every block's keyword arguments (position embeddings, masks), with recorders standing in for
the blocks, so no block weight is needed. The block pipeline (structure/pipeline.py) then hands the method one
`BlockContext` at a time; only one block's activations are held at once, so calibration memory does not grow
with depth.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from structure.architectures import ModelLayout, get_submodule
from structure.streaming import RESIDENT, Residency


class _StopForward(Exception):
    """Raised by the block-0 hook: nothing after the first block needs to run during capture."""


def block_output(out):
    """The hidden states of a decoder block's output (some families return a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _clean_kwargs(kwargs: dict) -> dict:
    kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
    kwargs["use_cache"] = False
    return kwargs


@contextmanager
def blocks_replaced(blocks: nn.ModuleList, forward_of: Callable[[int], Callable]):
    """While active, block i runs forward_of(i) instead of its own forward (the model's own code still builds the
    masks and position embeddings it passes, and hooks still fire)."""
    saved = [b.__dict__.get("forward") for b in blocks]
    for i, b in enumerate(blocks):
        b.forward = forward_of(i)
    try:
        yield
    finally:
        for b, old in zip(blocks, saved):
            if old is None:
                del b.forward
            else:
                b.forward = old


def record_block_calls(blocks: nn.ModuleList, block_kwargs: list[dict], on_input: Callable | None = None):
    """blocks_replaced by recorders: block i stores its keyword arguments (the first time) in block_kwargs[i] and
    passes its input through unchanged; block 0 hands its input to on_input; the last block stops the forward.
    No block's weights are needed, so a streamed model only needs what lies before the blocks."""

    def forward_of(index):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if not block_kwargs[index]:
                block_kwargs[index] = _clean_kwargs(kwargs)
            if index == 0 and on_input is not None:
                on_input(hidden.detach())
            if index == len(blocks) - 1:
                raise _StopForward
            return hidden
        return forward

    return blocks_replaced(blocks, forward_of)


def run_until_blocks_end(model: nn.Module, ids: torch.Tensor) -> None:
    """Run the model on ids while record_block_calls is active; the last block's recorder ends the forward."""
    try:
        model(ids, use_cache=False)
    except _StopForward:
        return
    raise RuntimeError(f"{type(model).__name__}: the forward did not reach its last decoder block")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layout: ModelLayout, calib: torch.Tensor, device: torch.device,
                         residency: Residency = RESIDENT) -> tuple[torch.Tensor, list[dict]]:
    """Run the model on calib [N, L] up to block 0. Returns (inputs [N, L, D], kwargs of every block).

    Kwargs are captured per block because some families differ between blocks (Gemma 3 passes sliding
    and global rotary embeddings and masks to alternate layers). Samples go one at a time so the
    captured kwargs (rotary cos/sin of batch 1) broadcast to any batch.
    """
    if calib is None or calib.numel() == 0:
        raise ValueError("calibration data is empty: the method needs calib.n_samples > 0 windows of tokens")
    blocks = layout.blocks(model)
    captured: list[torch.Tensor] = []
    block_kwargs: list[dict] = [{} for _ in blocks]
    with residency.outside_blocks(model, layout, head=False), \
            record_block_calls(blocks, block_kwargs, captured.append):
        for row in calib:
            run_until_blocks_end(model, row[None].to(device))
    inputs = torch.cat(captured)
    if not torch.isfinite(inputs).all():
        raise ValueError("non-finite (NaN/Inf) activations at the input of block 0: check the model weights and dtype")
    return inputs, block_kwargs


@dataclass
class BlockContext:
    """One decoder block and its calibration inputs, as handed to a method."""

    index: int
    block: nn.Module
    prefix: str  # fully qualified name of the block, e.g. "model.layers.3"
    inputs: torch.Tensor  # [N, L, D]
    kwargs: dict
    batch_size: int = 1
    next_inputs: torch.Tensor | None = field(default=None, repr=False)

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor | None = None, module: nn.Module | None = None) -> torch.Tensor:
        """Run the block (or `module` with the block's kwargs) over inputs [N, L, D] in batches."""
        inputs = self.inputs if inputs is None else inputs
        module = self.block if module is None else module
        outs = [block_output(module(inputs[i:i + self.batch_size], **self.kwargs))
                for i in range(0, inputs.shape[0], self.batch_size)]
        return torch.cat(outs)

    @contextmanager
    def input_hooks(self, names: list[str], fn: Callable[[str, torch.Tensor], None]):
        """While active, every forward of the named submodules calls fn(name, input activation)."""
        handles = [get_submodule(self.block, n).register_forward_hook(
            lambda m, args, out, n=n: fn(n, args[0].detach())) for n in names]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def full_name(self, name: str) -> str:
        return f"{self.prefix}.{name}"
