"""Checkpoint directories in the Hugging Face layout (config.json with a `quantization_config`, safetensors shards):
GPTQ (v1 and GPTQModel's v2 zero convention, act-order g_idx), AutoAWQ GEMM and GEMV, compressed-tensors
`pack-quantized` (llm-compressor) and AutoRound's own format. Tensor names are the base model's own; the packed
layouts are kernels.pack's (the same code our export writes with). scripts/produce/README.md describes each layout
as its library writes it, and scripts/produce/check_layout.py checks those claims against the libraries.

Before anything is unpacked, every packed tensor's shape (and int32 dtype) is checked against what the layer's out
and in features, bits and group size imply in the format's layout: a tensor of another width is refused by name,
never unpacked into other values.

Stored bits per weight are counted from the tensors themselves: every byte of a layer's qweight, qzeros, scales
and g_idx over its out x in weights, so a format's overhead is what the file holds, not a formula.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from checkpoints.base import (CheckpointError, CheckpointReader, Contents, Description, Header,
                              register_reader)
from checkpoints.stored import StoredNames, assemble_fused, stored_names
from core.spec import QuantizedWeights
from kernels.pack import (aligned_words, stream_words, unpack_awq_gemm, unpack_bit_stream, unpack_compressed,
                          unpack_gptq)
from structure.architectures import layout_for

log = logging.getLogger(__name__)


def quantization_config(path: Path) -> dict | None:
    """config.json's quantization_config (None without one or without config.json)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError as err:
        raise CheckpointError(f"{path}/config.json is not valid JSON ({err})") from None
    return config.get("quantization_config") if isinstance(config, dict) else None


