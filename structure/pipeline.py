"""The one walk over a model's decoder blocks (llm-compressor's lesson: the pipeline owns the traversal).

A `BlockPipeline` holds a model, its layout, the device and the model's residency (where its weights live: in
memory, or streamed from a safetensors checkpoint one block at a time, structure/streaming.py). Every pass over the
blocks goes through its one loop, `walk`:
- `map_blocks`: a per-block step without calibration (RTN, re-applying a saved AWQ search);
- `calibrated_pass`: capture block 0's calibration inputs, then hand each block with its inputs to the method's
  step (GPTQ, AWQ); the step says what feeds the next block (GPTQ: the quantized block's output, AWQ: the
  full-precision one); with a progress store (`with_progress`), finished blocks are kept and a later pass resumes
  after them (structure/progress.py);
- layer-wise evaluation (structure/layerwise.py) and `materialize` (a streamed model made whole, packed on arrival).
The pipeline loads each block, collects what the step returns into an artifact store (a dict in memory, files on
disk for a streamed model), writes back what the step changed and unloads the block. A method is per-block maths
plus its config: it never walks blocks, never asks where weights live, and never imports streaming.

A mixture of experts is handed to a method's step with its fused experts linearized (structure/experts.py): every
expert is an nn.Linear fed the tokens its router chose (`moe_routing="all"`: every token, for statistics), and what
the step writes into them goes back into the fused parameters when the block leaves. The routing of each block's
calibration tokens is measured on the way and returned with the artifacts.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from core.spec import QuantizedWeights
from structure.architectures import ModelLayout
from structure.blockwise import BlockContext, capture_block_inputs
from structure.experts import linearized, routing_histogram
from structure.progress import BlockProgress, finished_block, parameters_before, restore_block
from structure.streaming import RESIDENT, Residency

MOE_ROUTING = ("routed", "all")

BlockStep = Callable[[str, nn.Module], dict[str, QuantizedWeights]]  # (block prefix, block) -> artifacts
CalibratedStep = Callable[[BlockContext], dict[str, QuantizedWeights]]  # sets ctx.next_inputs


class BlockPipeline:
    """A model, its layout and device, and where its weights live; every walk over its blocks."""

    def __init__(self, model: nn.Module, layout: ModelLayout, device: torch.device | str,
                 residency: Residency = RESIDENT, moe_routing: str = "routed",
                 progress: BlockProgress | None = None) -> None:
        if moe_routing not in MOE_ROUTING:
            raise ValueError(f"calib.moe_routing={moe_routing!r}; allowed values: {list(MOE_ROUTING)}")
        self.model, self.layout, self.device, self.residency = model, layout, torch.device(device), residency
        self.moe_routing, self.progress = moe_routing, progress

    def with_progress(self, progress: BlockProgress) -> BlockPipeline:
        """The same model and weights, whose calibrated passes keep their finished blocks in `progress` and resume
        after the ones it already holds."""
        return BlockPipeline(self.model, self.layout, self.device, self.residency, self.moe_routing, progress)

    @property
    def streamed(self) -> bool:
        return self.residency.streamed

    @property
    def n_blocks(self) -> int:
        return len(self.layout.blocks(self.model))

    def walk(self, desc: str, writeback: bool = True, keep: bool = False, leave: bool = False,
             prepare: Callable[[int, nn.Module], None] | None = None) -> Iterator[tuple[int, str, nn.Module]]:
        """(index, prefix, block) for every decoder block in order, each materialized while the caller holds it:
        the package's one block loop. `writeback`: what the caller changes is kept for later passes; `keep`: the
        block stays materialized afterwards (the model is being made whole); `prepare(i, block)` runs on each block
        first (e.g. structure.architectures.BlockArtifacts, whose `replaces(i)` a streamed model then does not
        read)."""
        replaces = getattr(prepare, "replaces", None)
        for i in tqdm(range(self.n_blocks), desc=desc, unit="block", leave=leave):
            skip = replaces(i) if replaces is not None and not writeback else frozenset()
            with self.residency.block(self.model, self.layout, i, writeback=writeback, keep=keep,
                                      skip=skip) as block:
                if prepare is not None:
                    prepare(i, block)
                yield i, self.layout.block_prefix(i), block

    def map_blocks(self, step: BlockStep, desc: str, writeback: bool = True) -> MutableMapping:
        """Run `step(prefix, block)` on every block (its experts linearized); returns a fresh store of the artifacts
        the steps returned."""
        store = self.residency.artifact_store()
        for _, prefix, block in self.walk(desc, writeback=writeback):
            with self._linearized(block):
                store.update(step(prefix, block))
        return store

    def calibrated_pass(self, step: CalibratedStep, calib: torch.Tensor, desc: str, batch_size: int = 1,
                        records: dict[str, dict] | None = None) -> tuple[MutableMapping, dict[str, list[int]]]:
        """Capture block 0's inputs on `calib` [N, L], then run `step(ctx)` on every block with its calibration
        inputs (its experts linearized); the step sets `ctx.next_inputs`, which feed the next block. Returns (a fresh
        store of the artifacts the steps returned, {block prefix: tokens the router sent each expert} for the blocks
        with experts, from the first pass of the step's forwards that reached them with every calibration
        token); `records` (if given) receives {block prefix: ctx.record} of every block.

        With a progress store, the blocks it already holds are restored instead of stepped (their artifacts,
        records, routing and in-place changes), the step starts after them on the kept inputs, and each finished
        block is handed to the store (which may end the pass there, between two blocks)."""
        kept = self.progress.open_pass(desc, self.n_blocks) if self.progress is not None else None
        resumed = len(kept.finished) if kept is not None else 0
        inputs, block_kwargs = capture_block_inputs(self.model, self.layout, calib, self.device, self.residency)
        store = self.residency.artifact_store()
        routing: dict[str, list[int]] = {}
        tokens = calib.shape[0] * calib.shape[1]
        for i, prefix, block in self.walk(desc, leave=True):
            if i < resumed:  # finished before: put back what its step did, without running it
                done = kept.finished[i]
                restore_block(block, prefix, done)
                store.update(done.artifacts)
                if records is not None:
                    records[prefix] = done.record
                if done.routing is not None:
                    routing[prefix] = done.routing
                inputs = kept.next_inputs if i == resumed - 1 else None
                continue
            ctx = BlockContext(i, block, prefix, inputs, block_kwargs[i], batch_size)
            before = parameters_before(block) if kept is not None else None
            with self._linearized(block, route_all=self.moe_routing == "all") as linear:
                artifacts = step(ctx)
            store.update(artifacts)
            histogram = None if linear is None else routing_histogram(linear.routed_calls, tokens)
            if histogram is not None:
                routing[prefix] = histogram.tolist()
            if ctx.next_inputs is None:
                raise RuntimeError(f"{desc}: block {i} did not set next_inputs")
            if not torch.isfinite(ctx.next_inputs).all():
                raise ValueError(f"{desc}: non-finite (NaN/Inf) activations after block {prefix}")
            if records is not None:
                records[prefix] = ctx.record
            inputs = ctx.next_inputs
            if kept is not None:  # after the experts went back into the fused parameters
                kept.keep(finished_block(i, prefix, block, before, artifacts, ctx.record,
                                         routing.get(prefix)), inputs, self.n_blocks)
        return store, routing

    def _linearized(self, block: nn.Module, route_all: bool = False) -> AbstractContextManager:
        """The block's fused experts as linears while the context lasts (structure.experts.linearized); yields the
        LinearizedExperts, or None for a block without experts."""
        moe = self.layout.parts(block).moe
        return nullcontext() if moe is None else linearized(block, moe.experts, route_all)

    def outside_blocks(self, head: bool = True) -> AbstractContextManager:
        """Everything outside the decoder blocks, materialized while the context lasts."""
        return self.residency.outside_blocks(self.model, self.layout, head=head)

    def read(self, name: str) -> torch.Tensor:
        """The current value of one parameter (state_dict name), on the CPU, wherever it lives."""
        return self.residency.read(self.model, name)

    def adopt(self, modified: dict[str, torch.Tensor]) -> None:
        """Make the model the checkpoint plus `modified` (what a method changed in place that no artifact covers):
        loaded into a model in memory, an overlay for a streamed one (whose earlier writes are forgotten)."""
        if self.streamed:
            self.residency.reset(modified)
        elif modified:
            self.model.load_state_dict(modified, strict=False)

    def materialize(self, prepare_block: Callable[[int, nn.Module], None] | None = None) -> None:
        """Make a streamed model whole in memory, block by block, `prepare_block(i, block)` running on each as it
        arrives (packing its linears shrinks it before the next one comes); afterwards it is an ordinary model."""
        for _ in self.walk("materialize", writeback=False, keep=True, prepare=prepare_block):
            pass
        self.residency.finish_materialize(self.model, self.layout)
        self.residency = RESIDENT
