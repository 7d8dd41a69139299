"""Where a model's weights live while methods and evaluators walk it, and streaming them from the checkpoint.

Nothing assumes the whole model is in memory. The block pipeline (structure/pipeline.py) asks the model's
`Residency`, which the loader hands it, for one decoder block (or the parts outside the blocks) at a time:

- `Resident`: the ordinary model, every weight in memory; asking costs nothing.
- `Streamed`: a skeleton on the meta device (accelerate's `init_empty_weights`). Asking for a block materializes
  its tensors on the compute device, read one by one from the safetensors shards (straight into the memory the
  previous block released, `TensorPool`; the index file says
  which shard holds which tensor), or from the run's overlay where an earlier pass changed them. Leaving the block
  writes what the pass changed to the overlay (a safetensors file per block on disk) and returns the block to the
  meta device. Peak memory is one block plus activations, whatever the depth.

Quantization results leave a streamed model the same way: `artifact_store` gives a mapping that keeps each
artifact on disk (`ArtifactStore`), so the artifacts of a deep model never sit in memory together.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from structure.architectures import ModelLayout

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


class CheckpointFormatError(ValueError):
    """A checkpoint that cannot be streamed (not in safetensors form)."""


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class TensorPool:
    """CPU tensors of the last block, kept for the next one: the blocks of a decoder have the same shapes, so after
    the first block every read lands in memory the process already holds. Allocating and freeing a block's worth of
    memory per block had the kernel fault it in again every time (a streamed 13B run spent 47% of its CPU time in
    the kernel, 273 million minor page faults). The pool holds at most what one block released."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        free = self._free.get((tuple(shape), dtype))
        return free.pop() if free else torch.empty(shape, dtype=dtype)

    def give(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.numel() > 0:
            self._free.setdefault((tuple(tensor.shape), tensor.dtype), []).append(tensor)

    def clear(self) -> None:
        self._free.clear()


def read_safetensors(path: Path, names: list[str], allocate=None) -> dict[str, torch.Tensor]:
    """{name: CPU tensor} read from one safetensors file straight into memory from `allocate(shape, dtype)`
    (default torch.empty): one read per tensor into its own memory, no file mapping and no second copy.
    A dtype this reader does not know goes through the safetensors library."""
    allocate = allocate or (lambda shape, dtype: torch.empty(shape, dtype=dtype))
    out = {}
    with open(path, "rb", buffering=0) as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        base = 8 + size
        unknown = [n for n in names if header[n]["dtype"] not in SAFETENSORS_DTYPES]
        for name in sorted((n for n in names if n not in unknown), key=lambda n: header[n]["data_offsets"][0]):
            info = header[name]
            begin, end = info["data_offsets"]
            tensor = allocate(tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]])
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if end > begin else memoryview(b"")
            if len(view) != end - begin:
                raise CheckpointFormatError(f"{path}: {name} holds {end - begin} bytes, its shape and dtype "
                                            f"{len(view)}")
            f.seek(base + begin)
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointFormatError(f"{path}: truncated inside {name}")
                done += got
            out[name] = tensor
    if unknown:
        from safetensors import safe_open

        with safe_open(path, "pt", device="cpu") as f:
            out.update({n: f.get_tensor(n).clone() for n in unknown})
    return out


