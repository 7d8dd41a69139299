"""What a block sees during a calibrated pass, and how the inputs of the blocks are captured.

`capture_block_inputs` runs the model's own forward on the calibration tokens up to decoder block 0 and keeps
block 0's inputs and every block's keyword arguments (position embeddings, masks), with recorders standing in for
the blocks, so no block weight is needed. The block pipeline (structure/pipeline.py) then hands the method one
`BlockContext` at a time; only one block's activations are held at once, so calibration memory does not grow
with depth. A method that runs one block many times (GPTQ, once per sequential group) gives the context an
`OutputCache`, so modules whose weights are already final serve their outputs instead of computing them again.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from structure.architectures import ModelLayout, get_submodule
from structure.streaming import RESIDENT, Residency, available_memory


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
    output_cache: OutputCache | None = field(default=None, repr=False)
    # what the step records about this block besides its artifacts (statistics, a search): kept with the block's
    # progress, so a resumed pass hands it back without running the step (structure/progress.py)
    record: dict = field(default_factory=dict, repr=False)

    def calibration_batch(self, start: int) -> AbstractContextManager:
        """Wrap one forward of the block over inputs[start:start + batch_size] (serves the output cache, if any)."""
        return nullcontext() if self.output_cache is None else self.output_cache.batch(start)

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor | None = None, module: nn.Module | None = None) -> torch.Tensor:
        """Run the block (or `module` with the block's kwargs) over inputs [N, L, D] in batches."""
        own = inputs is None and module is None  # the output cache holds the block's own calibration batches
        inputs = self.inputs if inputs is None else inputs
        module = self.block if module is None else module
        outs = []
        for i in range(0, inputs.shape[0], self.batch_size):
            with self.calibration_batch(i) if own else nullcontext():
                outs.append(block_output(module(inputs[i:i + self.batch_size], **self.kwargs)))
        return torch.cat(outs)

    @contextmanager
    def input_hooks(self, names: list[str], fn: Callable[[str, torch.Tensor], None]):
        """While active, every call of the named submodules first calls fn(name, input activation), before the
        submodule runs (so fn may end the forward early without paying for the submodule)."""
        handles = [get_submodule(self.block, n).register_forward_pre_hook(
            lambda m, args, n=n: fn(n, args[0].detach())) for n in names]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def full_name(self, name: str) -> str:
        return f"{self.prefix}.{name}"


class OutputCache:
    """Outputs of a block's submodules per calibration batch, for a method that runs partial forwards of one block
    again and again (GPTQ's true-sequential groups): a submodule whose weights are final and whose inputs have not
    changed returns the output it produced before instead of computing it again. Final are the linears named in
    `finalize`, and every submodule all of whose linears are final (the whole attention once q/k/v/o are, which
    also saves recomputing the attention itself); the method promises that nothing else in the block changes.

    The same computation on the same inputs gives the same bits, so the result is identical with or without the
    cache; it only saves time. An output is recorded on the first forward after its module became final, as far as
    `budget_bytes` allows, and never beyond a quarter of the memory free on the block's device when the cache is
    made (a streamed model runs where memory is short); what does not fit is computed each time. Before an output
    is served, every tensor input is checked against the recorded one's float64 sum and the output against
    in-place changes (`_version`); on any mismatch it is computed afresh and recorded again, so a block whose data
    flow differs from the architecture table's order still gets the right numbers.
    """

    def __init__(self, block: nn.Module, budget_bytes: int) -> None:
        self.block = block
        self.budget = max(0, int(budget_bytes))
        if self.budget:
            device = next((p.device for p in block.parameters() if not p.is_meta), torch.device("cpu"))
            self.budget = min(self.budget, available_memory(device) // 4)
        self.used = 0
        self.served = 0
        self.computed = 0
        self._final_linears: set[str] = set()
        self._final: dict[str, nn.Module] = {}  # name -> module, the linears and containers that serve or record
        # (name, batch) -> (output, its tensors' versions, input fingerprint)
        self._entries: dict[tuple[str, int], tuple] = {}

    def finalize(self, names) -> None:
        """The weights of these linears will not change again: record outputs from the next forward on."""
        self._final_linears.update(names)
        self._final = {}
        for name, module in self.block.named_modules():
            linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
            if name and linears and all((f"{name}.{n}" if n else name) in self._final_linears for n in linears):
                self._final[name] = module

    @contextmanager
    def batch(self, index: int):
        """While active, one calibration batch (`index` = its first sample) runs: final modules serve or record."""
        if not self._final or self.budget == 0:
            yield
            return
        for name, module in self._final.items():
            module.forward = self._forward_of(name, module, index)
        try:
            yield
        finally:
            for module in self._final.values():
                del module.forward

    def _forward_of(self, name: str, module: nn.Module, index: int) -> Callable:
        compute = type(module).forward.__get__(module)

        def forward(*args, **kwargs):
            key = (name, index)
            seen = _fingerprint((args, kwargs))
            entry = self._entries.pop(key, None)
            if entry is not None:
                out, versions, recorded = entry
                if recorded == seen and [t._version for t in _tensors(out)] == versions:
                    self._entries[key] = entry
                    self.served += 1
                    return out
                self.used -= _nbytes(out)
            out = compute(*args, **kwargs)
            self.computed += 1
            size = _nbytes(out)
            if self.used + size <= self.budget:
                self._entries[key] = (out, [t._version for t in _tensors(out)], seen)
                self.used += size
            return out

        return forward


def _tensors(value) -> list[torch.Tensor]:
    """The tensors inside a module's output or arguments (nested tuples, lists and dicts), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _tensors(value[k])]
    return []


def _nbytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _fingerprint(value):
    """What identifies a call's inputs: each tensor's shape and float64 sum, and every other argument as itself
    (an object that is no plain value by its identity, so a different one never matches)."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), float(value.sum(dtype=torch.float64)))
    if isinstance(value, (tuple, list)):
        return tuple(_fingerprint(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _fingerprint(value[k])) for k in sorted(value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return ("object", id(value))
