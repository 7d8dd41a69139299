"""HQQ (half-quadratic quantization) checkpoints in safetensors: each HQQLinear's encoded state dict, as HQQ's
`AutoHQQHFModel.save_to_safetensors` and transformers' HqqConfig serialization write it.

Per quantized linear `P`: `P.W_q` (uint8, or int32 for 3 bits) the packed codes, `P.scale` and `P.zero` (floats, one
per group) and HQQ's meta, each a small tensor: `nbits`, `group_size`, `shape` (int64 [out, in]), `axis`, `packing`
and `compute_dtype` and `unpack_view_dtype` (uint8 character codes of a string), `view_as_float`, `round_zero`,
`quant_scale`, `quant_zero`, `offload_meta`, `channel_wise`, `optimize`, `encoded_state_dict`,
`stores_quant_config`. With axis 1 the weight is viewed as [out*in/g, g] (axis 0: [g, out*in/g]) and packed along
the first dimension: packed row r holds rows r + k*R (R packed rows; 8 // bits values per byte, 10 per int32 at 3
bits, padded), value k at bit (per-1-k)*bits. W = (code - zero) * scale per group in the compute dtype, reshaped to
`shape`: HQQ's Quantizer.dequantize, which the golden test compares with exactly. A float zero (HQQ's optimizer
moves it off the integers): carried dequantized.
"""
from __future__ import annotations

from pathlib import Path

import torch

from checkpoints.base import CheckpointError, register_reader
from checkpoints.hf import SafetensorsCheckpoint, quantization_config
from checkpoints.packed_modules import PackedModuleCheckpoint

META = ("nbits", "group_size", "shape", "axis", "packing", "compute_dtype", "unpack_view_dtype", "view_as_float",
        "round_zero", "quant_scale", "quant_zero", "offload_meta", "channel_wise", "optimize", "encoded_state_dict",
        "stores_quant_config")
# packing -> (bits per value, values per packed element)
PACKINGS = {"8bit_u8": (8, 1), "4bit_u8": (4, 2), "2bit_u8": (2, 4), "1bit_u8": (1, 8), "3bit_32": (3, 10)}
DTYPES = {"torch.float32": torch.float32, "torch.float16": torch.float16, "torch.bfloat16": torch.bfloat16}
SCALARS = {"nbits": (), "group_size": (), "axis": (), "view_as_float": (), "round_zero": (), "quant_scale": (),
           "quant_zero": (), "offload_meta": (), "channel_wise": (), "optimize": (), "encoded_state_dict": (),
           "stores_quant_config": (), "shape": (2,)}


def _text(t: torch.Tensor) -> str:
    return "".join(chr(int(c)) for c in t.reshape(-1).tolist())