class Checkpoint:
    """A Hugging Face checkpoint directory in safetensors form, read tensor by tensor, never a shard at once."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.directory / shard for name, shard in weight_map.items()}
        elif (self.directory / SAFETENSORS_SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(self.directory / SAFETENSORS_SINGLE, "pt") as f:
                self.files = {name: self.directory / SAFETENSORS_SINGLE for name in f.keys()}  # noqa: SIM118 (not a dict)
        else:
            found = sorted(p.name for p in self.directory.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
            raise CheckpointFormatError(
                f"{self.directory} holds no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} (found {found or 'nothing'}):"
                " streaming reads safetensors shards tensor by tensor; convert the checkpoint once with "
                "from_pretrained(...).save_pretrained(dir, safe_serialization=True), or set model.streaming=false")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def nbytes(self) -> int:
        """Bytes of tensor data on disk (the shards' sizes)."""
        return sum(os.path.getsize(f) for f in set(self.files.values()))

    def read(self, names: list[str], allocate=None) -> dict[str, torch.Tensor]:
        """{name: CPU tensor} in memory of its own (from `allocate(shape, dtype)`, e.g. a TensorPool's take), each
        shard opened once per call and closed after."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for path, group in by_file.items():
            out.update(read_safetensors(path, group, allocate))
        return out


def skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The model of `config` with every parameter on the meta device (no memory); buffers computed at
    construction (rotary frequencies, embedding scales) stay real, on the CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # tied parameters (lm_head = embeddings) are one object, as from_pretrained leaves them
    return model.eval()


class Residency:
    """Access to a model's weights one piece at a time (see the module docstring)."""

    streamed = False
    scratch: Path | None = None  # where a streamed model keeps what passes changed (and spilled activations)

    @contextmanager
    def block(self, model: nn.Module, layout: ModelLayout, index: int, writeback: bool = True,
              keep: bool = False, skip: frozenset[str] = frozenset()) -> Iterator[nn.Module]:
        """Decoder block `index`, materialized while the context lasts (with `keep`, for good); with writeback,
        what the caller changed in it is kept for later passes. Parameters named in `skip` (state_dict names) need
        not be read: the caller writes them before use (a model in memory has them anyway)."""
        yield layout.blocks(model)[index]

    @contextmanager
    def outside_blocks(self, model: nn.Module, layout: ModelLayout, head: bool = True) -> Iterator[None]:
        """Everything outside the decoder blocks (embeddings, final norm; lm_head unless head=False)."""
        yield

    def read(self, model: nn.Module, name: str) -> torch.Tensor:
        """The current value of one parameter (state_dict name), on the CPU."""
        return model.get_parameter(name).detach().cpu()

    def close(self) -> None:
        """Release what the residency holds on disk."""

    def artifact_store(self) -> MutableMapping:
        """Where a method puts its artifacts: a dict in memory (Streamed: files on disk)."""
        return {}

    def finish_materialize(self, model: nn.Module, layout: ModelLayout) -> None:
        """After every block was materialized for good: the parts outside the blocks too (the model is whole)."""


RESIDENT = Residency()


class ArtifactStore(MutableMapping):
    """{linear name: artifact}, each artifact in its own file under `directory`; only the names stay in memory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._names = sorted(p.stem for p in self.directory.glob("*.pt"))

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.pt"

    def __setitem__(self, name: str, artifact) -> None:
        tmp = self._path(name).with_suffix(".tmp")
        torch.save(artifact, tmp)
        os.replace(tmp, self._path(name))
        if name not in self._names:
            self._names.append(name)

    def __getitem__(self, name: str):
        if name not in self._names:
            raise KeyError(name)
        return torch.load(self._path(name), map_location="cpu", weights_only=False)  # our own file

    def __delitem__(self, name: str) -> None:
        self._path(name).unlink()
        self._names.remove(name)

    def __iter__(self):
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)


# glibc's malloc raises its mmap threshold as large blocks are freed, after which a block's tensors come from the heap
# and their freed memory stays with the process: measured on a 64-block model, RSS grew ~20 MB per block streamed.
# Trimming the heap each time a block leaves gives the memory back. (A fixed mmap threshold did too, but measured
# 2.4x slower for AWQ, whose searches allocate and free large activations all the time.)
def release_freed_memory() -> None:
    """Return the allocator's free heap memory to the system (glibc's malloc_trim; elsewhere a no-op)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC = None