def method_config(path: Path, methods: tuple[str, ...]) -> dict | None:
    """config.json's quantization_config when its quant_method (any case) is one of `methods`, else None."""
    config = quantization_config(path) if path.is_dir() else None
    return config if config and str(config.get("quant_method", "")).lower() in methods else None


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory (one file or an index of shards), read lazily by name: the shards
    model.safetensors.index.json names, else model.safetensors, as transformers loads them. Other safetensors files
    beside them (a repository's consolidated.safetensors, a reference dump) are not part of the model."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        files = weight_files(path)
        if not files:
            raise CheckpointError(f"{path} has no *.safetensors file")
        self.handles, self.where = [], {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as err:  # a truncated or damaged file: safetensors raises its own errors
                raise CheckpointError(f"{file} is not a readable safetensors file ({err})") from None
            self.handles.append(handle)
            self.where.update({name: handle for name in handle.keys()})

    def names(self) -> list[str]:
        return sorted(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The tensor's safetensors dtype name ("I32", "F16", ...), from the header."""
        return self.where[name].get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.where[name].get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"tensor {name} cannot be read ({err}): the file is damaged") from None


def weight_files(path: Path) -> list[Path]:
    """The model's safetensors files, as transformers loads them: the shards its index names, else
    model.safetensors, else every *.safetensors (another file beside them, a golden's library_dequantized.safetensors
    or a repository's consolidated.safetensors, is not the model's)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({type(err).__name__}: {err})") from None
        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            raise CheckpointError(f"{index} names the shard {missing[0]}, which is missing")
        return [path / shard for shard in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    return sorted(path.glob("*.safetensors"))


class PackedLinearCheckpoint(CheckpointReader):
    """A directory whose quantized linears are stored as `<name>.<part>` tensors; subclasses say which parts, how
    to unpack them, what shape each has and what the quantization_config means.

    Every part's shape (and the int32 dtype of the packed ones) is checked against what the layer's out and in
    features, bits and group size imply before anything is unpacked: a tensor of another width would otherwise be
    unpacked into garbage without an error (compressed-tensors' older 3-bit packing read as the dense one)."""

    quant_methods: tuple[str, ...]  # the quantization_config.quant_method values it reads
    parts: tuple[str, ...]  # the tensors of one quantized linear, `<name>.<part>`; the first is always there
    packed: tuple[str, ...] = ()  # the parts holding int32 words of packed integers

    @classmethod
    def detects(cls, path: Path) -> bool:
        config = method_config(path, cls.quant_methods)
        return config is not None and cls.accepts(config)

    @classmethod
    def accepts(cls, config: dict) -> bool:
        return True

    def config(self, path: Path) -> dict:
        config = method_config(path, self.quant_methods)
        if config is None:
            raise CheckpointError(f"{path}/config.json has no quantization_config with quant_method in "
                                  f"{list(self.quant_methods)}: not a {self.name} checkpoint")
        if not self.accepts(config):
            raise CheckpointError(f"{path}: {self.refusal(config)}")
        return config

    def refusal(self, config: dict) -> str:
        """Why `accepts` said no, for the error message."""
        return f"this quantization_config is not one the {self.name} reader takes"

    def spec(self, config: dict) -> tuple[int, int | None, bool]:
        """(bits, group size or None per channel, symmetric) from the quantization_config."""
        group = config.get("group_size", config.get("q_group_size"))
        return int(config["bits"]), None if group in (None, -1) else int(group), bool(config.get("sym", False))

    def layers(self, tensors: SafetensorsCheckpoint) -> list[str]:
        suffix = f".{self.parts[0]}"
        return sorted(n.removesuffix(suffix) for n in tensors.names() if n.endswith(suffix))

    def variants(self, config: dict) -> tuple:
        """The layouts files of this format may be in, told apart by their tensors' shapes (most formats: one)."""
        return (None,)

    def describe_variant(self, variant) -> str:
        return f"the {self.name} layout"

    def expected_shapes(self, out: int, inp: int, config: dict, variant) -> dict[str, tuple[int, ...] | None]:
        """{part: the shape it must have} for a quantized linear [out, in]; parts not listed may be absent, a shape
        of None is not checked."""
        raise NotImplementedError

    def optional_shapes(self, out: int, inp: int, config: dict) -> dict[str, tuple[int, ...]]:
        """{part: the shape it must have when it is there} for parts a file may leave out (an act-order g_idx)."""
        return {}

    def layout_of(self, path: Path, tensors: SafetensorsCheckpoint, config: dict,
                  model: nn.Module) -> tuple[dict[str, tuple[int, int]], object]:
        """({layer as the file names it: (out, in)}, the file's layout variant), every part of every layer checked
        against the shapes its out, in, bits and group size imply (CheckpointError naming the first tensor that has
        another)."""
        hints, names = layout_for(model).linear_shapes(model), stored_names(model)
        linears = {name: self.layer_shape(tensors, name, config, hints.get(names.matrix(name)))
                   for name in self.layers(tensors)}
        variants = self.variants(config)
        problems = {variant: list(self._mismatches(tensors, config, linears, variant)) for variant in variants}
        fitting = [variant for variant in variants if not problems[variant]]
        if not fitting:  # named in the layout most of the file fits
            raise CheckpointError(f"{path}: {min(problems.values(), key=len)[0]}")
        if len(fitting) > 1:
            self.check_unambiguous(linears, config, fitting)
        return linears, fitting[0]

    def check_unambiguous(self, linears: dict[str, tuple[int, int]], config: dict, fitting: list) -> None:
        """Several layouts fit every tensor's shape: fine only when they read the same values."""
        raise CheckpointError(f"every tensor fits {' and '.join(self.describe_variant(v) for v in fitting)}: "
                              "this reader cannot tell which one the file uses")

    def _mismatches(self, tensors: SafetensorsCheckpoint, config: dict, linears: dict[str, tuple[int, int]],
                    variant):
        """What is wrong with each layer whose parts do not have the shapes `variant` implies (one line per layer)."""
        for name, (out, inp) in linears.items():
            problem = self._layer_mismatch(tensors, config, name, out, inp, variant)
            if problem is not None:
                yield problem

    def _layer_mismatch(self, tensors: SafetensorsCheckpoint, config: dict, name: str, out: int, inp: int,
                        variant) -> str | None:
        """The first part of one layer whose shape or dtype is not what its out, in, bits and group size imply."""
        bits, group, _ = self.spec(config)
        where = f"a {out} x {inp} linear at bits={bits}, group_size={group} in {self.describe_variant(variant)}"
        expected = self.expected_shapes(out, inp, config, variant)
        optional = {part: shape for part, shape in self.optional_shapes(out, inp, config).items()
                    if f"{name}.{part}" in tensors.where}
        for part, want in {**expected, **optional}.items():
            key = f"{name}.{part}"
            if key not in tensors.where:
                return f"{key} is missing: {where} stores {', '.join(expected)}"
            have = tensors.shape(key)
            if want is not None and have != want:
                return (f"{key} has shape {list(have)}, expected {list(want)} for {where}: the checkpoint is damaged or "
                        "not what its quantization_config says")
            if part in self.packed and tensors.dtype(key) != "I32":
                return f"{key} is {tensors.dtype(key)}, expected I32 (int32 words of packed integers) for {where}"
        return None

    def header(self, path: Path, model: nn.Module) -> Header:
        from transformers import AutoConfig

        config, tensors = self.config(path), SafetensorsCheckpoint(path)
        linears, _ = self.layout_of(path, tensors, config, model)
        names = stored_names(model)
        packed = {f"{name}.{part}" for name in linears for part in self.parts}
        others = {_model_name(names, name): tensors.shape(name) for name in tensors.names() if name not in packed}
        model_type = AutoConfig.from_pretrained(path).model_type
        return Header(self.describe(path), model_type, _vocab(path), {names.matrix(n): s for n, s in linears.items()},
                      others)

    def read(self, path: Path, model: nn.Module) -> Contents:
        config, tensors = self.config(path), SafetensorsCheckpoint(path)
        linears, variant = self.layout_of(path, tensors, config, model)
        names = stored_names(model)
        contents = Contents({})
        packed = set()
        for stored in linears:
            name = names.matrix(stored)
            parts = {part: tensors.get(f"{stored}.{part}") for part in self.parts
                     if f"{stored}.{part}" in tensors.where}
            packed |= {f"{stored}.{part}" for part in parts}
            try:
                art = self.unpack(parts, config, variant, linears[stored])
            except (ValueError, RuntimeError, IndexError) as err:  # values that contradict the config
                raise CheckpointError(f"{name} cannot be unpacked as {self.name} ({err}): the checkpoint is damaged "
                                      "or not what its quantization_config says") from None
            stored = sum(t.numel() * t.element_size() for t in parts.values()) * 8
            art.stored_bits = stored / (art.out_features * art.in_features)
            if not torch.isfinite(art.scales).all():
                raise CheckpointError(f"{name} has non-finite scales: the checkpoint is damaged")
            contents.artifacts[name] = art
        experts = {}  # expert matrices stored in full precision, one by one: read into their fused parameter
        for stored in tensors.names():
            if stored in packed:
                continue
            tensor = tensors.get(stored)
            contents.other_bits += tensor.numel() * tensor.element_size() * 8
            expert = names.stored_weight(stored)
            if expert is not None:
                experts[expert] = tensor.float()
            else:
                contents.tensors[names.tensor(stored)] = tensor.float()
        try:
            contents.tensors.update(assemble_fused(model, experts, names=names))
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        return contents

    def layer_shape(self, tensors: SafetensorsCheckpoint, name: str, config: dict,
                    hint: tuple[int, int] | None) -> tuple[int, int]:
        """(out, in) of a quantized linear, from its tensors' shapes; `hint` is the base model's (out, in) of that
        linear, taken where the tensors leave `in` open (a packed width rounds it up) and agree with it."""
        raise NotImplementedError

    def unpack(self, parts: dict[str, torch.Tensor], config: dict, variant,
               shape: tuple[int, int]) -> QuantizedWeights:
        """One layer's artifact from its parts (checked against `shape`, its (out, in), already)."""
        raise NotImplementedError


def _groups(inp: int, group: int | None) -> int:
    return 1 if group is None else -(-inp // group)


@register_reader("gptq")
class GPTQCheckpoint(PackedLinearCheckpoint):
    """GPTQ (AutoGPTQ / GPTQModel / ours): qweight int32 [K*bits/32, N], qzeros [groups, N*bits/32] holding zero - 1
    (v1) or the zero itself (GPTQModel's checkpoint_format gptq_v2), scales [groups, N], g_idx [K]."""

    quant_methods = ("gptq",)
    parts = ("qweight", "qzeros", "scales", "g_idx")
    packed = ("qweight", "qzeros")

    def describe(self, path: Path) -> Description:
        config = self.config(path)
        bits, group, sym = self.spec(config)
        v2 = _checkpoint_format(config) == "gptq_v2"
        return Description("gptq", "gptq-v2" if v2 else "gptq", bits, group, sym, packable=True)

    def layer_shape(self, tensors, name, config, hint):
        out = tensors.shape(f"{name}.scales")[-1]
        if f"{name}.g_idx" in tensors.where:
            return out, tensors.shape(f"{name}.g_idx")[0]
        words, bits = tensors.shape(f"{name}.qweight")[0], self.spec(config)[0]
        if hint is not None and stream_words(hint[1], bits) == words:
            return out, hint[1]
        return out, words * 32 // bits

    def expected_shapes(self, out, inp, config, variant):
        bits, group, _ = self.spec(config)
        groups = _groups(inp, group)
        return {"qweight": (stream_words(inp, bits), out), "qzeros": (groups, stream_words(out, bits)),
                "scales": (groups, out)}

    def optional_shapes(self, out, inp, config):
        return {"g_idx": (inp,)}

    def unpack(self, parts, config, variant, shape):
        bits, group, sym = self.spec(config)
        if "g_idx" not in parts:  # some writers (AutoRound) leave out the contiguous g_idx
            K = shape[1]
            parts = {**parts, "g_idx": torch.arange(K, dtype=torch.int32) // (group or K)}
        v1 = _checkpoint_format(config) != "gptq_v2"
        art = unpack_gptq(parts, bits, group, zeros_minus_one=v1)
        if v1 and bool((art.zeros == 0).any()):
            # v1 stores zero - 1; writers disagree on a zero of 0 (ours masks per field, GPTQModel borrows from the
            # next field of the word, AutoRound clamps, AutoGPTQ corrupts the word): read per field, and say so
            log.warning("a GPTQ v1 layer stores a zero point of 0 (%d groups): v1 writers encode it differently, "
                        "so these groups are read as our export writes them", int((art.zeros == 0).sum()))
        art.symmetric = sym
        return art


@register_reader("awq_gemm")
class AWQGemmCheckpoint(PackedLinearCheckpoint):
    """AutoAWQ GEMM: qweight int32 [K, N/8] and qzeros int32 [groups, N/8] in AutoAWQ's nibble order, scales
    fp16 [groups, N]; zeros stored as they are."""

    quant_methods = ("awq",)
    parts = ("qweight", "qzeros", "scales")
    packed = ("qweight", "qzeros")
    version = "gemm"

    @classmethod
    def accepts(cls, config: dict) -> bool:
        return str(config.get("version", "gemm")).lower() == cls.version

    def refusal(self, config: dict) -> str:
        return f"AWQ version={config.get('version')!r}; the {self.name} reader takes {self.version!r}"

    def describe(self, path: Path) -> Description:
        config = self.config(path)
        bits, group, _ = self.spec(config)
        return Description(self.name, f"awq-{self.version}", bits, group, not config.get("zero_point", True))

    def layer_shape(self, tensors, name, config, hint):
        return tensors.shape(f"{name}.scales")[-1], tensors.shape(f"{name}.qweight")[0]

    def expected_shapes(self, out, inp, config, variant):
        return awq_gemm_shapes(out, inp, *self.spec(config)[:2])

    def unpack(self, parts, config, variant, shape):
        bits, group, _ = self.spec(config)
        art = unpack_awq_gemm(parts, bits, group)
        art.symmetric = not config.get("zero_point", True)
        return art


def awq_gemm_shapes(out: int, inp: int, bits: int, group: int | None) -> dict[str, tuple[int, int]]:
    """AutoAWQ GEMM: qweight [K, N*bits/32], qzeros [K/G, N*bits/32], scales [K/G, N] (G must divide K; AutoAWQ
    asserts it)."""
    if group is None or inp % group:
        raise CheckpointError(f"AWQ GEMM with group_size={group} on a linear of {inp} inputs: AutoAWQ's layout needs a "
                              "group size dividing the inputs")
    return {"qweight": (inp, stream_words(out, bits)), "qzeros": (inp // group, stream_words(out, bits)),
            "scales": (inp // group, out)}


@register_reader("awq_gemv")
class AWQGemvCheckpoint(AWQGemmCheckpoint):
    """AutoAWQ GEMV: qweight int32 [N, K/8] holding inputs 8c..8c+7 in order (no interleave), qzeros int32 [N, Z]
    holding 8 zeros each and scales fp16 [N, 8Z], Z padded (to a multiple of 4) past the real groups."""

    version = "gemv"

    def layer_shape(self, tensors, name, config, hint):
        N, words = tensors.shape(f"{name}.qweight")
        return N, words * 8

    def expected_shapes(self, out, inp, config, variant):
        bits, group, _ = self.spec(config)
        if bits != 4 or group is None:
            raise CheckpointError(f"AWQ GEMV with bits={bits}, group_size={group}: only 4-bit grouped is defined")
        width = gemv_zeros_width(inp, group)
        return {"qweight": (out, inp // 8), "qzeros": (out, width), "scales": (out, 8 * width)}

    def unpack(self, parts, config, variant, shape):
        bits, group, _ = self.spec(config)
        if bits != 4 or group is None:
            raise CheckpointError(f"AWQ GEMV with bits={bits}, group_size={group}: only 4-bit grouped is defined")
        codes = unpack_bit_stream(parts["qweight"].t(), 4, parts["qweight"].shape[1] * 8).t()
        n_groups = -(-codes.shape[1] // group)
        zeros = unpack_bit_stream(parts["qzeros"].t(), 4, parts["qzeros"].shape[1] * 8).t()[:, :n_groups]
        return QuantizedWeights(codes.to(torch.uint8).contiguous(), parts["scales"].float()[:, :n_groups].contiguous(),
                                zeros.to(torch.uint8).contiguous(), 4, group,
                                symmetric=not config.get("zero_point", True))


def gemv_zeros_width(inp: int, group: int) -> int:
    """int32 words of zeros per output row in AutoAWQ's GEMV layout (its calculate_zeros_width): ceil(groups / 8),
    rounded up to a multiple of 4, 2 or 1 for group sizes 32, 64, >= 128; other group sizes are not defined."""
    multiple = 4 if group == 32 else 2 if group == 64 else 1 if group >= 128 else None
    if multiple is None:
        raise CheckpointError(f"AWQ GEMV with group_size={group}: AutoAWQ defines group sizes 32, 64 and >= 128")
    words = -(-(inp // group) // 8)
    return -(-words // multiple) * multiple


@register_reader("auto_round")
class AutoRoundCheckpoint(GPTQCheckpoint):
    """AutoRound's own format (quant_method "auto-round"): its packing_format says which layout the tensors use,
    auto_round:auto_gptq (GPTQ v1, zero - 1 stored; g_idx may be left out) or auto_round:auto_awq (AWQ GEMM)."""

    quant_methods = ("auto-round", "intel/auto-round")
    LAYOUTS = ("auto_round:auto_gptq", "auto_round:gptq", "auto_round:auto_awq")

    @classmethod
    def accepts(cls, config: dict) -> bool:
        return str(config.get("packing_format", "auto_round:auto_gptq")) in cls.LAYOUTS and \
            str(config.get("data_type", "int")) == "int"

    def refusal(self, config: dict) -> str:
        return (f"AutoRound packing_format={config.get('packing_format')!r}, data_type={config.get('data_type')!r}; "
                f"this reader takes integer weights in {list(self.LAYOUTS)}")

    def is_awq(self, config: dict) -> bool:
        return str(config.get("packing_format", "")).endswith("auto_awq")

    def describe(self, path: Path) -> Description:
        config = self.config(path)
        bits, group, sym = self.spec(config)
        return Description("auto_round", "autoround-awq" if self.is_awq(config) else "autoround", bits, group, sym)

    def layer_shape(self, tensors, name, config, hint):
        if self.is_awq(config):  # qweight [K, N/8]
            return tensors.shape(f"{name}.scales")[-1], tensors.shape(f"{name}.qweight")[0]
        return super().layer_shape(tensors, name, config, hint)

    def expected_shapes(self, out, inp, config, variant):
        if self.is_awq(config):
            return awq_gemm_shapes(out, inp, *self.spec(config)[:2])
        return super().expected_shapes(out, inp, config, variant)

    def unpack(self, parts, config, variant, shape):
        if self.is_awq(config):
            bits, group, sym = self.spec(config)
            art = unpack_awq_gemm(parts, bits, group)
            art.symmetric = sym
            return art
        return super().unpack(parts, config, variant, shape)  # GPTQ v1: no checkpoint_format key, zero - 1 stored


def _model_name(names: StoredNames, stored: str) -> str:
    """Our name of a tensor a checkpoint stores beside its quantized linears: the state-dict name (a renamed router),
    or `<expert matrix>.weight` for an expert stored in full precision, one by one."""
    expert = names.stored_weight(stored)
    return f"{expert}.weight" if expert is not None else names.tensor(stored)


def _checkpoint_format(config: dict) -> str:
    return str(config.get("checkpoint_format", config.get("format", "gptq"))).lower()


def _vocab(path: Path) -> tuple[str, ...] | None:
    """The checkpoint's tokens in id order, when it carries a tokenizer."""
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return tuple(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))


@register_reader("compressed_tensors")
class CompressedTensorsCheckpoint(PackedLinearCheckpoint):
    """compressed-tensors `pack-quantized` (what llm-compressor writes for W4A16): weight_packed int32 [out, in*b/32]
    a dense little-endian bit stream along the input with each signed code stored + 2^(b-1), weight_scale
    [out, groups], weight_zero_point int32 packed the same way along the output (absent when symmetric: zero 0),
    weight_shape [2], weight_g_idx [in] under group act-order. Files of compressed-tensors up to 0.17 pack 32 // b
    whole values per word instead ([out, ceil(in / (32 // b))]); at 3, 5, 6 and 7 bits the widths tell the two
    apart, and a file whose widths fit both (no realistic layer) is refused unless both read the same values."""

    quant_methods = ("compressed-tensors",)
    parts = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
    packed = ("weight_packed", "weight_zero_point")

    @classmethod
    def weights_specs(cls, config: dict) -> list[dict]:
        return [group.get("weights") or {} for group in (config.get("config_groups") or {}).values()]

    @classmethod
    def accepts(cls, config: dict) -> bool:
        specs = cls.weights_specs(config)
        formats = {config.get("format")} | {g.get("format") for g in (config.get("config_groups") or {}).values()}
        return (bool(specs) and formats - {None} == {"pack-quantized"} and all(s == specs[0] for s in specs)
                and specs[0].get("type", "int") == "int" and specs[0].get("strategy") in ("group", "channel"))

    def refusal(self, config: dict) -> str:
        return ("this reader takes format pack-quantized with one integer weights scheme (strategy group or "
                f"channel) for every config group; got format={config.get('format')!r}, weights="
                f"{self.weights_specs(config)}")

    def spec(self, config: dict) -> tuple[int, int | None, bool]:
        weights = self.weights_specs(config)[0]
        group = weights.get("group_size") if weights.get("strategy") == "group" else None
        return int(weights["num_bits"]), None if group in (None, -1) else int(group), bool(weights.get("symmetric"))

    def describe(self, path: Path) -> Description:
        bits, group, sym = self.spec(self.config(path))
        return Description(self.name, "compressed-tensors", bits, group, sym)

    def layer_shape(self, tensors, name, config, hint):
        key = f"{name}.weight_shape"
        if key not in tensors.where or tensors.shape(key) != (2,):
            have = list(tensors.shape(key)) if key in tensors.where else "missing"
            raise CheckpointError(f"{key} is {have}, expected [2] (the linear's out and in features)")
        out, inp = (int(v) for v in tensors.get(key).tolist())
        return out, inp

    def variants(self, config):
        """Up to 0.17 compressed-tensors packed 32 // bits whole values per word (aligned=True), from 0.18 densely:
        different widths (and bytes) at 3, 5, 6 and 7 bits, the same bytes at 2, 4 and 8."""
        return (False,) if 32 % self.spec(config)[0] == 0 else (False, True)

    def describe_variant(self, aligned):
        return ("compressed-tensors' word-aligned packing (32 // bits values per int32, up to version 0.17)" if aligned
                else "compressed-tensors' dense packing (version 0.18 on)")

    def expected_shapes(self, out, inp, config, aligned):
        bits, group, sym = self.spec(config)
        words = aligned_words if aligned else stream_words
        shapes = {"weight_packed": (out, words(inp, bits)), "weight_scale": (out, _groups(inp, group)),
                  "weight_shape": (2,)}
        if not sym:
            shapes["weight_zero_point"] = (words(out, bits), _groups(inp, group))
        return shapes

    def optional_shapes(self, out, inp, config):
        return {"weight_g_idx": (inp,)}

    def check_unambiguous(self, linears, config, fitting):
        """Both packings fit every width: they read the same values only when no packed run of values exceeds one
        word (32 // bits values)."""
        per_word = 32 // self.spec(config)[0]
        longest = max(n for shape in linears.values() for n in shape)
        if longest > per_word:
            super().check_unambiguous(linears, config, fitting)

    def unpack(self, parts, config, aligned, shape):
        return unpack_compressed(parts, *self.spec(config), aligned=aligned)
