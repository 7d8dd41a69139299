"""Quantize a GGUF file with llama.cpp's own quantizer (llama-cpp-python's binding of llama_model_quantize): the
K-quant mixes people download (Q4_K_M, Q5_K_M, Q6_K, ...), which the `gguf` package cannot produce.

    /work/venv-llamacpp/bin/python scripts/produce/llamacpp.py SRC.gguf OUT.gguf --type Q4_K_M [--imatrix FILE]

SRC is an F32/F16 GGUF (scripts/produce/gguf_write.py from-hf, or llama.cpp's convert_hf_to_gguf.py), or a
quantized one, which is requantized (allow_requantize: from the packaged SmolLM2 Q4_1 file this quantizes the base
model's own weights, which are that file dequantized). --imatrix takes a file written by llama.cpp's llama-imatrix
tool: the binding cannot pass one (its params hold a C++ map), so with --imatrix the llama-quantize binary given by
--quantize-bin is run instead. Setup: scripts/setup_llamacpp_reference.sh. The write is atomic, and
OUT.gguf.producer.json records the tool, versions and arguments.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path


def quantize_with_binding(src: Path, out: Path, type_name: str, threads: int) -> None:
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}", None)
    if ftype is None:
        raise SystemExit(f"--type {type_name}: llama.cpp has no file type LLAMA_FTYPE_MOSTLY_{type_name}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype, params.allow_requantize = threads, ftype, True
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if status != 0:
        raise SystemExit(f"llama_model_quantize failed with status {status}")


def quantize_with_binary(binary: Path, src: Path, out: Path, type_name: str, threads: int, imatrix: Path) -> None:
    subprocess.run([str(binary), "--allow-requantize", "--imatrix", str(imatrix), str(src), str(out), type_name,
                    str(threads)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--type", required=True, help="a llama.cpp file type: Q4_0, Q4_K_M, Q5_K_M, Q6_K, ...")
    parser.add_argument("--imatrix", type=Path, help="an importance matrix written by llama-imatrix")
    parser.add_argument("--quantize-bin", type=Path, help="llama-quantize (needed with --imatrix)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.imatrix and not args.quantize_bin:
        parser.error("--imatrix needs --quantize-bin (the binding cannot pass an importance matrix)")
    import llama_cpp

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    try:
        if args.imatrix:
            quantize_with_binary(args.quantize_bin, args.src, tmp, args.type, args.threads, args.imatrix)
        else:
            quantize_with_binding(args.src, tmp, args.type, args.threads)
        os.replace(tmp, args.out)
    finally:
        tmp.unlink(missing_ok=True)
    record = {"tool": "llama.cpp via llama-cpp-python", "llama_cpp_python": llama_cpp.__version__,
              "command": [Path(sys.argv[0]).name, *sys.argv[1:]], "date": dt.date.today().isoformat()}
    Path(f"{args.out}.producer.json").write_text(json.dumps(record, indent=2) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
