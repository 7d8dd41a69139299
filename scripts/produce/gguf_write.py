"""Write a GGUF file of a model directory (Llama, or a mixture of experts), or requantize a GGUF file, with the `gguf`
package.

    python scripts/produce/gguf_write.py from-hf MODEL_DIR OUT.gguf [--type F32|F16|Q4_0|Q4_1|Q5_0|Q5_1|Q8_0]
        [--fused-gate-up]
    python scripts/produce/gguf_write.py requantize SRC.gguf OUT.gguf --type Q4_0

`from-hf` reads the directory's safetensors as llama.cpp's convert_hf_to_gguf.py does, names tensors with gguf's own
tensor-name table and permutes attn_q/attn_k rows as the converter does for Llama-architecture files (rotary halves
interleaved), and stores the tokenizer's tokens; it is for the tiny test models, whose word-level tokenizer
llama.cpp's converter does not take (use convert_hf_to_gguf.py for a real model). Mixtures, as the converter writes
them: Mixtral under llama.cpp's "llama" architecture, Qwen2-MoE, Qwen3-MoE and OLMoE under their own; each block's
experts, stored one by one in the checkpoint (Mixtral's block_sparse_moe.experts.N.w1/w3/w2, the others'
mlp.experts.N.gate_proj/up_proj/down_proj), stacked into blk.N.ffn_gate_exps / ffn_up_exps / ffn_down_exps (ggml
dimensions [in, out, experts]: numpy [experts, out, in]), or with --fused-gate-up gate and up into one
ffn_gate_up_exps (gate rows first, as newer files hold them); the router as ffn_gate_inp and Qwen2-MoE's shared
expert as ffn_*_shexp with its gate ffn_gate_inp_shexp, routers kept F32 as the converter keeps them. `requantize`
dequantizes every block matrix (blk.N.*, stacked experts too; not a router) of SRC and quantizes it to --type,
keeping token_embd/output, routers and every 1-D tensor as SRC stores them: from the packaged SmolLM2 file this
quantizes the base model's own weights (they are that file, dequantized). The `gguf` package quantizes Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0 and MXFP4 (gpt-oss's type: E2M1 codes, one E8M0 scale per 32) only; K-quants need llama.cpp
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


# model_type -> (llama.cpp's architecture name, whether its converter permutes q/k rows (its LlamaModel does))
ARCHITECTURES = {"llama": ("llama", True), "mixtral": ("llama", True), "qwen2_moe": ("qwen2moe", False),
                 "qwen3_moe": ("qwen3moe", False), "olmoe": ("olmoe", False)}
# the checkpoint's per-expert names (after the block prefix and expert number) -> the converter's stacked name
EXPERT_PROJECTIONS = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up",
                      "down_proj": "down"}
ROUTERS = ("mlp.gate.weight", "block_sparse_moe.gate.weight", "shared_expert_gate.weight")


def _stored_tensors(model_dir: Path) -> dict:
    """{name: float32 numpy array} of every tensor the checkpoint stores, named as it stores them."""
    from safetensors.numpy import load_file

    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        ["model.safetensors"]
    out = {}
    for name in files:
        out.update({k: v.astype(np.float32) for k, v in load_file(str(model_dir / name)).items()})
    return out


def add_hyperparameters(writer, cfg) -> None:
    """The header keys every architecture takes from a transformers config: blocks, lengths, heads, norm epsilon
    (also used by tests that write other architectures' files, e.g. Gemma 3)."""
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)


def from_hf(model_dir: Path, out: Path, type_name: str, fused_gate_up: bool = False) -> None:
    import re

    import gguf
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if cfg.model_type not in ARCHITECTURES:
        raise SystemExit(f"from-hf writes {sorted(ARCHITECTURES)}; {model_dir} is {cfg.model_type!r}")
    arch, permute = ARCHITECTURES[cfg.model_type]
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(model_arch, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(model_dir.name)
    add_hyperparameters(writer, cfg)
    writer.add_rope_freq_base(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    n_experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if n_experts:
        writer.add_expert_count(n_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        if getattr(cfg, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", None):
            writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    writer.add_file_type(file_type(type_name))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    expert = re.compile(r"^(?P<block>model\.layers\.(?P<bid>\d+)\.(?:mlp|block_sparse_moe)\.experts)\.(?P<e>\d+)\."
                        r"(?P<proj>\w+)\.weight$")
    stacks: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for hf_name, values in _stored_tensors(model_dir).items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if m := expert.match(hf_name):  # stacked per block and projection below, as the converter merges them
            stacks.setdefault((int(m["bid"]), EXPERT_PROJECTIONS[m["proj"]]), {})[int(m["e"])] = values
            continue
        base, suffix = hf_name.rsplit(".", 1)
        if permute and base.endswith("self_attn.q_proj"):
            values = llama_permute(values, cfg.num_attention_heads)
        elif permute and base.endswith("self_attn.k_proj"):
            values = llama_permute(values, cfg.num_key_value_heads)
        kind = type_name if values.ndim == 2 and ".layers." in hf_name and not hf_name.endswith(ROUTERS) else "F32"
        data, qtype = quantized(values, kind)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", data, raw_dtype=qtype)
    for (bid, proj), experts in sorted(stacks.items()):
        if fused_gate_up and proj == "up":
            continue
        stacked = np.stack([experts[e] for e in range(len(experts))])  # [experts, out, in]
        if fused_gate_up and proj == "gate":
            up = stacks[bid, "up"]
            stacked = np.concatenate([stacked, np.stack([up[e] for e in range(len(up))])], axis=1)
            name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_GATE_UP_EXP].format(bid=bid)
        else:
            tensor = {"gate": gguf.MODEL_TENSOR.FFN_GATE_EXP, "up": gguf.MODEL_TENSOR.FFN_UP_EXP,
                      "down": gguf.MODEL_TENSOR.FFN_DOWN_EXP}[proj]
            name = gguf.TENSOR_NAMES[tensor].format(bid=bid)
        data, qtype = quantized(stacked, type_name)
        writer.add_tensor(f"{name}.weight", data, raw_dtype=qtype)
    write_file(writer)


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
        if t.name.startswith("blk.") and len(shape) >= 2 and ".ffn_gate_inp" not in t.name:  # routers stay
            values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
            data, qtype = quantized(values, type_name)
            writer.add_tensor(t.name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    write_file(writer)


def write_file(writer) -> None:
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
    parser.add_argument("--fused-gate-up", action="store_true",
                        help="from-hf: a mixture's gate and up experts as one ffn_gate_up_exps tensor")
    args = parser.parse_args()
    import gguf

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    try:
        if args.mode == "from-hf":
            from_hf(args.src, tmp, args.type, args.fused_gate_up)
        else:
            requantize(args.src, tmp, args.type)
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