class Streamed(Residency):
    """A meta-device skeleton whose tensors come from `checkpoint`, overlaid by what earlier passes changed
    (kept in `scratch`, a directory this object owns) and by `overlay` (tensors given in memory, e.g. what a
    cached quantization folded into norms)."""

    streamed = True

    def __init__(self, checkpoint: Checkpoint, device: torch.device, scratch: str | Path,
                 overlay: dict[str, torch.Tensor] | None = None) -> None:
        self.checkpoint, self.device = checkpoint, torch.device(device)
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.overlay = dict(overlay or {})
        self._written: dict[str, Path] = {}  # name -> scratch file holding its latest value
        self._aliases: dict[str, str] = {}
        self._composite: dict[str, list[list[str]]] = {}  # fused parameter -> per expert, the stored tensors of it
        self._files = 0
        self.pool = TensorPool()  # a block's tensors, reused by the next block

    def attach(self, model: nn.Module) -> nn.Module:
        """Make `model` (a skeleton) stream through this residency: map every parameter to the stored tensor it
        reads (tied parameters, lm_head = embeddings, share one checkpoint entry; a fused expert parameter that the
        checkpoint stores one expert at a time, as transformers saves mixtures, reads those tensors and stacks them),
        fail on any the checkpoint lacks, and move the buffers to the device. The model itself carries nothing:
        whoever walks it holds the residency."""
        groups: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        for names in groups.values():
            stored = [n for n in names if n in self.checkpoint]
            for n in names:
                self._aliases[n] = stored[0] if stored else n
        missing = sorted(n for n, a in self._aliases.items() if a not in self.checkpoint)
        if missing:
            stacked, renamed = _stored_sources(model)
            self._composite = {n: stacked[n] for n in missing
                               if n in stacked and all(t in self.checkpoint for g in stacked[n] for t in g)}
            self._aliases.update({n: renamed[n] for n in missing if renamed.get(n) in self.checkpoint})
            missing = [n for n in missing if n not in self._composite and self._aliases[n] not in self.checkpoint]
        if missing:
            raise CheckpointFormatError(f"{self.checkpoint.directory}: the checkpoint lacks {len(missing)} tensors "
                                        f"of the model (e.g. {missing[:3]})")
        for module in model.modules():  # buffers are computed at construction: move them once
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(self.device)
        return model

    def read_many(self, names: list[str], allocate=None) -> dict[str, torch.Tensor]:
        """Current values (CPU) of parameters by state_dict name: overlay, then scratch, then checkpoint; read into
        memory from `allocate` (default: new tensors)."""
        out, from_scratch, from_checkpoint = {}, {}, []
        for n in names:
            if n in self.overlay:
                out[n] = self.overlay[n]
            elif n in self._written:
                from_scratch.setdefault(self._written[n], []).append(n)
            else:
                from_checkpoint.append(n)
        for path, group in from_scratch.items():
            out.update(read_safetensors(path, group, allocate))
        stacked = [n for n in from_checkpoint if n in self._composite]
        from_checkpoint = [n for n in from_checkpoint if n not in self._composite]
        if from_checkpoint:
            stored = self.checkpoint.read(sorted({self._aliases.get(n, n) for n in from_checkpoint}), allocate)
            out.update({n: stored[self._aliases.get(n, n)] for n in from_checkpoint})
        for n in stacked:  # experts stored one by one: [E, ...] from each expert's tensors, as from_pretrained fuses
            parts = self._composite[n]
            stored = self.checkpoint.read(sorted({t for group in parts for t in group}))
            out[n] = torch.stack([torch.cat([stored[t] for t in group]) for group in parts])
        return out

    def read(self, model: nn.Module, name: str) -> torch.Tensor:
        value = self.read_many([name])[name]
        dtype = model.get_parameter(name).dtype
        return value.to(dtype) if value.is_floating_point() else value  # cast as from_pretrained does

    def reset(self, overlay: dict[str, torch.Tensor]) -> None:
        """Forget what earlier passes wrote; from now on the model is the checkpoint overlaid by `overlay`."""
        self.overlay, self._written = dict(overlay), {}

    def _onload(self, modules: list[tuple[str, nn.Module]], recurse: bool = True, pooled: bool = False,
                skip: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
        """Materialize the (prefix, module) pairs' parameters on the device, read in one go (so tied parameters
        share one tensor); returns the values read (CPU, in the model's dtype, as from_pretrained casts them).
        `pooled`: read into, and cast through, the pool's tensors (a block, released back to the pool). Parameters
        named in `skip` stay on the meta device, unread."""
        from accelerate.utils import set_module_tensor_to_device

        params = {(prefix, module, n): p for prefix, module in modules
                  for n, p in module.named_parameters(recurse=recurse) if prefix + n not in skip}
        values = self.read_many([prefix + n for prefix, _, n in params], self.pool.take if pooled else None)
        for (prefix, module, n), p in params.items():
            value = values[prefix + n]
            if value.is_floating_point() and value.dtype != p.dtype:
                cast = self.pool.take(tuple(value.shape), p.dtype) if pooled else torch.empty_like(value, dtype=p.dtype)
                cast.copy_(value)  # as from_pretrained casts the stored dtype to the model's
                if pooled and prefix + n not in self.overlay:
                    self.pool.give(value)
                value = values[prefix + n] = cast
            set_module_tensor_to_device(module, n, self.device, value=value)
        return values

    def _release(self, module: nn.Module, recurse: bool = True, pooled: bool = False,
                 unpooled: set[str] = frozenset()) -> None:
        """Back to the meta device; with `pooled` the CPU tensors go to the pool for the next block (a tensor of the
        overlay, held by the residency itself, never does)."""
        from accelerate.utils import set_module_tensor_to_device

        # by storage, not by object: the parameter wraps the overlay's tensor in an object of its own
        held = {t.untyped_storage().data_ptr() for t in self.overlay.values()}
        for n, p in list(module.named_parameters(recurse=recurse)):
            if pooled and p.device.type == "cpu" and p.untyped_storage().data_ptr() not in held and n not in unpooled:
                self.pool.give(p.data)
            set_module_tensor_to_device(module, n, "meta")

    @contextmanager
    def block(self, model: nn.Module, layout: ModelLayout, index: int, writeback: bool = True,
              keep: bool = False, skip: frozenset[str] = frozenset()) -> Iterator[nn.Module]:
        module, prefix = layout.blocks(model)[index], f"{layout.block_prefix(index)}."
        if skip and writeback:
            raise ValueError("a block walked with writeback must read every parameter (skip is for read-only walks)")
        if keep:  # made whole: the block stays, nothing is written back (its memory is its own, not the pool's)
            self._onload([(prefix, module)], skip=skip)
            yield module
            return
        loaded = self._onload([(prefix, module)], pooled=True, skip=skip)
        # the parameters may share memory with what was read: keep a copy, so in-place changes are seen too
        loaded = {n: self.pool.take(tuple(t.shape), t.dtype).copy_(t) for n, t in loaded.items()} \
            if writeback else None
        try:
            yield module
            if writeback:
                self._write_changes(prefix, module, loaded)
        finally:
            # the skipped parameters' memory is the caller's (fresh each block): pooled, it would pile up unused
            self._release(module, pooled=True, unpooled={n[len(prefix):] for n in skip})
            for copy in (loaded or {}).values():
                self.pool.give(copy)
            loaded = None
            release_freed_memory()

    def _write_changes(self, prefix: str, module: nn.Module, loaded: dict[str, torch.Tensor]) -> None:
        """Persist the tensors this pass changed (AWQ's scaled weights and folded norms, GPTQ's quantized weights),
        so that the next pass over the block and the evaluation see them. One file per block: what an earlier pass
        wrote and this one did not change moves into the new file, and the old file goes."""
        from safetensors.torch import save_file

        changed = {prefix + n: p.detach().cpu().contiguous() for n, p in module.named_parameters()
                   if not torch.equal(p.detach().cpu(), loaded[prefix + n])}
        if not changed:
            return
        earlier = {self._written[n] for n in self._written if n.startswith(prefix)}
        kept = self.read_many([n for n in self._written if n.startswith(prefix) and n not in changed]) \
            if earlier else {}
        self._files += 1
        path = self.scratch / f"{prefix}{self._files}.safetensors"
        save_file({**kept, **changed}, str(path))
        self._written.update({n: path for n in (*kept, *changed)})
        for old in earlier:
            old.unlink()

    @contextmanager
    def outside_blocks(self, model: nn.Module, layout: ModelLayout, head: bool = True) -> Iterator[None]:
        modules = _outside_modules(model, layout, head)
        try:
            self._onload([(f"{name}." if name else "", m) for name, m in modules], recurse=False)
            yield
        finally:
            for _, m in modules:
                self._release(m, recurse=False)

    def finish_materialize(self, model: nn.Module, layout: ModelLayout) -> None:
        self._onload([(f"{name}." if name else "", m) for name, m in _outside_modules(model, layout)], recurse=False)

    def artifact_store(self) -> MutableMapping:
        """A fresh store for one quantization (two quantizations of one model never mix their artifacts)."""
        return ArtifactStore(tempfile.mkdtemp(dir=self.scratch, prefix="artifacts-"))

    def close(self) -> None:
        self.pool.clear()
        shutil.rmtree(self.scratch, ignore_errors=True)


def _stored_sources(model: nn.Module) -> tuple[dict[str, list[list[str]]], dict[str, str]]:
    """Where checkpoints name a model's tensors differently (ModelLayout.stored_sources over every block): (fused
    expert parameters stored one expert at a time, renamed tensors); empty for a family the table does not know."""
    from structure.architectures import layout_for

    try:
        layout = layout_for(model)
    except ValueError:
        return {}, {}
    stacked, renamed = {}, {}
    for i, block in enumerate(layout.blocks(model)):
        more_stacked, more_renamed = layout.stored_sources(block, layout.block_prefix(i))
        stacked.update(more_stacked)
        renamed.update(more_renamed)
    return stacked, renamed


def _outside_modules(model: nn.Module, layout: ModelLayout, head: bool = True) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module outside the decoder blocks that holds parameters of its own (embeddings,
    final norm, and lm_head unless head=False)."""
    head_module = model.get_output_embeddings()
    return [(name, m) for name, m in model.named_modules()
            if not (name + ".").startswith(layout.spec.blocks + ".")
            and any(True for _ in m.parameters(recurse=False)) and (head or m is not head_module)]


def load_streamed(directory: str | Path, dtype: torch.dtype, device: torch.device, scratch: str | Path,
                  overlay: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, Streamed]:
    """(a meta-device model of the checkpoint in `directory`, the `Streamed` residency its weights come from)."""
    from transformers import AutoConfig

    checkpoint = Checkpoint(directory)
    residency = Streamed(checkpoint, device, scratch, overlay)
    return residency.attach(skeleton(AutoConfig.from_pretrained(directory), dtype)), residency


def available_memory(device: torch.device) -> int:
    """Bytes free for tensors on `device`: free GPU memory for CUDA, the kernel's MemAvailable for the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemAvailable:"))
