"""Do other tools load what `export=...` writes? Each export format of a small model, loaded with transformers'
from_pretrained on the CPU (its GPTQ and AWQ backend is GPTQModel), against the same weights as the harness
evaluates them (method=checkpoint's reading of the same directory): max |logit difference| on random tokens.

    /work/venv-gptq/bin/python scripts/produce/load_exports.py gptq awq_gemm [--model DIR]
    /work/venv-llmc/bin/python scripts/produce/load_exports.py compressed-tensors
(--model: default the tiny golden Llama; each format asymmetric and symmetric, w4 g32)

Writes nothing but a temporary directory; prints one line per format (or the error that stopped the load).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # gptqmodel.py here shadows the library
sys.path.insert(0, str(ROOT))


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import checkpoints  # noqa: F401
    from checkpoints.base import reader_for
    from core.quant import quantize_weight
    from core.spec import QuantSpec
    from kernels.export import as_stored, save_quantized
    from structure.architectures import apply_artifacts, layout_for

    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("formats", nargs="+", choices=("gptq", "awq_gemm", "compressed-tensors"))
    parser.add_argument("--model", type=Path, default=ROOT / "tests/golden/checkpoints/tiny-llama")
    args = parser.parse_args()
    model_dir = args.model
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = torch.randint(3, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    for fmt, spec in ((f, QuantSpec(4, 32, sym)) for f in args.formats for sym in (False, True)):
        if fmt == "awq_gemm" and spec.symmetric:
            continue  # AutoAWQ's GEMM layout is asymmetric only
        arts = {n: as_stored(quantize_weight(lin.weight.data, spec), fmt)
                for n, lin in layout_for(base).quantizable_linears(base).items()}
        with tempfile.TemporaryDirectory() as tmp:
            out = save_quantized(base, arts, Path(tmp) / fmt, fmt, spec, tokenizer)
            if fmt == "compressed-tensors":
                print(f"{fmt} {spec.tag()}: compressed_tensors' own unpacking vs our artifacts: max |W diff| "
                      f"{library_unpack_diff(out, arts, spec):.3e}")
            ours = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            contents = reader_for(out).read(out, ours)
            apply_artifacts(ours, contents.artifacts)
            try:
                theirs = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
            except Exception as err:  # the point is to report what happens
                print(f"{fmt} {spec.tag()}: transformers cannot load it on this machine: {type(err).__name__}: "
                      f"{str(err)[:300]}")
                continue
            with torch.no_grad():
                a = ours(tokens).logits.float()
                b = theirs(tokens).logits.float()
                for name, art in contents.artifacts.items():  # the weights as an fp16 kernel dequantizes them
                    ours.get_submodule(name).weight.data = art.dequantize(torch.float16).float()
                a16 = ours(tokens).logits.float()
            kind = sorted({type(m).__name__ for m in theirs.modules() if "Linear" in type(m).__name__ and
                           type(m).__name__ != "Linear"})
            print(f"{fmt} {spec.tag()}: loaded by transformers {__import__('transformers').__version__} with {kind}; max |logit "
                  f"diff| {float((a - b).abs().max()):.3e} (logit scale {float(a.abs().max()):.2f}, its dtype "
                  f"{next(theirs.parameters()).dtype}); with our weights dequantized in fp16 as its kernel does: "
                  f"{float((a16 - b).abs().max()):.3e}")


def library_unpack_diff(out: Path, arts: dict, spec) -> float:
    """max |W| difference between compressed-tensors' unpack_from_int32 of the exported tensors, dequantized as its
    decompressor does ((q - zp) * scale), and our artifacts."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    tensors, worst = load_file(str(out / "model.safetensors")), 0.0
    for name, art in arts.items():
        shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
        q = unpack_from_int32(tensors[f"{name}.weight_packed"], spec.bits, shape).float()
        zp = torch.zeros(art.out_features, art.n_groups)
        if not spec.symmetric:
            zp = unpack_from_int32(tensors[f"{name}.weight_zero_point"], spec.bits,
                                   torch.Size([art.out_features, art.n_groups]), packed_dim=0).float()
        g = art.group_index()
        w = (q - zp[:, g]) * tensors[f"{name}.weight_scale"].float()[:, g]
        worst = max(worst, float((w - art.dequantize()).abs().max()))
    return worst


if __name__ == "__main__":
    main()
