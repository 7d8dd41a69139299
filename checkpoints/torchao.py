"""torchao weight-only checkpoints saved through transformers (quantization_config quant_method "torchao"), in the
form that quantizes and runs on a CPU: IntxWeightOnlyConfig's IntxUnpackedToInt8Tensor (int1..int8 codes, int4 the
usual, one byte each).

transformers flattens each tensor subclass into `P._weight_<name>` tensors and a JSON entry `P.weight` in the
safetensors metadata (`_type`, `_data`: target_dtype, block_size [1, g], dtype; `_tensor_data_names`):
`P._weight_qdata` int8 [out, in] (signed codes in the target dtype's range), `P._weight_scale` [out, in/g],
`P._weight_zero_point` int8 [out, in/g]. W = (qdata - zero_point) * scale in the tensor's dtype, torchao's
dequantize_affine: integer zeros, so the artifact is codes + 2^(b-1), zeros + 2^(b-1) and the scales, which packed
kernels can run. Stored bits count the int8 codes as stored (8 per weight, not 4). Other torchao tensor types
(Int4WeightOnlyConfig's tinygemm or mslk packings, which need CUDA) are refused by name.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from checkpoints.base import CheckpointError, register_reader
from checkpoints.hf import method_config, weight_files
from checkpoints.packed_modules import PackedModuleCheckpoint
from core.spec import QuantizedWeights

READ_TYPES = ("IntxUnpackedToInt8Tensor",)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tensor_metadata(path: Path) -> dict[str, dict]:
    """{`P.weight`: torchao's JSON entry} from every weight file's safetensors metadata."""
    from safetensors import safe_open

    entries = {}
    for file in weight_files(path):
        with safe_open(str(file), "pt") as f:
            for key, value in (f.metadata() or {}).items():
                if key.endswith(".weight") and value.startswith("{"):
                    entries[key] = json.loads(value)
    return entries


@register_reader("torchao")
class TorchAOCheckpoint(PackedModuleCheckpoint):
    marker = "_weight_scale"
    parts = ("_weight_qdata", "_weight_scale", "_weight_zero_point")
    label = "torchao"

    @classmethod
    def detects(cls, path: Path) -> bool:
        return method_config(path, ("torchao",)) is not None

    def config(self, path: Path) -> dict:
        config = method_config(path, ("torchao",))
        if config is None:
            raise CheckpointError(f"{path}/config.json has no quantization_config with quant_method 'torchao'")
        entries = {k: v for k, v in tensor_metadata(path).items() if v.get("_type") not in (None, "torch.Tensor", "Tensor")}
        other = sorted({v["_type"] for v in entries.values()} - set(READ_TYPES))
        if other:
            raise CheckpointError(f"{path}: torchao tensor type(s) {other}; this reader takes {list(READ_TYPES)} "
                                  "(IntxWeightOnlyConfig, torchao's CPU int weight-only form)")
        if not entries:
            raise CheckpointError(f"{path}: no torchao-quantized tensor in its safetensors metadata")
        return {"entries": entries, "quant_type": config.get("quant_type")}

    def entry(self, name: str, config: dict) -> dict:
        entry = config["entries"].get(f"{name}.weight")
        if entry is None:
            raise CheckpointError(f"{name} stores torchao tensors but its safetensors metadata has no {name}.weight")
        data = entry["_data"]
        bits = int(str(data["target_dtype"]["_data"]).removeprefix("int"))
        block = [int(b) for b in data["block_size"]]
        if len(block) != 2 or block[0] != 1 or not 1 <= bits <= 8:
            raise CheckpointError(f"{name}: torchao block_size={block}, target int{bits}; this reader takes per-row "
                                  "groups [1, g] of int1..int8")
        return {"bits": bits, "group": block[1], "dtype": DTYPES.get(str(data["dtype"]["_data"]), torch.float32)}

    def spec(self, config: dict) -> tuple[int, int | None, bool | None]:
        first = self.entry(next(iter(config["entries"])).removesuffix(".weight"), config)
        return first["bits"], first["group"], None

    def describe(self, path: Path):
        from checkpoints.base import Description

        config = self.config(path)
        bits, group, _ = self.spec(config)
        mapping = json.dumps(config["quant_type"] or {})
        asym = "-asym" if "ASYMMETRIC" in mapping else ""
        return Description(self.name, f"torchao-int{bits}-g{group}{asym}", bits, group, not asym, packable=True)

    def format_name(self, config: dict) -> str:
        bits, group, _ = self.spec(config)
        return f"torchao int{bits} g{group}"

    def module_shape(self, name, shapes, tensors, config, known):
        out, inp = shapes["_weight_qdata"]
        return out, inp

    def expected_shapes(self, name, shape, present, tensors, config):
        entry = self.entry(name, config)
        out, inp = shape
        if inp % entry["group"]:
            raise CheckpointError(f"{name}: block size {entry['group']} does not divide its {inp} inputs")
        groups = (out, inp // entry["group"])
        return {"_weight_qdata": shape, "_weight_scale": groups, "_weight_zero_point": groups}

    def dequantize(self, name, parts, shape, config):
        entry = self.entry(name, config)
        g = entry["group"]
        q = (parts["_weight_qdata"].to(torch.int32).view(shape[0], -1, g)
             - parts["_weight_zero_point"].to(torch.int32).unsqueeze(-1))
        return (q.to(entry["dtype"]) * parts["_weight_scale"].to(entry["dtype"]).unsqueeze(-1)).reshape(shape)

    def artifact(self, name, parts, weight, config, stored_bits):
        entry = self.entry(name, config)
        offset = 1 << (entry["bits"] - 1)
        codes = parts["_weight_qdata"].to(torch.int16) + offset
        zeros = parts["_weight_zero_point"].to(torch.int16) + offset
        top = (1 << entry["bits"]) - 1
        if int(codes.min()) < 0 or int(codes.max()) > top or int(zeros.min()) < 0 or int(zeros.max()) > top:
            raise CheckpointError(f"{name}: codes or zero points outside int{entry['bits']}'s range: the checkpoint "
                                  "is damaged")
        art = QuantizedWeights(codes.to(torch.uint8), parts["_weight_scale"].float(), zeros.to(torch.uint8),
                               entry["bits"], entry["group"], symmetric=bool((zeros == offset).all()),
                               stored_bits=stored_bits)
        if not torch.equal(art.dequantize(), weight):
            raise CheckpointError(f"{name}: codes/scales/zeros do not reproduce torchao's dequantization")
        return art
