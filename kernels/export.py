"""Save quantized models as GPTQ, AutoAWQ-GEMM or compressed-tensors (`pack-quantized`) checkpoints.

A checkpoint directory holds `model.safetensors` (per quantized matrix its packed tensors: GPTQ's `<name>.qweight`,
`.qzeros`, `.scales`, `.g_idx`; AWQ's first three; compressed-tensors' `.weight_packed`, `.weight_scale`,
`.weight_shape` and, as needed, `.weight_zero_point` and `.weight_g_idx`; every other tensor of the model as it
is), `config.json` with a `quantization_config` that transformers understands, and the tokenizer when one is given.
Packing is `kernels.pack`'s job; this module only names tensors and writes files (reading any of them back, ours or
another tool's, is `checkpoints/`'s). It knows no model family: a caller that stores matrices under other names
(a mixture's experts, one by one, as other tools load them) passes the names (checkpoints.stored.export_names).
Writes are atomic: everything goes to a temporary sibling directory that is renamed into place at the end.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from kernels.pack import GPTQ_BITS, pack_awq_gemm, pack_compressed, pack_gptq
from core.spec import QuantizedWeights, QuantSpec

Format = Literal["gptq", "awq_gemm", "compressed-tensors"]
FORMATS = ("gptq", "awq_gemm", "compressed-tensors")
WEIGHTS_FILE = "model.safetensors"


def as_stored(art: QuantizedWeights, fmt: Format) -> QuantizedWeights:
    """The artifact as a `fmt` checkpoint stores it: scales rounded to fp16 (codes, zeros and g_idx are exact)."""
    if fmt not in FORMATS:
        raise ValueError(f"export format fmt={fmt!r}; allowed values: {list(FORMATS)}")
    return QuantizedWeights(art.codes, art.scales.to(torch.float16).float(), art.zeros, art.bits, art.group_size,
                            art.symmetric, art.g_idx)


def refusal(fmt: Format, spec: QuantSpec, shapes: dict[str, tuple[int, int]] | None = None,
            act_order: bool = False) -> str | None:
    """Why a `fmt` checkpoint cannot hold weights of `spec` (None: it can), from what is known before quantizing:
    the spec, the quantized linears' {name: (out, in)} when given, and whether the method records act-order g_idx.
    These are the conditions the packers check (kernels.pack), asked before the run spends its time."""
    if fmt not in FORMATS:
        return f"export format {fmt!r} is unknown; allowed values: {list(FORMATS)}"
    if fmt == "gptq" and spec.bits not in GPTQ_BITS:
        return f"gptq stores bits {list(GPTQ_BITS)}, not {spec.bits} (use export=compressed-tensors)"
    if fmt != "awq_gemm":
        return None
    if spec.bits != 4 or spec.symmetric or spec.group_size is None:
        return f"awq_gemm stores 4-bit asymmetric grouped weights only, not {spec.tag()} (use export=gptq)"
    if act_order:
        return "awq_gemm stores contiguous groups only, not act-order g_idx (use export=gptq or compressed-tensors)"
    shapes = shapes or {}
    uneven = {name: inp for name, (_, inp) in shapes.items() if inp % spec.group_size}
    if uneven:
        name, inp = next(iter(uneven.items()))
        divisor = math.gcd(*(inp for _, inp in shapes.values()))
        fits = [g for g in (256, 128, 64, 32, 16) if divisor % g == 0]
        return (f"awq_gemm needs group_size to divide every quantized layer's input features (AutoAWQ's layout); "
                f"group_size={spec.group_size} does not divide {len(uneven)} of them (e.g. {name}: {inp}); allowed "
                f"values here: group_size in {fits} (or export=gptq / compressed-tensors, which take a shorter last "
                "group)")
    narrow = {name: out for name, (out, _) in shapes.items() if out % 8}
    if narrow:
        name, out = next(iter(narrow.items()))
        return f"awq_gemm needs every quantized layer's output features to be a multiple of 8 ({name}: {out})"
    return None


def quantization_config(fmt: Format, spec: QuantSpec, desc_act: bool, extra: dict[str, Any] | None = None,
                        unquantized: Iterable[str] = ()) -> dict:
    """The `quantization_config` dict of config.json for `fmt` (transformers' GPTQConfig / AwqConfig keys).
    unquantized: linears left in full precision besides lm_head (a mixture's routers), by the names the checkpoint
    stores them under: compressed-tensors lists them in `ignore`, as llm-compressor does."""
    if fmt == "gptq":
        qc = {"quant_method": "gptq", "bits": spec.bits,
              "group_size": -1 if spec.group_size is None else spec.group_size,  # the checkpoint convention for per-channel
              "desc_act": desc_act, "sym": spec.symmetric, "checkpoint_format": "gptq", "format": "gptq",
              "act_group_aware": False}
    elif fmt == "awq_gemm":
        qc = {"quant_method": "awq", "version": "gemm", "bits": spec.bits, "group_size": spec.group_size,
              "q_group_size": spec.group_size, "zero_point": not spec.symmetric}
    elif fmt == "compressed-tensors":  # the keys llm-compressor writes for W4A16 / W4A16_ASYM
        weights = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric,
                   "strategy": "channel" if spec.group_size is None else "group", "group_size": spec.group_size,
                   "actorder": "group" if desc_act else None, "dynamic": False, "block_structure": None,
                   "observer": None, "observer_kwargs": {}}
        qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
              "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "weights": weights,
                                            "input_activations": None, "output_activations": None}},
              "ignore": [*sorted(unquantized), "lm_head"], "kv_cache_scheme": None}
    else:
        raise ValueError(f"export format fmt={fmt!r}; allowed values: {list(FORMATS)}")
    return {**qc, **(extra or {})}


def _check_artifacts(fmt: Format, artifacts: dict[str, QuantizedWeights], spec: QuantSpec, model: nn.Module,
                     matrices: Mapping[str, Any] | None = None) -> bool:
    """Validate artifacts against spec and the model's matrices (default: its nn.Linear submodules); returns whether
    any carries an act-order g_idx."""
    if fmt not in FORMATS:
        raise ValueError(f"export format fmt={fmt!r}; allowed values: {list(FORMATS)}")
    if not artifacts:
        raise ValueError("save_quantized: no artifacts to save (method=fp quantizes nothing)")
    if fmt == "awq_gemm" and spec.symmetric:
        raise ValueError("save_quantized: fmt='awq_gemm' stores asymmetric weights only (zero_point=True); "
                         "spec.symmetric=True needs fmt='gptq'")
    for name, art in artifacts.items():
        if matrices is not None:
            lin = matrices.get(name)
            shape = None if lin is None else (lin.out_features, lin.in_features)
        else:
            lin = model.get_submodule(name)
            shape = tuple(lin.weight.shape) if isinstance(lin, nn.Linear) else None
        if shape != tuple(art.codes.shape):
            raise ValueError(f"save_quantized: artifact {name} {tuple(art.codes.shape)} does not match the model's "
                             f"module there ({type(lin).__name__})")
        if (art.bits, art.group_size, art.symmetric) != (spec.bits, spec.group_size, spec.symmetric):
            raise ValueError(f"save_quantized: artifact {name} is w{art.bits} g{art.group_size} sym={art.symmetric}, "
                             f"spec is {spec}: one checkpoint holds one spec")
    return any(art.g_idx is not None for art in artifacts.values())


def _plain_tensors(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """The model's state dict minus `skip`, with tied (storage-sharing) tensors stored once, as save_pretrained does."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, t in model.state_dict().items():
        if name in skip:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().cpu().contiguous().clone()
    return out


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished tmp dir to out_dir; an existing out_dir is swapped out first, then deleted."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old)


@torch.no_grad()
def save_quantized(model: nn.Module, artifacts: dict[str, QuantizedWeights], out_dir: str | Path, fmt: Format,
                   spec: QuantSpec, tokenizer=None, *, scale_dtype: torch.dtype = torch.float16,
                   extra_config: dict[str, Any] | None = None, overwrite: bool = False,
                   matrices: Mapping[str, Any] | None = None, replaced: Iterable[str] = (),
                   stored_as: Mapping[str, str] | None = None, unquantized: Iterable[str] = ()) -> Path:
    """Write a GPTQ, AWQ-GEMM or compressed-tensors checkpoint of `model` with `artifacts` {matrix name: artifact}.

    scale_dtype: fp16 is what checkpoints and kernels expect; float32 keeps scales bit-exact (GPTQ and
    compressed-tensors; AWQ GEMM scales are always fp16). extra_config: more keys for quantization_config.
    For matrices that are not nn.Linear submodules (a mixture's experts, slices of fused parameters), the caller
    says what they are: `matrices` {name: anything with out_features and in_features} of every artifact,
    `replaced` the state-dict names the artifacts replace besides `<name>.weight` (the fused parameters), and
    `stored_as` {our matrix or state-dict name: the name the checkpoint stores it under} (other tools' per-expert
    names); names not in it are stored as they are. `unquantized`: linears kept in full precision besides lm_head
    (routers), by their stored module names, for compressed-tensors' `ignore`.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"save_quantized: {out_dir} exists; pass overwrite=True to replace it")
    desc_act = _check_artifacts(fmt, artifacts, spec, model, matrices)
    stored_as = stored_as or {}
    plain = _plain_tensors(model, skip={f"{name}.weight" for name in artifacts} | set(replaced))
    tensors = {stored_as.get(name, name): tensor for name, tensor in plain.items()}
    for name, art in artifacts.items():
        art = art.to("cpu")
        if fmt == "gptq":
            packed = pack_gptq(art, scale_dtype=scale_dtype)
        elif fmt == "awq_gemm":
            packed = pack_awq_gemm(art)
        else:
            packed = pack_compressed(art, scale_dtype=scale_dtype)
        tensors.update({f"{stored_as.get(name, name)}.{key}": tensor.contiguous() for key, tensor in packed.items()})

    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(fmt, spec, desc_act, extra_config, unquantized)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "quant_format": fmt})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
