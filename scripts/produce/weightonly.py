"""Quantize a base model directory with a data-free weight-only library and save what the library saves, together
with the library's own dequantization of every quantized linear (DIR/library_dequantized.safetensors, the golden
tests' reference). Each library runs in its own venv (scripts/setup_weightonly_reference.sh LIBRARY):

    /work/venvs/bnb/bin/python     scripts/produce/weightonly.py bnb     BASE OUT --quant-type nf4 [--double-quant]
    /work/venvs/mlx/bin/python     scripts/produce/weightonly.py mlx     BASE OUT --bits 4 --group-size 64
    /work/venvs/hqq/bin/python     scripts/produce/weightonly.py hqq     BASE OUT --bits 4 --group-size 64
    /work/venvs/quanto/bin/python  scripts/produce/weightonly.py quanto  BASE OUT --weights qint4 --group-size 64
    /work/venvs/torchao/bin/python scripts/produce/weightonly.py torchao BASE OUT --group-size 32

None of these calibrates (so no calibration tokens are taken). What each calls, what it writes and how its layout
reads: scripts/produce/README-weightonly.md. The output is built in a sibling temp dir and renamed onto OUT (an
existing OUT needs --force); PRODUCER.json records the library, versions, arguments and the settings handed to it.
A library that is not installed in the running interpreter stops the script with one line saying so.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, HERE / file)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _load("_produce_common", "_common.py")
layout = _load("_produce_check_layout", "check_layout.py")  # its write_reference: the golden tests' file format

DISTRIBUTIONS = {"bnb": "bitsandbytes", "mlx": "mlx", "hqq": "hqq", "quanto": "optimum-quanto", "torchao": "torchao"}


def require(library: str) -> str:
    """The library's version, or exit with one line naming the venv to set up."""
    dist = DISTRIBUTIONS[library]
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"error: {dist} is not installed in {sys.executable}; set up its venv with "
                 f"scripts/setup_weightonly_reference.sh {library}")


def linear_names(model) -> list[str]:
    """The decoder blocks' linears (what every library here quantizes; lm_head and embeddings stay, except MLX)."""
    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear) and ".layers." in name)


