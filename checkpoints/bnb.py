"""bitsandbytes 4-bit checkpoints (NF4 and FP4, with or without double quantization) as transformers saves them
(`-bnb-4bit` repositories), decoded here without bitsandbytes, so they read on a CPU without CUDA.

Per quantized linear `P` (quantization_config: quant_method "bitsandbytes", load_in_4bit):
- `P.weight` uint8 [ceil(out*in/2), 1]: the codes of the flattened [out, in] weight, two per byte, the first in the
  high nibble;
- `P.weight.quant_map` float32 [16]: the code book (NF4's or FP4's values in [-1, 1]);
- `P.weight.absmax`: one scale per `blocksize` consecutive weights, float32 [n_blocks]; with double quantization
  uint8 codes of the scales minus `nested_offset`, blockwise 8-bit: `P.weight.nested_absmax` float32 [one per
  `nested_blocksize` scales] and `P.weight.nested_quant_map` float32 [256];
- `P.weight.quant_state.bitsandbytes__nf4` (or `__fp4`) uint8: the JSON of quant_type, blocksize, dtype, shape and,
  nested, nested_blocksize, nested_dtype, nested_offset.

W = quant_map[code] * absmax[block] (absmax = nested_quant_map[code] * nested_absmax[nested block] + nested_offset
when nested), in float32, cast to the quant state's dtype: bitsandbytes' own dequantize_4bit
(scripts/produce/README-bnb-mlx-hqq-quanto-torchao.md; the golden test compares with it exactly). Stored bits count
every part above, the JSON included.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from checkpoints.base import CheckpointError, register_reader
from checkpoints.hf import method_config
from checkpoints.packed_modules import PackedModuleCheckpoint

STATE_PARTS = ("weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@register_reader("bitsandbytes")
class BitsAndBytes4bitCheckpoint(PackedModuleCheckpoint):
    marker = "weight.absmax"
    parts = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
             *STATE_PARTS)
    label = "bnb"

    @classmethod
    def detects(cls, path: Path) -> bool:
        return method_config(path, ("bitsandbytes",)) is not None

    def config(self, path: Path) -> dict:
        config = method_config(path, ("bitsandbytes",))
        if config is None:
            raise CheckpointError(f"{path}/config.json has no quantization_config with quant_method 'bitsandbytes': "
                                  "not a bitsandbytes checkpoint")
        if not config.get("load_in_4bit") or config.get("load_in_8bit"):
            raise CheckpointError(f"{path}: a bitsandbytes 8-bit (LLM.int8) checkpoint; this reader takes 4-bit "
                                  "(load_in_4bit: NF4 or FP4)")
        kind = str(config.get("bnb_4bit_quant_type", "fp4")).lower()
        if kind not in ("nf4", "fp4"):
            raise CheckpointError(f"{path}: bnb_4bit_quant_type={kind!r}; allowed values: ['nf4', 'fp4']")
        return config

    def spec(self, config: dict) -> tuple[int, int | None, bool | None]:
        return 4, 64, None  # transformers' default blocksize; the quant state of each layer says its own

    def describe(self, path: Path):
        from checkpoints.base import Description

        config = self.config(path)
        kind = str(config.get("bnb_4bit_quant_type", "fp4")).lower()
        nested = "-dq" if config.get("bnb_4bit_use_double_quant") else ""
        return Description(self.name, f"bnb-{kind}{nested}", 4, 64, None, packable=False)

    def format_name(self, config: dict) -> str:
        kind = str(config.get("bnb_4bit_quant_type", "fp4")).lower()
        return f"bitsandbytes {kind}{' double-quant' if config.get('bnb_4bit_use_double_quant') else ''}"

    @staticmethod
    def quant_state(name: str, present, fetch) -> dict:
        """The layer's quant state JSON; `fetch(part)` gives a part's tensor."""
        part = next((p for p in STATE_PARTS if p in present), None)
        if part is None:
            raise CheckpointError(f"{name}.weight has no quant_state.bitsandbytes__nf4/__fp4: not a bitsandbytes "
                                  "4-bit layer")
        try:
            state = json.loads(bytes(fetch(part).to(torch.uint8).tolist()).decode("utf-8"))
        except ValueError as err:
            raise CheckpointError(f"{name}.{part} is not the JSON bitsandbytes writes ({err})") from None
        if state.get("quant_type") != part.rsplit("__", 1)[1]:
            raise CheckpointError(f"{name}.{part} says quant_type={state.get('quant_type')!r}")
        return state

    def module_shape(self, name, shapes, tensors, config, known):
        state = self.quant_state(name, shapes, lambda part: tensors.get(f"{name}.{part}"))
        shape = tuple(int(d) for d in state["shape"])
        if len(shape) != 2:
            raise ValueError(f"quant_state shape {shape} is not [out, in]")
        return shape

    def expected_shapes(self, name, shape, present, tensors, config):
        state = self.quant_state(name, present, lambda part: tensors.get(f"{name}.{part}"))
        n = shape[0] * shape[1]
        blocks = -(-n // int(state["blocksize"]))
        expected = {"weight": ((n + 1) // 2, 1), "weight.absmax": (blocks,), "weight.quant_map": (16,)}
        if "nested_blocksize" in state or "weight.nested_absmax" in present:
            expected["weight.nested_absmax"] = (-(-blocks // int(state.get("nested_blocksize", 256))),)
            expected["weight.nested_quant_map"] = (256,)
        return expected

    def dequantize(self, name, parts, shape, config):
        state = self.quant_state(name, parts, parts.__getitem__)
        absmax = parts["weight.absmax"]
        if "weight.nested_absmax" in parts:  # 8-bit blockwise codes of the scales, minus their mean
            nested = int(state["nested_blocksize"])
            codes = parts["weight.nested_quant_map"].float()[absmax.long()]
            pad = (-codes.numel()) % nested
            scaled = torch.nn.functional.pad(codes, (0, pad)).view(-1, nested) * \
                parts["weight.nested_absmax"].float().view(-1, 1)
            absmax = scaled.reshape(-1)[:codes.numel()] + float(state["nested_offset"])
        packed = parts["weight"].reshape(-1)
        codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:shape[0] * shape[1]]
        values = parts["weight.quant_map"].float()[codes.long()]
        block = int(state["blocksize"])
        pad = (-values.numel()) % block
        weight = torch.nn.functional.pad(values, (0, pad)).view(-1, block) * absmax.float().view(-1, 1)
        return weight.reshape(-1)[:values.numel()].reshape(shape).to(DTYPES.get(state.get("dtype"), torch.float32))
