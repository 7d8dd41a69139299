"""Write a GGUF file of a Llama-architecture model directory, or requantize a GGUF file, with the `gguf` package.

    python scripts/produce/gguf_write.py from-hf MODEL_DIR OUT.gguf [--type F32|F16|Q4_0|Q4_1|Q5_0|Q5_1|Q8_0]
    python scripts/produce/gguf_write.py requantize SRC.gguf OUT.gguf --type Q4_0

`from-hf` names tensors with gguf's own tensor-name table and permutes attn_q/attn_k rows as llama.cpp's
convert_hf_to_gguf.py does for Llama (rotary halves interleaved), and stores the tokenizer's tokens; it is for the
tiny test models, whose word-level tokenizer llama.cpp's converter does not take (use convert_hf_to_gguf.py for a
real model). `requantize` dequantizes every quantized block matrix (blk.N.*) of SRC and quantizes it to --type,
keeping token_embd/output and every 1-D tensor as SRC stores them: from the packaged SmolLM2 file this quantizes
the base model's own weights (they are that file, dequantized). The `gguf` package quantizes Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0 and MXFP4 (gpt-oss's type: E2M1 codes, one E8M0 scale per 32) only; K-quants need llama.cpp
(scripts/produce/llamacpp.py).

Writes are atomic (a temporary sibling renamed into place) and OUT.gguf.producer.json records the tool, versions
and arguments.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import numpy as np

GGUF_PACKAGE_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4")


def quantized(values: np.ndarray, type_name: str):
    """(data to write, its GGML type) for a float32 tensor."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name == "F32":
        return values.astype(np.float32), qtype
    if type_name == "F16":
        return values.astype(np.float16), qtype
    return gguf.quants.quantize(values.astype(np.float32), qtype), qtype


def file_type(type_name: str) -> int:
    import gguf

    if type_name == "F32":
        return int(gguf.LlamaFileType.ALL_F32)
    # llama.cpp has no all-MXFP4 file type: its MXFP4 files (gpt-oss) are labelled MOSTLY_MXFP4_MOE
    return int(gguf.LlamaFileType["MOSTLY_MXFP4_MOE" if type_name == "MXFP4" else f"MOSTLY_{type_name}"])


def llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for Llama: each head's two rotary halves interleaved row by row."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def from_hf(model_dir: Path, out: Path, type_name: str) -> None:
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    if cfg.model_type != "llama":
        raise SystemExit(f"from-hf writes Llama models only; {model_dir} is {cfg.model_type!r}")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(model_dir.name)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type(type_name))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        values = tensor.numpy()
        if base.endswith("self_attn.q_proj"):
            values = llama_permute(values, cfg.num_attention_heads)
        elif base.endswith("self_attn.k_proj"):
            values = llama_permute(values, cfg.num_key_value_heads)
        kind = type_name if values.ndim == 2 and ".layers." in hf_name else "F32"
        data, qtype = quantized(values, kind)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", data, raw_dtype=qtype)
    _write(writer)


def requantize(src: Path, out: Path, type_name: str) -> None:
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    writer = gguf.GGUFWriter(str(out), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = file_type(type_name) if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if t.name.startswith("blk.") and len(shape) == 2:
            values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
            data, qtype = quantized(values, type_name)
            writer.add_tensor(t.name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    _write(writer)


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("from-hf", "requantize"))
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--type", default="F32", choices=GGUF_PACKAGE_TYPES)
    args = parser.parse_args()
    import gguf

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    try:
        (from_hf if args.mode == "from-hf" else requantize)(args.src, tmp, args.type)
        os.replace(tmp, args.out)
    finally:
        tmp.unlink(missing_ok=True)
    import torch
    import transformers

    record = {"tool": "gguf (python package)", "gguf": gguf.__version__ if hasattr(gguf, "__version__") else
              _version("gguf"), "torch": torch.__version__, "transformers": transformers.__version__,
              "command": [Path(sys.argv[0]).name, *sys.argv[1:]], "date": dt.date.today().isoformat()}
    Path(f"{args.out}.producer.json").write_text(json.dumps(record, indent=2) + "\n")
    print(args.out)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
