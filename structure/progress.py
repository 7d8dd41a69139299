"""What a calibrated pass keeps of its finished blocks, so that an interrupted pass resumes where it stopped.

A calibrated pass (GPTQ, AWQ: structure/pipeline.py) walks the blocks in order; block i+1 needs the inputs block i
handed on, and the model as the steps before left it. After each block the pipeline describes what the step did, as
a `FinishedBlock`: the artifacts it returned, the parameters it changed in place (only those the artifacts do not
reproduce: GPTQ writes `dequantize(artifact)` into each linear, which re-applying the artifact gives back bit for
bit, so it keeps nothing there; AWQ's scaled and clipped weights and folded norms are kept as they are), and the
step's record (its statistics, AWQ's search). A `BlockProgress` (harness/progress.py keeps it in the cache) stores
that with the next block's inputs; a later pass restores the finished blocks into the model (no step runs) and
starts the step at the first unfinished block with the stored inputs, so it computes exactly what the uninterrupted
pass would have.

The pipeline knows nothing of where progress is kept, when it is saved, or of signals: a store may raise from
`keep` (a stop was asked for), which ends the pass between two blocks, at a safe point.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from core.spec import QuantizedWeights


@dataclass
class FinishedBlock:
    """What one step did to block `index`.

    artifacts: {full linear name: artifact} the step returned.
    changed: {block-relative parameter name: CPU tensor} of what the step changed in place that the artifacts do not
        reproduce.
    from_artifacts: block-relative names of weights the step set to their artifact, dequantized, exactly.
    record: what the step recorded about the block besides its artifacts (BlockContext.record).
    routing: tokens the router sent each expert (a block with experts), as the pass measured it.
    """

    index: int
    artifacts: dict[str, QuantizedWeights]
    changed: dict[str, torch.Tensor] = field(default_factory=dict)
    from_artifacts: tuple[str, ...] = ()
    record: dict = field(default_factory=dict)
    routing: list[int] | None = None


class PassProgress(Protocol):
    """The kept progress of one calibrated pass."""

    finished: list[FinishedBlock]  # blocks 0..k-1, in order, found kept (empty: start from block 0)
    next_inputs: torch.Tensor | None  # the inputs of block k (None when no block is kept, or every block is)

    def keep(self, block: FinishedBlock, next_inputs: torch.Tensor, n_blocks: int) -> None:
        """Block `block.index` is finished and `next_inputs` feed the next one; may raise to stop the pass here."""


class BlockProgress(Protocol):
    """Where the calibrated passes of one quantization keep their progress (one per pass, in the order they run)."""

    def open_pass(self, desc: str, n_blocks: int) -> PassProgress:
        """The progress of the next calibrated pass of this quantization, `desc` naming it."""


def parameters_before(block: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every parameter of a (materialized) block, to see afterwards what a step changed."""
    return {name: p.detach().to("cpu", copy=True) for name, p in block.named_parameters()}


@torch.no_grad()
def finished_block(index: int, prefix: str, block: nn.Module, before: dict[str, torch.Tensor],
                   artifacts: dict[str, QuantizedWeights], record: dict,
                   routing: list[int] | None = None) -> FinishedBlock:
    """What the step did to `block` (full name `prefix`), compared with its parameters `before` the step."""
    changed, from_artifacts = {}, []
    for name, p in block.named_parameters():
        now = p.detach().cpu()
        if torch.equal(now, before[name]):
            continue
        art = artifacts.get(f"{prefix}.{name.removesuffix('.weight')}") if name.endswith(".weight") else None
        if art is not None and torch.equal(now, art.dequantize(now.dtype)):
            from_artifacts.append(name)
        else:
            changed[name] = p.detach().to("cpu", copy=True)
    return FinishedBlock(index, dict(artifacts), changed, tuple(from_artifacts), record, routing)


@torch.no_grad()
def restore_block(block: nn.Module, prefix: str, done: FinishedBlock) -> None:
    """Put into `block` what the step did to it: the kept tensors, and the weights its artifacts give back."""
    for name, value in done.changed.items():
        p = block.get_parameter(name)
        p.data = value.to(device=p.device)
    for name in done.from_artifacts:
        p = block.get_parameter(name)
        p.data = done.artifacts[f"{prefix}.{name.removesuffix('.weight')}"].dequantize(p.dtype).to(p.device)
