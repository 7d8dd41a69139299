"""Block-by-block driver shared by the calibration-based methods (GPTQ, AWQ).

Captures the inputs (and keyword arguments: position embeddings, masks) of decoder block 0 on the
calibration tokens, then hands the methods one block at a time. Only one block's activations are held
at once, so calibration memory does not grow with depth. The method decides what feeds the next
block: GPTQ passes the output of the already quantized block, AWQ the full-precision output.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from structure.architectures import ModelLayout, get_submodule


class _StopForward(Exception):
    """Raised by the block-0 hook: nothing after the first block needs to run during capture."""


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _clean_kwargs(kwargs: dict) -> dict:
    kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
    kwargs["use_cache"] = False
    return kwargs


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layout: ModelLayout, calib: torch.Tensor,
                         device: torch.device) -> tuple[torch.Tensor, list[dict]]:
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

    def record_kwargs(index):
        def hook(module, args, kwargs):
            if not block_kwargs[index]:
                block_kwargs[index] = _clean_kwargs(kwargs)
        return hook

    def stop_at_block0(module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _StopForward

    # One full pass records each block's kwargs; every sample then stops at block 0.
    handles = [b.register_forward_pre_hook(record_kwargs(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        model(calib[:1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    handle = blocks[0].register_forward_pre_hook(stop_at_block0, with_kwargs=True)
    try:
        for row in calib:
            try:
                model(row[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
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
        outs = [_hidden(module(inputs[i:i + self.batch_size], **self.kwargs))
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


def iterate_blocks(model: nn.Module, layout: ModelLayout, calib: torch.Tensor, device: torch.device,
                   desc: str = "blocks", batch_size: int = 1) -> Iterator[BlockContext]:
    """Yield a BlockContext per decoder block; the method must set `ctx.next_inputs` before the next one."""
    inputs, block_kwargs = capture_block_inputs(model, layout, calib, device)
    blocks = layout.blocks(model)
    for i in tqdm(range(len(blocks)), desc=desc, unit="block"):
        ctx = BlockContext(i, blocks[i], layout.block_prefix(i), inputs, block_kwargs[i], batch_size)
        yield ctx
        if ctx.next_inputs is None:
            raise RuntimeError(f"{desc}: block {i} did not set next_inputs")
        if not torch.isfinite(ctx.next_inputs).all():
            raise ValueError(f"{desc}: non-finite (NaN/Inf) activations after block {ctx.prefix}")
        inputs = ctx.next_inputs
