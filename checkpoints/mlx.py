"""MLX checkpoints (mlx-lm's `convert -q`, the `mlx-community` 4- and 8-bit repositories): affine quantization.

config.json's `quantization` holds `group_size` and `bits` (and, in mixed recipes, a per-module entry
`{"group_size", "bits"}` or `false`); `mode`, when present, must be "affine". Per quantized module `P` (every linear
of the blocks, and mlx-lm's quantized embedding table and lm_head):
- `P.weight` uint32 [out, in * bits / 32]: each row a little-endian bit stream of `bits`-bit codes (code j = bits
  [j*bits, (j+1)*bits) of the row; for 2, 4 and 8 bits, whole codes per word, lowest bits first);
- `P.scales`, `P.biases` [out, in / group_size], in the model's dtype (float16 or bfloat16 in the repositories);
W = scales * code + biases per group, computed in the scales' dtype as MLX's dequantize does (the golden test
compares with `mx.dequantize` exactly). A float bias, not an integer zero: carried dequantized.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from checkpoints.base import CheckpointError, register_reader
from checkpoints.packed_modules import PackedModuleCheckpoint


def mlx_config(path: Path) -> dict | None:
    """config.json's `quantization` (None without one)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    quant = config.get("quantization") if isinstance(config, dict) else None
    return quant if isinstance(quant, dict) and "bits" in quant and "group_size" in quant else None


def unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint32 [rows, w] (stored as int32 or uint32) -> int64 codes [rows, n]: each row a little-endian bit stream."""
    raw = words.contiguous().view(torch.uint8).reshape(words.shape[0], -1)  # little-endian bytes of each row
    bit_planes = (raw.unsqueeze(-1).long() >> torch.arange(8)) & 1  # [rows, bytes, 8], lowest bit first
    stream = bit_planes.reshape(words.shape[0], -1)[:, :n * bits].reshape(words.shape[0], n, bits)
    return (stream << torch.arange(bits)).sum(-1)


@register_reader("mlx")
class MLXCheckpoint(PackedModuleCheckpoint):
    marker = "scales"
    parts = ("weight", "scales", "biases")
    label = "mlx"

    @classmethod
    def detects(cls, path: Path) -> bool:
        return path.is_dir() and mlx_config(path) is not None

    def config(self, path: Path) -> dict:
        config = mlx_config(path)
        if config is None:
            raise CheckpointError(f"{path}/config.json has no `quantization` with bits and group_size: not an MLX "
                                  "checkpoint")
        if config.get("mode", "affine") != "affine":
            raise CheckpointError(f"{path}: MLX quantization mode={config.get('mode')!r}; this reader takes 'affine' "
                                  "(scales and biases)")
        return config

    def settings(self, name: str, config: dict) -> tuple[int, int]:
        """(bits, group_size) of one module: its own entry in a mixed recipe, else the checkpoint's."""
        own = config.get(name)
        if isinstance(own, dict):
            return int(own["bits"]), int(own["group_size"])
        return int(config["bits"]), int(config["group_size"])

    def spec(self, config: dict) -> tuple[int, int | None, bool | None]:
        return int(config["bits"]), int(config["group_size"]), None

    def describe(self, path: Path):
        from checkpoints.base import Description

        bits, group, _ = self.spec(self.config(path))
        return Description(self.name, f"mlx-{bits}bit-g{group}", bits, group, None, packable=False)

    def format_name(self, config: dict) -> str:
        return f"MLX affine {config['bits']}-bit g{config['group_size']}"

    def module_shape(self, name, shapes, tensors, config, known):
        bits, _ = self.settings(name, config)
        out, words = shapes["weight"]
        return out, words * 32 // bits

    def expected_shapes(self, name, shape, present, tensors, config):
        bits, group = self.settings(name, config)
        out, inp = shape
        if inp % group:
            raise CheckpointError(f"{name}: {inp} inputs are not a multiple of group_size={group} (MLX groups divide "
                                  "every row)")
        return {"weight": (out, inp * bits // 32), "scales": (out, inp // group), "biases": (out, inp // group)}

    def dequantize(self, name, parts, shape, config):
        bits, group = self.settings(name, config)
        scales, biases = parts["scales"], parts["biases"]
        codes = unpack_rows(parts["weight"], bits, shape[1]).to(scales.dtype).view(shape[0], -1, group)
        return (scales.unsqueeze(-1) * codes + biases.unsqueeze(-1)).reshape(shape)
