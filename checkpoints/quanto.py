"""optimum-quanto checkpoints (`QuantizedModelForCausalLM.quantize(...).save_pretrained`): model.safetensors and
`quanto_qmap.json` ({module: {"weights": "qint4" | "qint8" | "qint2", "activations": "none"}}); no
quantization_config.

Per quantized linear `P` (also `P.input_scale`, `P.output_scale`: scalars, 1 without activation quantization):
- qint8 (WeightQBytesTensor): `P.weight._data` int8 [out, in], `P.weight._scale` [out, 1]; W = scale * data.
- qint4 / qint2 (WeightQBitsTensor): quanto's own group size (128, lowered by 32 until it divides the inputs; per
  channel when none does or at 128 inputs or fewer) views the weight as [out*in/g, g] (per channel: [out, in]);
  `P.weight._data._data` uint8 [ceil(rows / (8/bits)), cols] packs it along the first dimension (packed row r holds
  rows r + k*R, value k at bit k*bits, R packed rows), `P.weight._scale` and `P.weight._shift` float [rows, 1]:
  W = scale * code - shift (a float shift: the scaled zero point).
quanto stores no layer shape: it is the base model's, and every stored tensor must fit it under quanto's group rule
(a checkpoint of another model is refused there). quanto's own dequantize() is matched exactly by the golden test.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from checkpoints.base import CheckpointError, register_reader
from checkpoints.packed_modules import PackedModuleCheckpoint

QMAP = "quanto_qmap.json"
BITS = {"qint2": 2, "qint4": 4, "qint8": 8}


def quanto_group_size(in_features: int) -> int | None:
    """quanto's group size for a 2- or 4-bit linear of `in_features` inputs (None: per output channel)."""
    group = 128
    if in_features <= group:
        return None
    while in_features % group and group > 32:
        group -= 32
    return group if in_features % group == 0 else None


@register_reader("quanto")
class QuantoCheckpoint(PackedModuleCheckpoint):
    marker = "weight._scale"
    parts = ("weight._data._data", "weight._data", "weight._scale", "weight._shift", "input_scale", "output_scale")
    label = "quanto"

    @classmethod
    def detects(cls, path: Path) -> bool:
        return path.is_dir() and (path / QMAP).is_file()

    def config(self, path: Path) -> dict:
        try:
            qmap = json.loads((path / QMAP).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError) as err:
            raise CheckpointError(f"{path}/{QMAP} cannot be read ({err}): not an optimum-quanto checkpoint") from None
        kinds = {str(m.get("weights")) for m in qmap.values()}
        activations = {str(m.get("activations")) for m in qmap.values()} - {"none", "None"}
        if not kinds <= set(BITS) or activations:
            raise CheckpointError(f"{path}: quanto weights {sorted(kinds)}, activations {sorted(activations)}; this "
                                  f"reader takes integer weights {sorted(BITS)} without activation quantization")
        if len(kinds) != 1:
            raise CheckpointError(f"{path}: quanto weights of several types {sorted(kinds)}; one is read")
        return {"qmap": qmap, "weights": kinds.pop()}

    def spec(self, config: dict) -> tuple[int, int | None, bool | None]:
        return BITS[config["weights"]], None, None

    def describe(self, path: Path):
        from checkpoints.base import Description

        config = self.config(path)
        return Description(self.name, f"quanto-{config['weights']}", BITS[config["weights"]], None, None,
                           packable=False)

    def format_name(self, config: dict) -> str:
        return f"optimum-quanto {config['weights']}"

    def bits_of(self, name: str, config: dict) -> int:
        entry = config["qmap"].get(name)
        if entry is None:
            raise CheckpointError(f"{name} stores quanto tensors but {QMAP} does not list it")
        return BITS[entry["weights"]]

    def module_shape(self, name, shapes, tensors, config, known):
        if known is None or len(known) != 2:
            raise CheckpointError(f"{name}: quanto stores no layer shape and the base model has no 2-D {name}.weight: "
                                  "not a checkpoint of this model")
        return known

    def expected_shapes(self, name, shape, present, tensors, config):
        out, inp = shape
        bits = self.bits_of(name, config)
        scalars = {p: () for p in ("input_scale", "output_scale") if p in present}
        if bits == 8:
            return {"weight._data": (out, inp), "weight._scale": (out, 1), **scalars}
        group = quanto_group_size(inp)
        rows, cols = (out * inp // group, group) if group else (out, inp)
        return {"weight._data._data": (-(-rows // (8 // bits)), cols), "weight._scale": (rows, 1),
                "weight._shift": (rows, 1), **scalars}

    def dequantize(self, name, parts, shape, config):
        bits = self.bits_of(name, config)
        scale = parts["weight._scale"]
        if bits == 8:
            return scale * parts["weight._data"]
        packed, per = parts["weight._data._data"], 8 // bits
        rows = scale.shape[0]
        codes = torch.cat([(packed >> (k * bits)) & ((1 << bits) - 1) for k in range(per)])[:rows]
        shift = parts["weight._shift"]
        if shift.dtype.is_floating_point:
            return (scale * codes - shift).reshape(shape)
        return (scale * (codes.to(torch.int8) - shift.to(torch.int8))).reshape(shape)
