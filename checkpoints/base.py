"""What every checkpoint reader provides, and the one check that a checkpoint belongs to its base model.

A reader answers two questions: what the checkpoint holds (`header`: its format, nominal spec, architecture,
vocabulary and the shape of every tensor, read without the weights) and what its weights are (`read`: one artifact
per quantized linear plus every other tensor, dequantized, under the base model's state-dict names).
`check_belongs` compares a header with the base model, so a checkpoint of another model is refused before any
weight is read or any evaluation runs.
"""
from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from checkpoints.stored import stored_names
from core.registry import Registry
from core.spec import DequantizedWeights, QuantizedWeights
from structure.architectures import ModelLayout

Artifact = QuantizedWeights | DequantizedWeights


class CheckpointError(ValueError):
    """A checkpoint that cannot be judged against this base model, or cannot be read: one line saying why."""


@dataclass(frozen=True)
class Description:
    """What a checkpoint is, from its metadata alone (no model needed).

    label: how result tables name it, e.g. "gguf-Q4_K_M", "gptq" (the run's method column is "ckpt:<label>").
    bits, group_size, symmetric: the nominal spec (a mixed GGUF: that of most of its quantized weights).
    packable: whether every quantized layer has a codes/scales/zeros form (none is carried dequantized), so packed
    kernels can run it.
    mixed: whether its quantized layers differ in type (a GGUF mix such as Q4_0 with Q8_0): no one spec holds them.
    """

    format: str
    label: str
    bits: int
    group_size: int | None
    symmetric: bool | None
    packable: bool = True
    mixed: bool = False


@dataclass(frozen=True)
class Header:
    """What a checkpoint holds, read from its metadata and tensor headers only, named as in the base model.

    model_type: the architecture as transformers names it.
    vocab: the tokens in id order as the checkpoint spells them, or None when it carries no tokenizer.
    linears: {base-model matrix name: (out, in)} of every quantized linear (an expert's matrix named as the model's
        table names it, e.g. model.layers.3.mlp.experts.5.up_proj, whatever the checkpoint calls it).
    tensors: {base-model state-dict name: shape} of every other tensor the checkpoint stores; an expert matrix it
        stores in full precision, one expert at a time, is `<matrix name>.weight` (the model fuses the experts).
    vocab_as_loaded: the tokens as transformers spells them in a tokenizer it builds from the checkpoint, when that
        can differ from `vocab` (a GGUF file: its loader respells whitespace and byte tokens); a function, since it
        costs a tokenizer build and is asked only when `vocab` differs from the base model's.
    """

    description: Description
    model_type: str
    vocab: tuple[str, ...] | None
    linears: dict[str, tuple[int, int]]
    tensors: dict[str, tuple[int, ...]]
    vocab_as_loaded: Callable[[], tuple[str, ...]] | None = None


@dataclass
class Contents:
    """A checkpoint's weights: one artifact per quantized linear, every other tensor dequantized to float32, and the
    bits the other tensors take in the file (they are counted apart from the linears')."""

    artifacts: dict[str, Artifact]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    other_bits: int = 0


class CheckpointReader(ABC):
    """One checkpoint format. `detects` is cheap (a file name, a config key); `header` reads metadata only."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def detects(cls, path: Path) -> bool:
        """Whether `path` is a checkpoint of this format."""

    @abstractmethod
    def describe(self, path: Path) -> Description:
        """The checkpoint's format, label and nominal spec, from its metadata."""

    @abstractmethod
    def header(self, path: Path, model: nn.Module) -> Header:
        """The checkpoint's header, its tensor names mapped to `model`'s (a skeleton is enough: no weight is read)."""

    @abstractmethod
    def read(self, path: Path, model: nn.Module) -> Contents:
        """The checkpoint's weights under `model`'s names."""


READERS: Registry[type[CheckpointReader]] = Registry("checkpoint format")


def register_reader(name: str):
    """Class decorator: make a reader selectable as `method.format=<name>` (and tried by format=auto)."""

    def wrap(cls: type[CheckpointReader]) -> type[CheckpointReader]:
        cls.name = name
        READERS.add(name, cls)
        return cls

    return wrap


def reader_for(path: str | Path, fmt: str = "auto") -> CheckpointReader:
    """The reader of `fmt`, or (auto) the one format that detects `path`; CheckpointError when none does."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"method.path={str(path)!r} does not exist; allowed values: a GGUF file or a checkpoint "
                              "directory (config.json with a quantization_config)")
    if fmt != "auto":
        return READERS.get(fmt)()
    found = [name for name, cls in READERS.items() if cls.detects(path)]
    if len(found) != 1:
        what = "no known format" if not found else f"several formats ({found})"
        raise CheckpointError(f"method.path={str(path)!r}: {what} recognizes it; allowed formats: {READERS.names()} "
                              "(set method.format to choose one)")
    return READERS.get(found[0])()


def checkpoint_files(path: Path) -> list[Path]:
    """The files a checkpoint's numbers depend on: the file itself, or a directory's weights and config."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".gguf", ".bin")
                                                                 or p.name.endswith(".json")))