def load_base(base: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval(), AutoTokenizer.from_pretrained(base)


# ----------------------------------------------------------------------------------------------- the libraries

def produce_bnb(args, out: Path) -> tuple[dict, dict, str]:
    """transformers' BitsAndBytesConfig load (bitsandbytes' CPU backend quantizes) -> save_pretrained; the library's
    dequantization: bitsandbytes.functional.dequantize_4bit(weight, quant_state) of each Linear4bit."""
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    settings = {"load_in_4bit": True, "bnb_4bit_quant_type": args.quant_type,
                "bnb_4bit_use_double_quant": args.double_quant, "bnb_4bit_compute_dtype": "float32",
                "bnb_4bit_quant_storage": "uint8"}
    config = BitsAndBytesConfig(**{**settings, "bnb_4bit_compute_dtype": torch.float32,
                                   "bnb_4bit_quant_storage": torch.uint8})
    model = AutoModelForCausalLM.from_pretrained(args.base, quantization_config=config, dtype=torch.float32,
                                                 device_map="cpu")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(args.base).save_pretrained(out)
    weights = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear4bit":
            weights[name] = F.dequantize_4bit(module.weight.data, module.weight.quant_state).cpu()
    return weights, settings, "bitsandbytes.functional.dequantize_4bit(Linear4bit.weight, quant_state)"


def produce_mlx(args, out: Path) -> tuple[dict, dict, str]:
    """mlx_lm.convert(base, out, quantize=True, q_group_size, q_bits, q_mode="affine", dtype) on MLX's Linux CPU
    build; the library's dequantization: mx.dequantize(weight, scales, biases, group_size, bits) of every quantized
    module in the saved file (mlx-lm also quantizes the embedding table; layers whose width the group size does not
    divide it leaves unquantized)."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import convert

    settings = {"quantize": True, "q_group_size": args.group_size, "q_bits": args.bits, "q_mode": "affine",
                "dtype": args.dtype}
    convert(str(args.base), str(out), **settings)
    quant = json.loads((out / "config.json").read_text())["quantization"]
    weights = {}
    for file in sorted(out.glob("*.safetensors")):
        stored = mx.load(str(file))
        for name in sorted(k.removesuffix(".scales") for k in stored if k.endswith(".scales")):
            own = quant.get(name) if isinstance(quant.get(name), dict) else quant
            w = mx.dequantize(stored[f"{name}.weight"], stored[f"{name}.scales"], stored[f"{name}.biases"],
                              group_size=own["group_size"], bits=own["bits"])
            weights[name] = torch.from_numpy(np.array(w))
    return weights, settings, "mlx.core.dequantize(weight, scales, biases, group_size, bits) of the saved tensors"


def produce_hqq(args, out: Path) -> tuple[dict, dict, str]:
    """HQQ's own API (transformers 5.23 cannot load with HqqConfig: "QuantizationMethod.HQQ is not available yet"):
    AutoHQQHFModel.quantize_model(model, BaseQuantizeConfig(nbits, group_size, axis=1), float32, "cpu") (its
    half-quadratic optimizer, data-free) -> AutoHQQHFModel.save_to_safetensors (each HQQLinear's encoded state
    dict); the library's dequantization: each HQQLinear's own dequantize()."""
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    model, tokenizer = load_base(args.base)
    settings = {"nbits": args.bits, "group_size": args.group_size, "axis": 1}
    AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(**settings), compute_dtype=torch.float32,
                                  device="cpu")
    if model.config.tie_word_embeddings:  # save_to_safetensors refuses tensors sharing memory (its own bug): the
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # file stores lm_head too
    AutoHQQHFModel.save_to_safetensors(model, str(out))
    tokenizer.save_pretrained(out)
    weights = {name: module.dequantize().cpu() for name, module in model.named_modules()
               if type(module).__name__ == "HQQLinear"}
    return weights, settings, "hqq.core.quantize.HQQLinear.dequantize() of the quantized model"


def produce_quanto(args, out: Path) -> tuple[dict, dict, str]:
    """optimum-quanto's QuantizedModelForCausalLM.quantize(model, weights=qint4|qint8) (quantize + freeze; its group
    size is its own rule, 128 lowered by 32 until it divides the layer's inputs, per channel at 128 inputs or fewer)
    -> save_pretrained (model.safetensors + quanto_qmap.json); the library's dequantization: each QLinear's frozen
    weight .dequantize()."""
    from optimum.quanto import QuantizedModelForCausalLM

    model, tokenizer = load_base(args.base)
    settings = {"weights": args.weights, "activations": None}
    qmodel = QuantizedModelForCausalLM.quantize(model, weights=args.weights)
    qmodel.save_pretrained(str(out))
    tokenizer.save_pretrained(out)
    weights = {name: module.qweight.dequantize().detach().cpu() for name, module in model.named_modules()
               if type(module).__name__ == "QLinear"}
    return weights, settings, "optimum.quanto QLinear.qweight.dequantize() of the frozen model"


def produce_torchao(args, out: Path) -> tuple[dict, dict, str]:
    """transformers' TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(g),
    mapping_type)) load (torchao's int4 weight-only path that quantizes and runs on a CPU; Int4WeightOnlyConfig's
    packings need CUDA, XPU or NPU) -> save_pretrained (safetensors, flattened by torchao); the library's
    dequantization: each linear's IntxUnpackedToInt8Tensor .dequantize()."""
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerGroup
    from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

    mapping = MappingType.SYMMETRIC if args.sym else MappingType.ASYMMETRIC
    settings = {"quant_type": "IntxWeightOnlyConfig", "weight_dtype": "int4",
                "granularity": f"PerGroup({args.group_size})", "mapping_type": mapping.name}
    config = TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(args.group_size),
                                                mapping_type=mapping))
    model = AutoModelForCausalLM.from_pretrained(args.base, quantization_config=config, dtype=torch.float32,
                                                 device_map="cpu")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(args.base).save_pretrained(out)
    weights = {name: module.weight.dequantize().detach().cpu() for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and type(module.weight).__name__ == "IntxUnpackedToInt8Tensor"}
    return weights, settings, "torchao IntxUnpackedToInt8Tensor.dequantize() of each quantized linear's weight"


LIBRARIES = {"bnb": produce_bnb, "mlx": produce_mlx, "hqq": produce_hqq, "quanto": produce_quanto,
             "torchao": produce_torchao}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("library", choices=sorted(DISTRIBUTIONS))
    p.add_argument("base", type=Path, help="base model directory (config.json, safetensors, tokenizer)")
    p.add_argument("out", type=Path, help="output directory (must not exist unless --force)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4", help="bnb: the 4-bit code book")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=False,
                   help="bnb: quantize the block scales again (8-bit, blocks of 256)")
    p.add_argument("--bits", type=int, default=4, help="mlx, hqq: code width")
    p.add_argument("--group-size", type=int, default=64, help="mlx, hqq, quanto, torchao: weights per scale")
    p.add_argument("--dtype", default="float16", help="mlx: dtype of scales, biases and unquantized tensors")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True,
                   help="torchao: symmetric int4 (its default) or asymmetric with an int8 zero point")
    p.add_argument("--weights", choices=["qint4", "qint8"], default="qint4", help="quanto: weight type")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    version = require(args.library)
    torch.manual_seed(0)
    with common.AtomicOutput(args.out, args.force) as tmp:  # each library creates the directory
        weights, settings, how = LIBRARIES[args.library](args, tmp)
        if not weights:
            raise SystemExit(f"error: {args.library} quantized no linear of {args.base}")
        args.model = args.base  # write_producer_json records the base model's files under this name
        common.write_producer_json(tmp, tool=DISTRIBUTIONS[args.library], tool_version=version,
                                   script="scripts/produce/weightonly.py", args=args,
                                   calib=common.Calibration(torch.empty(0), {"kind": "none (data-free)"}),
                                   library_config=settings)
        layout.write_reference(tmp, (weights, f"{DISTRIBUTIONS[args.library]} {version}", how))
    print(args.out)


if __name__ == "__main__":
    main()
