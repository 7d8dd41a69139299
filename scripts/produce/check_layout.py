"""Check the layout claims of scripts/produce/README.md on checkpoints the libraries wrote.

For each checkpoint directory, a plain reference unpacker (below; it states the layout in code) dequantizes every
quantized linear from model.safetensors, and the library's own reader does the same; the two must agree exactly
(both in fp16, the way the libraries compute it). What is checked, by quantization_config:

  GPTQ (gptq / gptq_v2): GPTQModel.load(dir, backend=TORCH, dtype=float16) and each TorchLinear's
      dequantize_weight() (after its own v1 -> v2 qzeros conversion), and gptqmodel.utils.model_dequant's
      offline convert_gptq_file (the `dequantize_model` path, which corrects v1 zeros per field).
  AWQ gemm: awq.utils.packing_utils.dequantize_gemm (what WQLinear_GEMM runs on a machine without CUDA kernels).
  AWQ gemv: AutoAWQ has no CPU reader for GEMV; the reference dequantization must equal the library's dequantized
      GEMM sibling (--gemm-sibling DIR, same base model and calibration: the search is deterministic).
  compressed-tensors (pack-quantized): compressed_tensors' model-free CompressedTensorsDequantizer(dir).process(...)
      (PackedQuantizationCompressor.decompress per module), in the scales' dtype.
  auto-round (packing_format auto_round:auto_gptq / auto_round:auto_awq): auto-round's own CPU inference backend,
      i.e. transformers' AutoRound loader (auto_round.inference.convert_model) on device_map="cpu", dtype float16,
      each QuantLinear applied to an identity matrix (x @ W^T with x = I is W^T, exact). auto_awq packing has no
      CPU inference backend without gptqmodel / auto-round-lib (the loader falls back to its "fake" module, which
      leaves the weights uninitialised): there, auto-round's own packing class for it,
      auto_round.export.export_to_awq.utils.WQLinear_GEMM (pure torch forward), and, in the AutoAWQ venv,
      AutoAWQ's dequantize_gemm as the library of the declared layout (compared, no file written from there).

--write-reference: for each directory whose library check ran, write DIR/library_dequantized.safetensors (temp file +
rename): one tensor per quantized linear, named like the base model's weight (`<module>.weight`, [out, in]), holding
the LIBRARY's dequantized weight in the dtype the library computes it, with metadata {"library": "<name> <version>",
"how": <the call>, "source_sha256": <sha256 of DIR/model.safetensors, or of the shards its index names>}.
Directories where no library reader ran in this venv (or none exists, e.g. AWQ GEMV) get no file; the output says
why.

Run with the venv of the library the checkpoints need (checks needing the other library are reported as skipped):
    /work/venv-gptq/bin/python scripts/produce/check_layout.py tests/golden/checkpoints/gptqmodel-*
    /work/venv-awq/bin/python scripts/produce/check_layout.py tests/golden/checkpoints/autoawq-gemm-w4g32 \
        tests/golden/checkpoints/autoawq-gemv-w4g32 --gemm-sibling tests/golden/checkpoints/autoawq-gemm-w4g32
    /work/venv-llmc/bin/python scripts/produce/check_layout.py tests/golden/checkpoints/llmc-* \
        tests/golden/checkpoints/autoround-w4g32-llmc
    /work/venv-autoround/bin/python scripts/produce/check_layout.py tests/golden/checkpoints/autoround-w4g32 \
        tests/golden/checkpoints/autoround-w4g32-asym
Exit status 1 when any check fails.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import struct
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save

# scripts/produce/gptqmodel.py shadows the library: keep this directory off sys.path
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AWQ GEMM word holds column 8c + AWQ_ORDER[i]


# ------------------------------------------------------------------------------------------ reference unpackers
def unpack_bits(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unpack int32 words along `dim` into 32/bits codes each, lowest bits first (code j of a word = bits
    [bits*j, bits*j + bits)). 3-bit: every 3 consecutive words along `dim` are one little-endian 96-bit stream
    holding 32 codes (code j = stream bits [3j, 3j+3); codes 10 and 21 straddle two words)."""
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    if bits == 3:
        g = w.reshape(*w.shape[:-1], -1, 3)
        stream = g[..., 0] | (g[..., 1] << 32)  # low 64 bits; the third word handled separately
        lo = torch.stack([(stream >> (3 * j)) & 7 for j in range(21)], -1)  # codes 0..20 use bits 0..62
        c21 = ((g[..., 1] >> 31) & 1) | ((g[..., 2] & 3) << 1)
        hi = torch.stack([(g[..., 2] >> (3 * j - 64)) & 7 for j in range(22, 32)], -1)
        out = torch.cat([lo, c21[..., None], hi], -1).reshape(*w.shape[:-1], -1)
    else:
        per = 32 // bits
        out = torch.stack([(w >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], -1)
        out = out.reshape(*w.shape[:-1], -1)
    return out.movedim(-1, dim)


def gptq_reference(t: dict, prefix: str, bits: int, v1: bool, group: int | None = None) -> tuple[torch.Tensor, dict]:
    """-> W [out, in] fp16, computed as GPTQ kernels do: scales[g_idx] * (code - zero), in fp16. Without a g_idx
    tensor (AutoRound's auto_round:auto_gptq packing) input k is in group k // group."""
    qweight, qzeros, scales = (t[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales"))
    codes = unpack_bits(qweight, bits, 0)  # [in, out]: 32/bits consecutive input rows per word (3-bit: 32 per 3)
    stored = unpack_bits(qzeros, bits, 1)[:, : scales.shape[1]]  # [groups, out]
    zeros = (stored + 1) & ((1 << bits) - 1) if v1 else stored  # v1 stores zero - 1 per field
    g_idx = t.get(f"{prefix}.g_idx")
    g = g_idx.long() if g_idx is not None else torch.arange(codes.shape[0]) // group
    W = scales[g] * (codes - zeros[g]).to(torch.float16)  # [in, out]
    facts = {"stored_zero_fields_equal_to_max": int((stored == (1 << bits) - 1).sum()) if v1 else None}
    return W.t().contiguous(), facts


def awq_gemm_reference(t: dict, prefix: str, group: int) -> torch.Tensor:
    """-> W [out, in] fp16. qweight [in, out/8], qzeros [in/G, out/8]: nibble i of word c is column 8c+AWQ_ORDER[i]."""
    def cols(words):
        nib = unpack_bits(words, 4, 1).reshape(words.shape[0], -1, 8)  # [..., word, nibble]
        out = torch.empty_like(nib)
        out[..., AWQ_ORDER] = nib
        return out.reshape(words.shape[0], -1)
    qweight, qzeros, scales = (t[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales"))
    codes, zeros = cols(qweight), cols(qzeros)
    rows = torch.arange(codes.shape[0]) // group
    W = (codes - zeros[rows]).to(torch.float16) * scales[rows]
    return W.t().contiguous()


def awq_gemv_reference(t: dict, prefix: str, group: int) -> torch.Tensor:
    """-> W [out, in] fp16. qweight [out, in/8] (nibble i of word c = input 8c+i, natural order), qzeros [out, Wz]
    (nibble i of word c = group 8c+i; padded with 0), scales [out, 8*Wz] (groups beyond in/G padded with 0)."""
    qweight, qzeros, scales = (t[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales"))
    codes = unpack_bits(qweight, 4, 1)  # [out, in]
    n_groups = codes.shape[1] // group
    zeros = unpack_bits(qzeros, 4, 1)[:, :n_groups]
    cols = torch.arange(codes.shape[1]) // group
    return (codes - zeros[:, cols]).to(torch.float16) * scales[:, :n_groups][:, cols]


def ct_reference(t: dict, prefix: str, wargs: dict) -> torch.Tensor:
    """compressed-tensors pack-quantized -> W [out, in] in the scales' dtype. weight_packed int32 [out, in*bits/32]
    packed along the input dim, lowest bits first (code j of word c = input 32/bits*c + j), each code stored as
    the signed value + 2^(bits-1); weight_shape int64 = (out, in); weight_scale [out, in/group] (per channel:
    [out, 1]); asymmetric: weight_zero_point int32 [out*bits/32, in/group], packed along the OUTPUT dim the same way
    (signed + 2^(bits-1)). W = (code - zero) * scale, with input k in group k // group_size."""
    bits = wargs["num_bits"]
    off = 1 << (bits - 1)
    n, k = t[f"{prefix}.weight_shape"].tolist()
    scale = t[f"{prefix}.weight_scale"]
    codes = unpack_bits(t[f"{prefix}.weight_packed"], bits, 1)[:, :k] - off  # [out, in], signed
    if wargs.get("symmetric", True):
        zero = torch.zeros_like(scale, dtype=torch.int64)
    else:
        zero = unpack_bits(t[f"{prefix}.weight_zero_point"], bits, 0)[:n] - off  # [out, groups], signed
    group = wargs.get("group_size") or k
    cols = torch.arange(k) // group if scale.shape[1] > 1 else torch.zeros(k, dtype=torch.long)
    return ((codes - zero[:, cols]).to(scale.dtype) * scale[:, cols]).contiguous()


# ------------------------------------------------------------------------------------------------- checks
def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def quant_prefixes(t: dict, suffix: str = ".qweight") -> list[str]:
    return sorted(k[: -len(suffix)] for k in t if k.endswith(suffix))


def version_of(dist: str) -> str:
    return f"{dist} {importlib.metadata.version(dist)}"


def compare(lib: dict, ref: dict) -> tuple[bool, str]:
    """Exact equality of the library's and the reference's dequantized weights, or how far apart they are."""
    if set(lib) != set(ref):
        return False, f"layers differ: library {sorted(set(lib) - set(ref))}, reference {sorted(set(ref) - set(lib))}"
    bad = [p for p in ref if lib[p].shape != ref[p].shape or lib[p].dtype != ref[p].dtype
           or not torch.equal(lib[p], ref[p])]
    if not bad:
        return True, f"{len(ref)} layers, {next(iter(ref.values())).dtype}"
    worst = max((lib[p].float() - ref[p].float()).abs().max().item() for p in bad
                if lib[p].shape == ref[p].shape)
    return False, (f"{len(bad)}/{len(ref)} layers differ (dtype library {next(iter(lib.values())).dtype}, "
                   f"reference {next(iter(ref.values())).dtype}); max |diff| {worst:.3g}")


# A library result: ({linear prefix: W [out, in]}, library name and version, how it was computed)
Lib = tuple[dict, str, str]


def safetensors_bytes(tensors: dict, meta: dict) -> bytes:
    """safetensors.torch.save, with the header's __metadata__ keys in sorted order: safetensors writes metadata from a
    hash map, in a different order on every run, so the same tensors would give different bytes each time."""
    raw = save(tensors, metadata=meta)
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # the format pads the header with spaces to a multiple of 8 bytes
    return struct.pack("<Q", len(h)) + h + raw[8 + n:]


def source_sha256(d: Path) -> str:
    """sha256 of the checkpoint's weights: d/model.safetensors, or, where the library wrote shards and no single file
    (HQQ's save_to_safetensors on a model of more than 5 blocks), the bytes of the shards that
    d/model.safetensors.index.json names, one after another in sorted order."""
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.is_file() or not index.is_file():
        return hashlib.sha256(single.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for shard in sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())):
        digest.update((d / shard).read_bytes())
    return digest.hexdigest()


def write_reference(d: Path, lib: Lib) -> Path:
    """Write d/library_dequantized.safetensors atomically (temp file in d, then rename)."""
    weights, library, how = lib
    tensors = {f"{p}.weight": w.detach().contiguous() for p, w in sorted(weights.items())}
    meta = {"library": library, "how": how, "source_sha256": source_sha256(d)}
    out = d / "library_dequantized.safetensors"
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".library_dequantized.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(safetensors_bytes(tensors, meta))
            f.flush()
            os.fsync(f.fileno())
        back = load_file(tmp)  # read it back before it replaces anything
        assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors), tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def check_gptq(d: Path, qc: dict, t: dict) -> tuple[list[tuple[str, bool, str]], Lib | None]:
    bits = qc["bits"]
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    v1 = fmt == "gptq"
    ref, facts = {}, {}
    for p in quant_prefixes(t):
        ref[p], f = gptq_reference(t, p, bits, v1)
        facts[p] = f
    results = []
    n_max = sum(f["stored_zero_fields_equal_to_max"] or 0 for f in facts.values())
    results.append(("info: v1 qzeros fields storing -1 (a zero of 0: word-level and per-field readers disagree)", True,
                    f"{n_max}" if v1 else "n/a (v2)"))
    g_trivial = all(torch.equal(t[f"{p}.g_idx"].long(), torch.arange(t[f"{p}.g_idx"].numel()) // qc["group_size"])
                    for p in ref) if qc["group_size"] > 0 else None
    results.append(("info: g_idx == arange(in) // group_size in every layer", True, str(g_trivial)))
    if not has("gptqmodel"):
        return results + [("GPTQModel reader", True, "skipped: gptqmodel not importable in this venv")], None
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.utils.model_dequant import convert_gptq_file

    model = GPTQModel.load(str(d), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    mods = {n: m for n, m in model.model.named_modules() if hasattr(m, "qweight")}
    with torch.no_grad():
        lib_w = {n: m.dequantize_weight().t().contiguous() for n, m in mods.items()}
    ok, detail = compare(lib_w, ref)
    kinds = sorted({f"{type(m).__name__}(qzero_format={m.qzero_format()})" for m in mods.values()})
    results.append((f"GPTQModel.load + dequantize_weight() == reference (exact fp16), {len(ref)} layers", ok,
                    f"{detail}; " + ", ".join(kinds)))
    lib = (lib_w, version_of("GPTQModel"),
           "gptqmodel.GPTQModel.load(dir, device='cpu', backend=BACKEND.TORCH, dtype=torch.float16); for each "
           "quantized module m (" + ", ".join(sorted({type(m).__name__ for m in mods.values()})) + "; v1 qzeros "
           "converted to v2 by GPTQModel's own loader): m.dequantize_weight().t()")
    off = convert_gptq_file(d / "model.safetensors", torch.float32, qc, "cpu")
    worst = max((off[f"{p}.weight"] - ref[p].float()).abs().max().item() for p in ref)
    # the offline path computes in fp32 from fp16 scales: equal to the fp16 reference up to fp16 rounding
    scale = max(ref[p].float().abs().max().item() for p in ref)
    results.append(("gptqmodel model_dequant.convert_gptq_file (fp32) vs reference: max |diff| / max |W|",
                    worst <= 1e-3 * scale, f"{worst / scale:.2e}"))
    return results, lib


def check_awq(d: Path, qc: dict, t: dict, gemm_sibling: Path | None) -> tuple[list[tuple[str, bool, str]], Lib | None]:
    group, version = qc.get("group_size", qc.get("q_group_size")), qc["version"].lower()
    results, lib = [], None
    if version == "gemm":
        ref = {p: awq_gemm_reference(t, p, group) for p in quant_prefixes(t)}
        if has("gptqmodel"):  # informational: GPTQModel 7.6's offline dequantize_model path for AWQ checkpoints
            from gptqmodel.utils.model_dequant import convert_awq_file

            off = convert_awq_file(d / "model.safetensors", torch.float32, "cpu")
            agree = sum(torch.allclose(off[f"{p}.weight"], ref[p].float(), rtol=1e-3, atol=1e-4) for p in ref)
            results.append(("info: gptqmodel model_dequant.convert_awq_file agrees with the reference in", True,
                            f"{agree}/{len(ref)} layers (it unpacks in natural nibble order, no AWQ reorder)"))
        if not has("awq"):
            return results + [("AutoAWQ reader", True, "skipped: awq not importable in this venv")], None
        lib = awq_gemm_library(t, list(ref), qc["bits"] if "bits" in qc else qc["w_bit"], group)
        ok, detail = compare(lib[0], ref)
        results.append((f"awq dequantize_gemm == reference (exact fp16), {len(ref)} layers", ok, detail))
    elif version == "gemv":
        ref = {p: awq_gemv_reference(t, p, group) for p in quant_prefixes(t)}
        pad_ok = all((t[f"{p}.scales"][:, ref[p].shape[1] // group:] == 0).all() for p in ref)
        results.append(("gemv scales padding columns are 0", bool(pad_ok), ""))
        if gemm_sibling is None:
            results.append(("gemv vs gemm sibling", True, "skipped: no --gemm-sibling"))
        elif not has("awq"):
            results.append(("gemv vs gemm sibling", True, "skipped: awq not importable in this venv"))
        else:
            from awq.utils.packing_utils import dequantize_gemm

            s = load_file(str(gemm_sibling / "model.safetensors"))
            ok = all(torch.equal(dequantize_gemm(s[f"{p}.qweight"], s[f"{p}.qzeros"], s[f"{p}.scales"], 4,
                                                 group).t(), ref[p]) for p in ref)
            results.append((f"gemv reference == awq dequantize_gemm of {gemm_sibling.name} (exact), "
                            f"{len(ref)} layers", ok, ""))
        if has("awq"):  # AutoAWQ's only GEMV reader is the CUDA extension: show what its forward says on CPU
            from awq.modules.linear.gemv import WQLinear_GEMV

            p0 = next(iter(ref))
            m = WQLinear_GEMV(4, group, ref[p0].shape[1], ref[p0].shape[0], False, "cpu")
            for k in ("qweight", "qzeros", "scales"):
                getattr(m, k).copy_(t[f"{p0}.{k}"])
            try:
                m(torch.eye(ref[p0].shape[1], dtype=torch.float16))
                err = "no error (a GEMV reader exists here: add it)"
            except Exception as e:  # noqa: BLE001 - reported
                err = f"{type(e).__name__}: {e}"
            results.append(("info: AutoAWQ WQLinear_GEMV.forward on CPU (no library dequantization for GEMV)",
                            True, err.strip().replace("\n", " ")))
    else:
        results.append((f"AWQ version {version}", False, "unknown"))
    return results, lib


def awq_gemm_library(t: dict, prefixes: list[str], bits: int, group: int) -> Lib:
    from awq.utils.packing_utils import dequantize_gemm

    w = {p: dequantize_gemm(t[f"{p}.qweight"], t[f"{p}.qzeros"], t[f"{p}.scales"], bits, group).t().contiguous()
         for p in prefixes}
    return w, version_of("autoawq"), (f"awq.utils.packing_utils.dequantize_gemm(qweight, qzeros, scales, bits={bits}, "
                                      f"group_size={group}).t()")


def check_ct(d: Path, qc: dict, t: dict) -> tuple[list[tuple[str, bool, str]], Lib | None]:
    """compressed-tensors pack-quantized (llm-compressor, AutoRound's llm_compressor export)."""
    results = []
    groups = qc.get("config_groups", {})
    fmt = {g.get("format", qc.get("format")) for g in groups.values()}
    if fmt != {"pack-quantized"} or len(groups) != 1:
        return [(f"compressed-tensors format {sorted(map(str, fmt))} / {len(groups)} config groups", False,
                 "only one pack-quantized group is handled")], None
    wargs = next(iter(groups.values()))["weights"]
    ref = {p: ct_reference(t, p, wargs) for p in quant_prefixes(t, ".weight_packed")}
    dtypes = sorted({str(w.dtype) for w in ref.values()})
    results.append(("info: weights", True, f"{wargs['num_bits']}-bit strategy={wargs['strategy']} "
                    f"group_size={wargs['group_size']} symmetric={wargs['symmetric']} "
                    f"actorder={wargs.get('actorder')}; scales {', '.join(dtypes)}"))
    if not has("compressed_tensors"):
        return results + [("compressed-tensors reader", True, "skipped: compressed_tensors not importable")], None
    if len(dtypes) != 1:
        return results + [("compressed-tensors reader", False, f"mixed scale dtypes {dtypes}")], None
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    dtype = next(iter(ref.values())).dtype
    # the dequantizer casts its output to `dtype`; with the scales' dtype that is no cast at all
    out = CompressedTensorsDequantizer(str(d), dtype=dtype).process(dict(t))
    lib_w = {p: out[f"{p}.weight"].contiguous() for p in ref}
    residual = sorted(k for k in out if k.rpartition(".")[2] in ("weight_packed", "weight_zero_point",
                                                                  "weight_shape", "weight_scale"))
    ok, detail = compare(lib_w, ref)
    results.append((f"compressed_tensors CompressedTensorsDequantizer == reference (exact), {len(ref)} layers",
                    ok and not residual, detail + (f"; left compressed: {residual}" if residual else "")))
    how = (f"compressed_tensors.entrypoints.convert.converters.ct_dequantizer.CompressedTensorsDequantizer(dir, "
           f"dtype={dtype}).process(state dict of model.safetensors)['<module>.weight'] (per module "
           f"PackedQuantizationCompressor.decompress; {dtype} is the scales' dtype, so no cast)")
    return results, (lib_w, version_of("compressed-tensors"), how)


def check_autoround(d: Path, qc: dict, t: dict) -> tuple[list[tuple[str, bool, str]], Lib | None]:
    """AutoRound's native format: GPTQ v1 style packing (auto_round:auto_gptq) or AutoAWQ GEMM (auto_round:auto_awq)."""
    packing, bits, group = qc.get("packing_format", "auto_round:auto_gptq"), qc["bits"], qc["group_size"]
    prefixes = quant_prefixes(t)
    if packing == "auto_round:auto_gptq":
        ref = {p: gptq_reference(t, p, bits, v1=True, group=group)[0] for p in prefixes}
    elif packing == "auto_round:auto_awq":
        ref = {p: awq_gemm_reference(t, p, group) for p in prefixes}
    else:
        return [(f"auto-round packing_format {packing}", False, "unknown")], None
    results, lib = [("info: packing", True, f"{packing}, {bits}-bit group {group} sym={qc.get('sym')}")], None
    if has("auto_round"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(d), device_map="cpu", dtype=torch.float16)
        backends = list(getattr(getattr(model, "hf_quantizer", None), "used_backends", None) or [])
        mods = {n: m for n, m in model.named_modules() if n in ref}
        kinds = sorted({f"{type(m).__module__}.{type(m).__name__}" for m in mods.values()})
        real = set(mods) == set(ref) and all(hasattr(m, "qweight") for m in mods.values())
        if real:
            with torch.no_grad():  # x @ W^T with x = I is W^T: the module's own dequantized weight, exactly
                lib_w = {p: m(torch.eye(m.infeatures, dtype=m.scales.dtype)).t().contiguous() for p, m in mods.items()}
            ok, detail = compare(lib_w, ref)
            results.append((f"auto-round CPU backend {backends} == reference (exact), {len(ref)} layers", ok,
                            f"{detail}; {', '.join(kinds)}"))
            lib = (lib_w, version_of("auto-round"),
                   f"transformers AutoModelForCausalLM.from_pretrained(dir, device_map='cpu', dtype=torch.float16) "
                   f"(AutoRound loader, backend {', '.join(backends)}: {', '.join(kinds)}); W = m(eye(in_features, "
                   f"float16)).t() for each module m")
        else:
            try:
                name0 = next(iter(mods))
                with torch.no_grad():
                    mods[name0](torch.zeros(1, ref[name0].shape[1], dtype=torch.float16))
                fwd = "its forward runs"
            except Exception as e:  # noqa: BLE001 - reported
                fwd = f"its forward raises {type(e).__name__}: {e}"
            no_backend = (f"auto-round's loader has no CPU backend for {packing} here (gptqmodel:awq_torch needs "
                          f"gptqmodel, auto_round_kernel_awq needs auto-round-lib): it selected {backends} "
                          f"({', '.join(kinds)}), which does not read qweight/qzeros/scales and leaves the weights "
                          f"uninitialised (torch.empty), and {fwd}")
            results.append(("auto-round CPU inference backend", True, no_backend + "; not used"))
            if packing == "auto_round:auto_awq":
                # the QuantLinear auto-round packs auto_round:auto_awq with (export_to_autoround picks it for "awq");
                # its forward is pure torch: auto-round's copy of AutoAWQ's dequantize_gemm, then x @ W^T
                from auto_round.export.export_to_awq.utils import WQLinear_GEMM

                lib_w = {}
                for p in prefixes:
                    m = WQLinear_GEMM(bits, group, ref[p].shape[1], ref[p].shape[0], False, "cpu")
                    for k in ("qweight", "qzeros", "scales"):
                        setattr(m, k, t[f"{p}.{k}"].clone())
                    with torch.no_grad():
                        lib_w[p] = m(torch.eye(m.in_features, dtype=torch.float16)).t().contiguous()
                ok, detail = compare(lib_w, ref)
                results.append((f"auto-round WQLinear_GEMM (its auto_awq packing class) == reference (exact), "
                                f"{len(ref)} layers", ok, detail))
                lib = (lib_w, version_of("auto-round"),
                       f"auto_round.export.export_to_awq.utils.WQLinear_GEMM(bits={bits}, group_size={group}) with the "
                       f"checkpoint's qweight/qzeros/scales (the class auto-round packs {packing} with; its forward "
                       f"runs auto-round's dequantize_gemm); W = m(eye(in_features, float16)).t(). Not an inference "
                       f"backend: " + no_backend)
    if lib is None and packing == "auto_round:auto_awq" and has("awq"):
        # the library of the declared layout, as a cross-check; the file (if any) comes from auto-round's own class
        aw = awq_gemm_library(t, prefixes, bits, group)[0]
        ok, detail = compare(aw, ref)
        results.append((f"AutoAWQ dequantize_gemm (layout declared by {packing}) == reference (exact fp16), "
                        f"{len(ref)} layers", ok, detail))
        f = d / "library_dequantized.safetensors"
        if f.exists():
            ok, detail = compare(aw, {k[: -len(".weight")]: v for k, v in load_file(str(f)).items()})
            results.append((f"AutoAWQ dequantize_gemm == {f.name} (exact)", ok, detail))
        results.append(("library reader", True, f"no file from this venv: {packing} files come from auto-round's "
                        f"own class (run with /work/venv-autoround)"))
    elif lib is None:
        results.append(("library reader", True, f"skipped: no library reader for {packing} in this venv"))
    return results, lib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--gemm-sibling", type=Path, default=None,
                   help="an AutoAWQ gemm checkpoint of the same model and calibration, for checking gemv ones")
    p.add_argument("--write-reference", action="store_true",
                   help="write DIR/library_dequantized.safetensors: the library's own dequantized weights")
    args = p.parse_args()
    failed = False
    for d in args.dirs:
        qc = json.loads((d / "config.json").read_text())["quantization_config"]
        t = load_file(str(d / "model.safetensors"))
        method = qc.get("quant_method")
        results, lib = (check_gptq(d, qc, t) if method == "gptq" else
                        check_awq(d, qc, t, args.gemm_sibling) if method == "awq" else
                        check_ct(d, qc, t) if method == "compressed-tensors" else
                        check_autoround(d, qc, t) if method in ("auto-round", "autoround", "intel/auto-round") else
                        ([(f"quant_method {method}", False, "unknown")], None))
        print(f"== {d}")
        for name, ok, detail in results:
            print(f"  [{'ok' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}")
            failed |= not ok
        if args.write_reference:
            if lib is None:
                print("  [no file] no library dequantization ran for this checkpoint in this venv")
            else:
                out = write_reference(d, lib)
                print(f"  [wrote] {out} ({lib[1]}; {len(lib[0])} tensors, "
                      f"{sorted({str(w.dtype) for w in lib[0].values()})})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