@register_reader("hqq")
class HQQCheckpoint(PackedModuleCheckpoint):
    marker = "W_q"
    parts = ("W_q", "scale", "zero", *META)
    label = "hqq"

    @classmethod
    def detects(cls, path: Path) -> bool:
        if not path.is_dir() or not any(path.glob("*.safetensors")):
            return False
        config = quantization_config(path)
        if config and str(config.get("quant_method", "")).lower() == "hqq":
            return True
        if config and config.get("quant_method"):
            return False  # another format's directory
        return any(name.endswith(".W_q") for name in SafetensorsCheckpoint(path).names())

    def config(self, path: Path) -> dict:
        tensors = SafetensorsCheckpoint(path)
        first = next((n.removesuffix(".W_q") for n in tensors.names() if n.endswith(".W_q")), None)
        if first is None:
            raise CheckpointError(f"{path} stores no `*.W_q` tensor: not an HQQ checkpoint")
        present = {p for p in META if f"{first}.{p}" in tensors.where}
        if "nbits" not in present:
            raise CheckpointError(f"{path}: {first} has no HQQ meta (nbits, shape, ...): not an HQQ checkpoint")
        group = int(tensors.get(f"{first}.group_size")) if "group_size" in present else None
        return {"bits": int(tensors.get(f"{first}.nbits")), "group_size": group}

    def spec(self, config: dict) -> tuple[int, int | None, bool | None]:
        return config["bits"], config["group_size"], None

    def describe(self, path: Path):
        from checkpoints.base import Description

        bits, group, _ = self.spec(self.config(path))
        return Description(self.name, f"hqq-w{bits}g{group or 'C'}", bits, group, None, packable=False)

    def format_name(self, config: dict) -> str:
        return f"HQQ {config['bits']}-bit g{config['group_size']}"

    @staticmethod
    def meta(name: str, tensors, present) -> dict:
        """The module's HQQ meta, decoded; unsupported settings refused naming the module."""
        missing = [p for p in ("nbits", "shape", "axis", "packing") if p not in present]
        if missing:
            raise CheckpointError(f"{name}.{missing[0]} is missing: an HQQ layer stores its meta beside W_q")
        get = lambda p: tensors.get(f"{name}.{p}")  # noqa: E731
        meta = {"nbits": int(get("nbits")), "shape": tuple(int(d) for d in get("shape").tolist()),
                "axis": int(get("axis")), "packing": _text(get("packing")),
                "group_size": int(get("group_size")) if "group_size" in present else None,
                "compute_dtype": _text(get("compute_dtype")) if "compute_dtype" in present else "torch.float16"}
        for flag in ("quant_scale", "quant_zero", "offload_meta", "view_as_float"):
            if flag in present and int(get(flag)):
                raise CheckpointError(f"{name}: HQQ {flag}=True is not read (HQQ itself cannot serialize quantized "
                                      "scales/zeros or offloaded meta)")
        if meta["packing"] not in PACKINGS or meta["axis"] not in (0, 1) or len(meta["shape"]) != 2:
            raise CheckpointError(f"{name}: HQQ packing={meta['packing']!r}, axis={meta['axis']}, shape="
                                  f"{meta['shape']}; this reader takes packings {sorted(PACKINGS)}, axis 0 or 1, 2-D "
                                  "weights")
        if meta["compute_dtype"] not in DTYPES:
            raise CheckpointError(f"{name}: HQQ compute_dtype={meta['compute_dtype']!r}; allowed: {sorted(DTYPES)}")
        return meta

    @staticmethod
    def grouped(meta: dict) -> tuple[int, int]:
        """The [rows, cols] view HQQ quantizes: axis 1 [out*in/g, g], axis 0 [g, out*in/g]."""
        out, inp = meta["shape"]
        group = meta["group_size"] or (inp if meta["axis"] == 1 else out)
        if (out * inp) % group:
            raise CheckpointError(f"HQQ group_size={group} does not divide a weight of shape {meta['shape']}")
        return ((out * inp) // group, group) if meta["axis"] == 1 else (group, (out * inp) // group)

    def module_shape(self, name, shapes, tensors, config, known):
        return self.meta(name, tensors, set(shapes))["shape"]

    def expected_shapes(self, name, shape, present, tensors, config):
        meta = self.meta(name, tensors, present)
        rows, cols = self.grouped(meta)
        per = PACKINGS[meta["packing"]][1]
        stats = (rows, 1) if meta["axis"] == 1 else (1, cols)
        expected = {"W_q": (-(-rows // per), cols), "scale": stats, "zero": stats}
        expected.update({p: s for p, s in SCALARS.items() if p in present})
        return expected

    def dequantize(self, name, parts, shape, config):
        meta = self.meta(name, {f"{name}.{p}": t for p, t in parts.items()}, set(parts))
        bits, per = PACKINGS[meta["packing"]]
        rows, _ = self.grouped(meta)
        dtype = DTYPES[meta["compute_dtype"]]
        packed = parts["W_q"].to(torch.int64) & (0xFFFFFFFF if bits == 3 else 0xFF)
        mask = (1 << bits) - 1
        codes = torch.cat([(packed >> ((per - 1 - k) * bits)) & mask for k in range(per)])[:rows].to(dtype)
        return ((codes - parts["zero"].to(dtype)) * parts["scale"].to(dtype)).reshape(shape)
