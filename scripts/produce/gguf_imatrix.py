"""GGUF i-quants (IQ4_NL, IQ4_XS, IQ3_*, IQ2_*, IQ1_*) made by llama.cpp's own quantizer with an importance matrix
that llama.cpp's llama-imatrix computes on exactly our calibration token windows.

    .venv/bin/python scripts/produce/gguf_imatrix.py SRC_F32.gguf OUT_DIR --calib-tokens FILE.pt
        --llama-bin /work/venvs/llamacpp/llama-build/bin [--types IQ4_XS,IQ3_S,...] [--threads 2]

llama-imatrix reads text, which it tokenizes itself; to hand it our token ids exactly, the importance matrix is
computed on a copy of SRC whose vocabulary is 256 byte tokens (`<0xHH>`, SentencePiece byte fallback, no BOS, no
space prefix) ordered so that token id i is byte B[i]: the windows written as the bytes B[id] tokenize back to the
very ids (checked with llama.cpp's own tokenizer through llama-cpp-python before anything runs), and each window is
one llama-imatrix chunk (-c seqlen). Only for a model whose vocabulary has at most 256 tokens (the tiny goldens);
for a real model arena.sh hands llama-imatrix the windows' text (scripts/produce/calib_text.py). The weights, and so
the importance matrix, are SRC's; each OUT_DIR/<stem>-<TYPE>-imatrix.gguf is `llama-quantize --imatrix` of SRC
itself, its vocabulary untouched. OUT_DIR/PRODUCER-imatrix.json records versions, commands and the calibration fingerprint.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

TYPES = ("IQ4_NL", "IQ4_XS", "IQ3_M", "IQ3_S", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")
AVOIDED = (0x00, 0x20, 0x01)  # NUL, and space (SentencePiece turns it into U+2581): given to ids 0-2 (never drawn)


def byte_of_id(vocab: int) -> list[int]:
    """B: token id -> byte, a bijection on 256 ids whose drawn ids (3 and up) avoid NUL and space."""
    if vocab != 256:
        raise SystemExit(f"error: the byte-vocabulary route needs a 256-token model; this one has {vocab}")
    return list(AVOIDED) + [b for b in range(256) if b not in AVOIDED]


def byte_vocab_copy(src: Path, out: Path, order: list[int]) -> None:
    """SRC with its tokenizer replaced by 256 SentencePiece byte tokens, token i = <0xB[i]>."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    writer = gguf.GGUFWriter(str(out), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith(("GGUF.", "tokenizer.")):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<0x{b:02X}>" for b in order])
    writer.add_token_scores([0.0] * 256)
    writer.add_token_types([int(gguf.TokenType.BYTE)] * 256)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def check_tokenization(llama_python: Path, model: Path, text: Path, ids: list[int]) -> None:
    """llama.cpp's tokenizer (vocab only, through llama-cpp-python in its venv) gives back exactly `ids`."""
    code = ("import llama_cpp, sys, json; m = llama_cpp.Llama(sys.argv[1], vocab_only=True, verbose=False); "
            "print(json.dumps(m.tokenize(open(sys.argv[2], 'rb').read(), add_bos=False, special=False)))")
    got = json.loads(subprocess.run([str(llama_python), "-c", code, str(model), str(text)], check=True,
                                    capture_output=True, text=True).stdout.strip().splitlines()[-1])
    if got != ids:
        bad = next(i for i, (a, b) in enumerate(zip(got + [None] * len(ids), ids)) if a != b)
        raise SystemExit(f"error: llama.cpp tokenizes the byte text differently from our ids at position {bad} "
                         f"({len(got)} vs {len(ids)} tokens)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="an F32/F16 GGUF of a model with a 256-token vocabulary")
    parser.add_argument("out", type=Path, help="directory for <stem>-<TYPE>-imatrix.gguf and PRODUCER-imatrix.json")
    parser.add_argument("--calib-tokens", type=Path, required=True, help="int64 [n, seqlen] token ids (torch.save)")
    parser.add_argument("--llama-bin", type=Path, required=True, help="directory of llama-imatrix, llama-quantize")
    parser.add_argument("--llama-python", type=Path, default=Path("/work/venvs/llamacpp/bin/python"),
                        help="a python with llama-cpp-python (its tokenizer checks the byte text)")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    types = [t for t in args.types.split(",") if t]
    for tool in ("llama-imatrix", "llama-quantize"):
        if not (args.llama_bin / tool).is_file():
            sys.exit(f"error: {args.llama_bin / tool} is missing (scripts/setup_llamacpp_reference.sh DIR --tools)")
    tokens = torch.load(args.calib_tokens, weights_only=True)
    if tokens.dtype != torch.int64 or tokens.dim() != 2:
        sys.exit(f"error: --calib-tokens must hold int64 [n, seqlen], got {tokens.dtype} {tuple(tokens.shape)}")
    n, seqlen = tokens.shape
    order = byte_of_id(256)
    if int(tokens.min()) < len(AVOIDED) or int(tokens.max()) > 255:
        sys.exit(f"error: calibration ids must lie in [{len(AVOIDED)}, 256) for the byte route")
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        tmp = Path(tmp)
        byte_model, text, imatrix = tmp / "byte-vocab.gguf", tmp / "calib.bin", tmp / "imatrix.gguf"
        byte_vocab_copy(args.src, byte_model, order)
        text.write_bytes(bytes(order[i] for i in tokens.reshape(-1).tolist()))
        check_tokenization(args.llama_python, byte_model, text, tokens.reshape(-1).tolist())
        command = [str(args.llama_bin / "llama-imatrix"), "-m", str(byte_model), "-f", str(text), "-o", str(imatrix),
                   "-c", str(seqlen), "-b", str(seqlen), "--chunks", str(n), "-t", str(args.threads), "--no-ppl"]
        subprocess.run(command, check=True)
        records.append({"imatrix": command})
        for kind in types:
            dest = args.out / f"{args.src.stem.removesuffix('-F32')}-{kind}-imatrix.gguf"
            part = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
            command = [str(args.llama_bin / "llama-quantize"), "--imatrix", str(imatrix), str(args.src), str(part),
                       kind, str(args.threads)]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            os.replace(part, dest)
            records.append({"file": dest.name, "quantize": command})
    llama_version = subprocess.run([str(args.llama_python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                   capture_output=True, text=True).stdout.strip()
    record = {"tool": "llama.cpp (llama-imatrix, llama-quantize built from llama-cpp-python's source)",
              "llama_cpp_python": llama_version, "src": str(args.src),
              "src_sha256": hashlib.sha256(args.src.read_bytes()).hexdigest(),
              "calibration": {"path": str(args.calib_tokens), "shape": [n, seqlen],
                              "fingerprint": hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16]},
              "byte_order": "ids 0, 1, 2 -> bytes 0x00, 0x20, 0x01; ids 3..255 -> the other bytes ascending",
              "steps": records, "date": dt.date.today().isoformat()}
    (args.out / "PRODUCER-imatrix.json").write_text(json.dumps(record, indent=2) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