def digest(path: str | Path) -> str:
    """sha256 over a checkpoint's files (names and bytes): results and cache entries are keyed by it."""
    files = checkpoint_files(Path(path).expanduser().resolve())
    return _digest(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@lru_cache(maxsize=64)
def _digest(stamped: tuple[tuple[str, int, int], ...]) -> str:
    """Hashed once per process for each (file, size, mtime) set: a changed file is hashed again."""
    h = hashlib.sha256()
    for name, _, _ in stamped:
        h.update(os.path.basename(name).encode() + b"\0")
        with open(name, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def check_belongs(header: Header, model: nn.Module, layout: ModelLayout, tokenizer=None) -> None:
    """Refuse (CheckpointError) a checkpoint that is not a quantization of `model`: another architecture, a tensor
    the model lacks or of another shape, a quantizable linear the checkpoint lacks, another vocabulary."""
    base_type = model.config.model_type
    if header.model_type != base_type:
        raise CheckpointError(f"the checkpoint is a {header.model_type!r} model, the base model a {base_type!r}: "
                              "a checkpoint is judged against the model it was made from")
    state = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    linears = layout.linear_shapes(model)
    for name, shape in header.linears.items():
        if linears.get(name, state.get(f"{name}.weight")) != tuple(shape):
            have = linears.get(name, state.get(f"{name}.weight"))
            raise CheckpointError(f"the checkpoint's {name} is {tuple(shape)}, the base model's "
                                  f"{'is missing' if have is None else f'is {have}'}: not a checkpoint of this model")
    for name, shape in header.tensors.items():
        have = state.get(name, linears.get(name.removesuffix(".weight")))  # an expert stored whole: its matrix
        if have != tuple(shape):
            raise CheckpointError(f"the checkpoint's {name} is {tuple(shape)}, the base model's "
                                  f"{'is missing' if have is None else f'is {have}'}: not a checkpoint of this model")
    absent = [n for n in linears if n not in header.linears and f"{n}.weight" not in header.tensors]
    if absent:
        raise CheckpointError(f"the checkpoint has no weight for {len(absent)} of the base model's linears "
                              f"(e.g. {absent[0]}): not a checkpoint of this model")
    if header.vocab is not None and tokenizer is not None:
        check_vocabulary(header, tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))


def check_vocabulary(header: Header, ours: list[str]) -> None:
    """Refuse a checkpoint whose tokens differ from the base model's `ours`, as the checkpoint spells them and as
    transformers spells them when it loads the checkpoint (the base model may have been made from it that way).
    Tokens are quoted with repr: a token of two spaces must not read as one."""
    theirs, spelled = header.vocab, ""
    if _first_difference(theirs, ours) is not None and header.vocab_as_loaded is not None:
        try:
            theirs, spelled = header.vocab_as_loaded(), " as transformers' loader spells it"
        except CheckpointError:  # transformers cannot load it: nobody made the base model from it that way
            pass
    if len(ours) != len(theirs):
        raise CheckpointError(f"the checkpoint's tokenizer has {len(theirs)} tokens, the base model's "
                              f"{len(ours)}: not the same vocabulary")
    bad = _first_difference(theirs, ours)
    if bad is not None:
        raw = f" (stored as {header.vocab[bad]!r})" if spelled and header.vocab[bad] != theirs[bad] else ""
        raise CheckpointError(f"token {bad} is {theirs[bad]!r}{raw} in the checkpoint's tokenizer{spelled} and "
                              f"{ours[bad]!r} in the base model's: not the same vocabulary")


def _first_difference(theirs, ours) -> int | None:
    if len(theirs) != len(ours):
        return min(len(theirs), len(ours))
    return next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), None)


@torch.no_grad()
def load_checkpoint_model(path: str | Path, dtype: torch.dtype = torch.float32, fmt: str = "auto"):
    """A quantized checkpoint directory as a model on its own (no base model needed): its config without the
    quantization_config, every tensor it stores, its linears fake-quantized -> (model in eval mode, artifacts)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from structure.architectures import apply_artifacts

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    contents = reader_for(path, fmt).read(path, model)
    missing, unexpected = model.load_state_dict({k: t.to(dtype) for k, t in contents.tensors.items()}, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    fused = stored_names(model).whole(contents.artifacts)
    missing = [k for k in missing if k.removesuffix(".weight") not in contents.artifacts and k not in tied
               and k not in fused]
    if missing or unexpected:
        raise CheckpointError(f"{path}: the checkpoint does not fit its own config: missing {missing}, unexpected "
                              f"{unexpected}")
    apply_artifacts(model, contents.artifacts, dtype)
    return model, contents.artifacts
