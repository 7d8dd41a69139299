"""Write a compressed-tensors `pack-quantized` checkpoint of a base model with the compressed-tensors library alone
(no llm-compressor): its own range-to-parameters rule (`calculate_qparams` on each group's min/max) and its own
compressor (`PackedQuantizationCompressor.compress`), then `library_dequantized.safetensors` from its own
`decompress`. It exists for the bit-widths whose packing changed between library versions:

    /work/venvs/ct/bin/python scripts/produce/compressed_tensors_pack.py BASE_DIR OUT_DIR --bits 3 --group-size 32

compressed-tensors up to 0.17.x packs 32 // bits values into each int32 (3 bits: 10 per word, the top 2 bits unused,
no value crossing a word); from 0.18.0 it packs densely (ceil(n * bits / 32) words, values crossing words). For 2, 4
and 8 bits the two are the same bytes. Which one a checkpoint holds depends on the installed version, which
PRODUCER.json records; the environment is a venv with torch 2.13.0 (the local CPU wheel, first), transformers 5.23.0,
pydantic, loguru, psutil, and `pip install --no-deps compressed-tensors==<version>`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path, help="base model directory (config.json, safetensors, tokenizer)")
    p.add_argument("out", type=Path, help="output directory (replaced if it exists)")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=False)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)  # before the imports: --help needs no compressed-tensors venv
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoTokenizer

    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=args.sym, strategy="group",
                               group_size=args.group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    state = load_file(str(args.base / "model.safetensors"))
    config = AutoConfig.from_pretrained(args.base)
    tensors, dequantized = {}, {}
    for name, tensor in state.items():
        if not (name.endswith("_proj.weight") and ".layers." in name):  # the decoder blocks' linears
            tensors[name] = tensor
            continue
        layer = name.removesuffix(".weight")
        out, inp = tensor.shape
        grouped = tensor.float().reshape(out, inp // args.group_size, args.group_size)
        scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), weights)
        module = {"weight": tensor.float(), "weight_scale": scale.float(), "weight_zero_point": zero.to(torch.int8)}
        packed = PackedQuantizationCompressor.compress(module, scheme)
        tensors.update({f"{layer}.{key}": value.contiguous() for key, value in packed.items()})
        back = PackedQuantizationCompressor.decompress(packed, scheme)
        dequantized[name] = back["weight"].contiguous()
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
          "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized",
                                        "weights": weights.model_dump(mode="json"), "input_activations": None,
                                        "output_activations": None}},
          "ignore": ["lm_head"], "version": version("compressed-tensors")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.tmp-", dir=args.out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file(dequantized, str(tmp / "library_dequantized.safetensors"),
                  metadata={"library": f"compressed-tensors {version('compressed-tensors')}",
                            "how": "PackedQuantizationCompressor.decompress per module"})
        config_dict = config.to_dict()
        config_dict["quantization_config"] = qc
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        AutoTokenizer.from_pretrained(args.base).save_pretrained(tmp)
        record = {"tool": "compressed-tensors (library only)", "compressed-tensors": version("compressed-tensors"),
                  "torch": torch.__version__, "transformers": version("transformers"),
                  "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
                  "date": datetime.date.today().isoformat()}
        (tmp / "PRODUCER.json").write_text(json.dumps(record, indent=2) + "\n")
        if args.out.exists():
            shutil.rmtree(args.out)
        os.replace(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(args.out)


if __name__ == "__main__":
    main()
