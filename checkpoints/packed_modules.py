"""What the safetensors formats of bitsandbytes, MLX, HQQ, optimum-quanto and torchao share: each quantized module
`P` is stored as a few tensors `P.<part>` (codes, scales, zeros or biases, a quant map...), its shape follows from
them and the format's config, and its weight is what the format's own dequantization gives. None of them is
`scale * (code - integer zero)` with integer zeros throughout (NF4's table, MLX's float bias, HQQ's float zero,
quanto's float shift), so every one is carried dequantized (core.spec.DequantizedWeights), and packed kernels
refuse it.

A subclass says which parts mark and make a packed module, the module's (out, in) and the shape each part must
then have, and how to dequantize. The base checks every part's shape before any weight is read (a CheckpointError
naming the tensor), gives quantized decoder linears as artifacts and every other packed module (MLX's quantized
embedding table) dequantized among the other tensors, and counts stored bits from the bytes of every part.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from checkpoints.base import Artifact, CheckpointError, CheckpointReader, Contents, Description, Header
from checkpoints.hf import SafetensorsCheckpoint, _vocab
from core.spec import DequantizedWeights
from structure.architectures import layout_for


@dataclass(frozen=True)
class PackedModule:
    """One packed module as the file stores it: its name (`model.layers.0.mlp.down_proj`), its parts
    ({part: tensor name}), the part shapes, and the weight shape (out, in) they imply."""

    name: str
    parts: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    shape: tuple[int, int]


class PackedModuleCheckpoint(CheckpointReader):
    """A checkpoint directory whose packed modules are `<name>.<part>` tensors (see the module docstring)."""

    marker: ClassVar[str]  # the part every packed module has, e.g. "weight.absmax"
    parts: ClassVar[tuple[str, ...]]  # every part a packed module may have (the marker among them)
    label: ClassVar[str]  # the Description label

    @abstractmethod
    def config(self, path: Path) -> dict:
        """The format's quantization settings (CheckpointError when the directory is not of this format)."""

    @abstractmethod
    def module_shape(self, name: str, shapes: dict[str, tuple[int, ...]], tensors: SafetensorsCheckpoint,
                     config: dict, known: tuple[int, ...] | None) -> tuple[int, int]:
        """(out, in) of a packed module's weight, from its parts' shapes or stored metadata (`known`: the base model's
        shape of `<name>.weight`, None when it has none, for a format that does not store the shape itself)."""

    @abstractmethod
    def expected_shapes(self, name: str, shape: tuple[int, int], present: set[str], tensors: SafetensorsCheckpoint,
                        config: dict) -> dict[str, tuple[int, ...]]:
        """The shape each present part must have for a weight of `shape` under `config`."""

    @abstractmethod
    def dequantize(self, name: str, parts: dict[str, torch.Tensor], shape: tuple[int, int], config: dict) \
            -> torch.Tensor:
        """The weight [out, in] as the format's own dequantization computes it (its dtype: the library's)."""

    @abstractmethod
    def spec(self, config: dict) -> tuple[int, int | None, bool | None]:
        """(nominal bits, group size or None per channel, symmetric or None when it does not apply)."""

    def format_name(self, config: dict) -> str:
        """How the artifacts name their format, e.g. "bitsandbytes nf4" (packed kernels' refusals say it)."""
        return self.label

    def artifact(self, name: str, parts: dict[str, torch.Tensor], weight: torch.Tensor, config: dict,
                 stored_bits: float) -> Artifact:
        """A quantized linear's artifact: its dequantized weight (float32 [out, in]) unless a format has an exact
        codes/scales/zeros form (then its dequantization must equal `weight`)."""
        bits, group, _ = self.spec(config)
        return DequantizedWeights(weight, self.format_name(config), stored_bits, bits, group)

    def describe(self, path: Path) -> Description:
        bits, group, sym = self.spec(self.config(path))
        return Description(self.name, self.label, bits, group, sym, packable=False)

    def modules(self, path: Path, tensors: SafetensorsCheckpoint, config: dict, model: nn.Module) \
            -> dict[str, PackedModule]:
        """Every packed module, every part's shape checked against what the module's shape and the config imply."""
        known = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        suffix = f".{self.marker}"
        names = sorted(n.removesuffix(suffix) for n in tensors.names() if n.endswith(suffix))
        modules = {}
        for name in names:
            parts = {part: f"{name}.{part}" for part in self.parts if f"{name}.{part}" in tensors.where}
            shapes = {part: tensors.shape(tensor) for part, tensor in parts.items()}
            try:
                shape = self.module_shape(name, shapes, tensors, config, known.get(f"{name}.weight"))
            except (KeyError, ValueError, TypeError) as err:
                raise CheckpointError(f"{path}: the shape of {name} cannot be read from its tensors ({err}): the "
                                      "checkpoint is damaged or not of this format") from None
            expected = self.expected_shapes(name, shape, set(parts), tensors, config)
            missing = sorted(set(expected) - set(parts))
            if missing:
                raise CheckpointError(f"{path}: {name}.{missing[0]} is missing: a {self.label} module of shape "
                                      f"{shape} stores {sorted(expected)}")
            for part, want in expected.items():
                if tuple(shapes[part]) != tuple(want):
                    raise CheckpointError(f"{path}: {name}.{part} is {tuple(shapes[part])}, a {self.label} weight "
                                          f"of shape {shape} under this config stores {tuple(want)}: the checkpoint is "
                                          "damaged or its config is not what it was made with")
            modules[name] = PackedModule(name, parts, shapes, shape)
        return modules

    def header(self, path: Path, model: nn.Module) -> Header:
        from transformers import AutoConfig

        config, tensors = self.config(path), SafetensorsCheckpoint(path)
        modules = self.modules(path, tensors, config, model)
        quantizable = set(layout_for(model).quantizable_linears(model))
        packed = {tensor for module in modules.values() for tensor in module.parts.values()}
        linears = {name: m.shape for name, m in modules.items() if name in quantizable}
        others = {f"{name}.weight": m.shape for name, m in modules.items() if name not in quantizable}
        others.update({name: tensors.shape(name) for name in tensors.names() if name not in packed})
        return Header(self.describe(path), AutoConfig.from_pretrained(path).model_type, _vocab(path), linears, others)

    def read(self, path: Path, model: nn.Module) -> Contents:
        config, tensors = self.config(path), SafetensorsCheckpoint(path)
        modules = self.modules(path, tensors, config, model)
        quantizable = set(layout_for(model).quantizable_linears(model))
        contents = Contents({})
        for name, module in modules.items():
            parts = {part: tensors.get(tensor) for part, tensor in module.parts.items()}
            try:
                weight = self.dequantize(name, parts, module.shape, config)
            except (ValueError, RuntimeError, IndexError) as err:
                raise CheckpointError(f"{name} cannot be dequantized as {self.label} ({err}): the checkpoint is "
                                      "damaged") from None
            weight = weight.float().reshape(module.shape).contiguous()
            if not torch.isfinite(weight).all():
                raise CheckpointError(f"{name} dequantizes to non-finite values: the checkpoint is damaged")
            stored = sum(t.numel() * t.element_size() for t in parts.values()) * 8
            if name in quantizable:
                contents.artifacts[name] = self.artifact(name, parts, weight, config, stored / weight.numel())
            else:
                contents.tensors[f"{name}.weight"] = weight
                contents.other_bits += stored
        packed = {tensor for module in modules.values() for tensor in module.parts.values()}
        for name in tensors.names():
            if name not in packed:
                tensor = tensors.get(name)
                contents.tensors[name] = tensor.float()
                contents.other_bits += tensor.numel() * tensor.element_size() * 8
        return contents
