"""GGUF (llama.cpp) checkpoints, read with the `gguf` package and mapped to the base model's names as transformers'
GGUF loader maps them (its name table and its tensor processors, e.g. Llama's q/k row permutation).

Types whose blocks are `d * (q - offset)` fit the common artifact exactly (Q4_0, Q5_0, Q8_0: one fp16 scale per 32
weights, an integer zero). The others (Q4_1 and Q5_1 with a float minimum, the K-quants' two-level scales, ...)
are carried dequantized (core.spec.DequantizedWeights), so packed kernels refuse them by name. Codes are never
decoded by hand: the format's own dequantization is run with each block's scale set to 1, which gives q - offset.

A mixture's experts are stored stacked, as llama.cpp's converter merges them: blk.N.ffn_gate_exps, ffn_up_exps and
ffn_down_exps (or gate and up in one ffn_gate_up_exps, gate rows first), numpy [experts, out, in]. Each expert's
rows are read as a matrix of their own (`_ExpertSlice`, the same code as any linear: the blocks of a row never cross
experts) under our name of that expert's matrix (the architecture table's experts path), so an exact type gives
QuantizedWeights per expert and the others DequantizedWeights per expert; stacks stored unquantized (F16/F32) go into
the model's fused parameters. Mixtral's files are llama.cpp's "llama" architecture (q/k rows permuted as Llama's).
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from checkpoints.base import (CheckpointError, CheckpointReader, Contents, Description, Header,
                              register_reader)
from core.spec import DequantizedWeights, QuantizedWeights

# type -> the integer offset of its codes: dequantized value = d * (q - offset), d the block's leading fp16 scale
EXACT_OFFSETS = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 128}
NOMINAL_BITS = {"Q2_K": 2, "Q3_K": 3, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q6_K": 6,
                "Q8_0": 8, "Q8_K": 8, "IQ4_NL": 4, "IQ4_XS": 4, "IQ3_XXS": 3, "IQ3_S": 3, "IQ2_XXS": 2, "IQ2_XS": 2,
                "IQ2_S": 2, "IQ1_S": 1, "IQ1_M": 1, "MXFP4": 4, "NVFP4": 4, "TQ1_0": 2, "TQ2_0": 2}
# the weights one scale covers (a K- or i-quant's sub-block): the group size rows report; llama.cpp's block structs
GROUP_SIZE = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q2_K": 16, "Q3_K": 16, "Q4_K": 32,
              "Q5_K": 32, "Q6_K": 16, "IQ4_NL": 32, "IQ4_XS": 32, "IQ3_XXS": 32, "IQ3_S": 32, "IQ2_XXS": 32,
              "IQ2_XS": 16, "IQ2_S": 16, "IQ1_S": 32, "IQ1_M": 16, "MXFP4": 32, "NVFP4": 16, "TQ1_0": 256,
              "TQ2_0": 256}
UNQUANTIZED = ("F32", "F16", "BF16", "F64")
# transformers' get_gguf_hf_weights_map renames these model types to llama.cpp's architecture names
GGUF_ARCH = {"cohere": "command-r", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3",
             "gemma4_text": "gemma4", "minimax_m2": "minimax-m2", "gpt_oss": "gpt-oss",
             "mixtral": "llama"}  # llama.cpp converts Mixtral as a Llama with experts
# a block's stacked experts as llama.cpp names them -> the expert projections they hold, in row order
EXPERT_STACKS = {"ffn_gate_exps": ("gate_proj",), "ffn_up_exps": ("up_proj",), "ffn_down_exps": ("down_proj",),
                 "ffn_gate_up_exps": ("gate_proj", "up_proj")}
EXPERT_STACK = re.compile(r"^blk\.(?P<block>\d+)\.(?P<stack>" + "|".join(EXPERT_STACKS) + r")\.weight$")
FP16_ONE = np.frombuffer(np.float16(1.0).tobytes(), dtype=np.uint8)


def stored_bits(type_name: str) -> float:
    """Bits per weight the GGUF type stores (codes, scales, minimums, super-block scales: the whole block)."""
    import gguf

    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return 8 * nbytes / block


@lru_cache(maxsize=8)
def _reader(path: str, stamp: tuple[int, int]):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # the reader raises ValueError, IndexError, ... on a truncated or damaged file
        raise CheckpointError(f"method.path={path!r} is not a readable GGUF file ({type(err).__name__}: {err})") \
            from None


def open_gguf(path: Path):
    stat = path.stat()
    return _reader(str(path), (stat.st_size, stat.st_mtime_ns))


@contextlib.contextmanager
def gguf_parsed_once():
    """transformers parses a GGUF file once per question (config, weights, tokenizer: ~4 s each for a 49k-token
    vocabulary) and builds gguf's tensor-name table once per module it maps (~5 s for SmolLM2): inside this block each
    file is parsed once and each table built once. Both are read-only after construction."""
    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    values = [field.parts[i] for i in field.data]
    if field.types and field.types[0].name == "STRING" or (len(field.types) > 1 and field.types[1].name == "STRING"):
        return [bytes(v).decode("utf-8", errors="replace") for v in values]
    return [v.tolist()[0] if hasattr(v, "tolist") else v for v in values]


@register_reader("gguf")
class GGUFReader(CheckpointReader):
    @classmethod
    def detects(cls, path: Path) -> bool:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"

    def _names(self, reader, model: nn.Module):
        """({gguf tensor name: base-model name}, the tensor processor transformers uses for this architecture)."""
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map)

        arch = _field(reader, "general.architecture")[0]
        expected = GGUF_ARCH.get(model.config.model_type, model.config.model_type)
        if arch != expected:
            raise CheckpointError(f"the GGUF file is a {arch!r} model, the base model a {model.config.model_type!r} "
                                  f"(llama.cpp calls it {expected!r}): a checkpoint is judged against its own model")
        processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
        with gguf_parsed_once():
            return get_gguf_hf_weights_map(model, processor, model_type=arch), processor

    def describe(self, path: Path) -> Description:
        from collections import Counter

        reader = open_gguf(path)
        weights_by_type = Counter()  # the quantized matrices of the blocks (llama.cpp names them blk.N.*)
        for t in reader.tensors:
            if t.name.startswith("blk.") and len(t.shape) >= 2 and t.tensor_type.name not in UNQUANTIZED:
                weights_by_type[t.tensor_type.name] += int(t.n_elements)
        if not weights_by_type:
            raise CheckpointError(f"method.path={str(path)!r}: the GGUF file quantizes no block weight: nothing to judge")
        main = weights_by_type.most_common(1)[0][0]
        return Description("gguf", f"gguf-{_file_type(reader, main)}", NOMINAL_BITS.get(main, 0),
                           GROUP_SIZE.get(main), main in EXACT_OFFSETS, set(weights_by_type) <= set(EXACT_OFFSETS),
                           mixed=len(weights_by_type) > 1)

    def header(self, path: Path, model: nn.Module) -> Header:
        reader = open_gguf(path)
        names, _ = self._names(reader, model)
        linears, tensors = {}, {}
        quantizable = _linear_names(model)
        state = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        for t in reader.tensors:
            stacked = _expert_slices(t, model)
            if stacked is not None:  # each expert's matrix, as a quantized linear or (unquantized) a weight
                for name, piece in stacked:
                    shape = tuple(int(d) for d in reversed(piece.shape.tolist()))
                    if t.tensor_type.name in UNQUANTIZED:
                        tensors[f"{name}.weight"] = shape
                    else:
                        linears[name] = shape
                continue
            if t.name not in names:
                raise CheckpointError(f"the GGUF tensor {t.name} has no counterpart in the base model "
                                      f"({model.config.model_type}, {model.config.num_hidden_layers} layers)")
            hf, shape = names[t.name], _as_model_shape(tuple(int(d) for d in reversed(t.shape.tolist())),
                                                       state.get(names[t.name]))
            kind = t.tensor_type.name
            if hf.removesuffix(".weight") in quantizable and kind not in UNQUANTIZED:
                linears[hf.removesuffix(".weight")] = shape
            else:
                tensors[hf] = shape
        stat = path.stat()
        return Header(self.describe(path), model.config.model_type, _vocab(reader), linears, tensors,
                      functools.partial(_vocab_as_loaded, str(path), (stat.st_size, stat.st_mtime_ns)))

    def read(self, path: Path, model: nn.Module) -> Contents:
        from gguf.quants import dequantize

        reader = open_gguf(path)
        names, processor = self._names(reader, model)
        quantizable = _linear_names(model)
        state = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        contents, experts = Contents({}), {}
        for t in reader.tensors:
            stacked = _expert_slices(t, model)
            if stacked is not None:
                for name, piece in stacked:
                    if t.tensor_type.name in UNQUANTIZED:  # into the fused parameter, below
                        experts[name] = _unquantized(piece)
                    else:
                        contents.artifacts[name] = _artifact(piece, t.tensor_type.name, None)
                if t.tensor_type.name in UNQUANTIZED:
                    contents.other_bits += int(t.n_bytes) * 8
                continue
            hf, kind = names[t.name], t.tensor_type.name
            rows = _row_order(processor, t.name, tuple(int(d) for d in reversed(t.shape.tolist())))
            if hf.removesuffix(".weight") in quantizable and kind not in UNQUANTIZED:
                contents.artifacts[hf.removesuffix(".weight")] = _artifact(t, kind, rows)
                continue
            values = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            values = torch.from_numpy(np.array(values, dtype=np.float32))
            if rows is not None:
                values = values[rows]
            processed = processor.process(weights=values.numpy(), name=t.name).weights  # e.g. Gemma's norm offset
            tensor = torch.from_numpy(np.ascontiguousarray(processed, dtype=np.float32))
            contents.tensors[hf] = tensor.reshape(_as_model_shape(tuple(tensor.shape), state.get(hf)))
            contents.other_bits += int(t.n_bytes) * 8
        if experts:
            from checkpoints.stored import assemble_fused

            try:
                contents.tensors.update(assemble_fused(model, experts))
            except ValueError as err:
                raise CheckpointError(str(err)) from None
        return contents


class _ExpertSlice:
    """One expert's rows of a stacked GGUF expert tensor, answering like a 2-D tensor of the reader (name,
    tensor_type, shape in ggml order [in, out], data of its rows' blocks), so it is read by the code that reads any
    quantized linear."""

    def __init__(self, t, index: int, rows: slice) -> None:
        self.name = f"{t.name}[expert {index}, rows {rows.start}:{rows.stop}]"
        self.tensor_type = t.tensor_type
        self.data = np.asarray(t.data)[index, rows]
        self.shape = np.array([int(t.shape[0]), rows.stop - rows.start])


def _expert_slices(t, model: nn.Module) -> list[tuple[str, _ExpertSlice]] | None:
    """[(our name of an expert's matrix, its slice of the stacked tensor)] for a stacked expert tensor of the GGUF
    (EXPERT_STACKS), None for any other tensor. A stack the model has no experts for, or of another expert count, is
    refused here by name (the header then stays a list of the checkpoint's matrices)."""
    found = EXPERT_STACK.match(t.name)
    if found is None:
        return None
    from structure.architectures import layout_for

    layout = layout_for(model)
    index, blocks = int(found["block"]), layout.blocks(model)
    parts = layout.parts(blocks[index]) if index < len(blocks) else None
    if parts is None or parts.moe is None:
        raise CheckpointError(f"the GGUF tensor {t.name} holds experts; block {index} of the base model has none")
    if len(t.shape) != 3 or int(t.shape[2]) != parts.n_experts:
        raise CheckpointError(f"the GGUF tensor {t.name} has shape {list(reversed(t.shape.tolist()))}; block {index} "
                              f"of the base model has {parts.n_experts} experts: not a checkpoint of this model")
    projections = EXPERT_STACKS[found["stack"]]
    rows = int(t.shape[1]) // len(projections)
    prefix = f"{layout.block_prefix(index)}.{parts.moe.experts.path}"
    return [(f"{prefix}.{e}.{projection}", _ExpertSlice(t, e, slice(k * rows, (k + 1) * rows)))
            for e in range(parts.n_experts) for k, projection in enumerate(projections)]


def _unquantized(piece: _ExpertSlice) -> torch.Tensor:
    """An unquantized (F16/F32) expert slice as a float32 [out, in] weight."""
    return torch.from_numpy(np.ascontiguousarray(piece.data, dtype=np.float32))


def _as_model_shape(shape: tuple[int, ...], model_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """The shape the model gives a tensor the file stores with other unit dimensions (Qwen2-MoE's shared expert gate:
    [1, H] in the model, [H] or [1, H] in files), else the file's."""
    if model_shape is not None and tuple(d for d in shape if d != 1) == tuple(d for d in model_shape if d != 1):
        return tuple(model_shape)
    return shape


def _linear_names(model: nn.Module) -> set[str]:
    from structure.architectures import layout_for

    return set(layout_for(model).quantizable_linears(model))


def _file_type(reader, main: str) -> str:
    """llama.cpp's name for the file's mix (Q4_K_M), else its main tensor type."""
    import gguf

    value = _field(reader, "general.file_type")
    try:
        return gguf.LlamaFileType(int(value[0])).name.removeprefix("MOSTLY_") if value else main
    except ValueError:
        return main


def _vocab(reader) -> tuple[str, ...] | None:
    tokens = _field(reader, "tokenizer.ggml.tokens")
    return tuple(tokens) if tokens else None


@lru_cache(maxsize=4)
def _vocab_as_loaded(path: str, stamp: tuple[int, int]) -> tuple[str, ...]:
    """The file's tokens in id order as transformers spells them when it builds a tokenizer from the file (what
    `AutoTokenizer.from_pretrained(..., gguf_file=...)` runs): its builder for the file's tokenizer type and
    architecture respells some tokens (Gemma's runs of spaces become '▁'s, byte-level tokens outside the byte
    alphabet are spelled from their UTF-8 bytes)."""
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    try:
        architecture, tokenizer_dict, _ = get_gguf_tokenizer(path)
        backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except Exception as err:  # transformers raises KeyError, ValueError, ... for a vocabulary it cannot build
        raise CheckpointError(f"transformers cannot build a tokenizer from {path} ({type(err).__name__}: {err}), so "
                              "its vocabulary can only be compared as the file spells it") from None
    return tuple(backend.id_to_token(i) for i in range(len(tokenizer_dict["tokens"])))


def _row_order(processor, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The row permutation transformers applies to this tensor (Llama's attn_q/attn_k), found by running its
    processor on the row indices; None when it keeps the order. Anything but a row permutation is refused."""
    if len(shape) != 2:
        return None
    index = np.arange(shape[0], dtype=np.float64).reshape(shape[0], 1)
    out = processor.process(weights=index, name=name).weights
    order = np.asarray(out).reshape(-1)
    if order.shape != (shape[0],) or not np.array_equal(np.sort(order), index[:, 0]):
        raise CheckpointError(f"transformers transforms the GGUF tensor {name} in a way other than reordering its "
                              "rows; this reader does not support that architecture yet")
    return None if np.array_equal(order, index[:, 0]) else torch.from_numpy(order.astype(np.int64))


def _artifact(t, kind: str, rows: torch.Tensor | None):
    """The artifact of one quantized GGUF linear [out, in], rows in the base model's order."""
    import gguf
    from gguf.quants import dequantize

    out, inp = (int(d) for d in reversed(t.shape.tolist()))
    block, nbytes = gguf.GGML_QUANT_SIZES[t.tensor_type]
    data = np.asarray(t.data, dtype=np.uint8).reshape(out, inp // block, nbytes)
    if kind in EXACT_OFFSETS:
        offset = EXACT_OFFSETS[kind]
        scales = data[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        unit = data.copy()
        unit[..., :2] = FP16_ONE  # each block's scale set to 1: its dequantization is q - offset
        codes = np.rint(dequantize(unit.reshape(out, -1), t.tensor_type)).astype(np.int16) + offset
        art = QuantizedWeights(torch.from_numpy(codes.astype(np.uint8)), torch.from_numpy(scales),
                               torch.full(scales.shape, offset, dtype=torch.uint8), NOMINAL_BITS[kind], block,
                               symmetric=True, stored_bits=stored_bits(kind))
        if not torch.isfinite(art.scales).all():
            raise CheckpointError(f"the GGUF tensor {t.name} has non-finite scales: the file is damaged")
        if rows is not None:
            art = QuantizedWeights(art.codes[rows], art.scales[rows], art.zeros[rows], art.bits, art.group_size,
                                   True, None, art.stored_bits)
        return art
    weight = torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
    weight = weight.reshape(out, inp)
    if not torch.isfinite(weight).all():
        raise CheckpointError(f"the GGUF tensor {t.name} dequantizes to non-finite values: the file is damaged")
    if rows is not None:
        weight = weight[rows]
    return DequantizedWeights(weight.contiguous(), f"GGUF {kind}", stored_bits(kind), NOMINAL_BITS.get(kind, 0),
                              GROUP_SIZE.get(kind))
