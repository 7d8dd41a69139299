"""Do other tools load what `export=...` writes? Each export format of a small model, loaded with transformers'
from_pretrained on the CPU (its GPTQ and AWQ backend is GPTQModel), against the same weights as the harness
evaluates them (method=checkpoint's reading of the same directory): max |logit difference| on random tokens.

    /work/venv-gptq/bin/python scripts/produce/load_exports.py [MODEL_DIR]   (default: the tiny golden Llama)

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

    model_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/golden/checkpoints/tiny-llama"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = torch.randint(3, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(4, 32)
    for fmt in ("gptq", "awq_gemm"):
        arts = {n: as_stored(quantize_weight(lin.weight.data, spec), fmt)
                for n, lin in layout_for(base).quantizable_linears(base).items()}
        with tempfile.TemporaryDirectory() as tmp:
            out = save_quantized(base, arts, Path(tmp) / fmt, fmt, spec, tokenizer)
            ours = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            contents = reader_for(out).read(out, ours)
            apply_artifacts(ours, contents.artifacts)
            try:
                theirs = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
            except Exception as err:  # the point is to report what happens
                print(f"{fmt}: transformers cannot load it on this machine: {type(err).__name__}: {err}")
                continue
            with torch.no_grad():
                a = ours(tokens).logits.float()
                b = theirs(tokens).logits.float()
                for name, art in contents.artifacts.items():  # the weights as an fp16 kernel dequantizes them
                    ours.get_submodule(name).weight.data = art.dequantize(torch.float16).float()
                a16 = ours(tokens).logits.float()
            kind = sorted({type(m).__name__ for m in theirs.modules() if "Linear" in type(m).__name__ and
                           type(m).__name__ != "Linear"})
            print(f"{fmt}: loaded by transformers {__import__('transformers').__version__} with {kind}; max |logit "
                  f"diff| {float((a - b).abs().max()):.3e} (logit scale {float(a.abs().max()):.2f}, its dtype "
                  f"{next(theirs.parameters()).dtype}); with our weights dequantized in fp16 as its kernel does: "
                  f"{float((a16 - b).abs().max()):.3e}")


if __name__ == "__main__":
    main()
