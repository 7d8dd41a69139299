"""Quantize a base model directory with llm-compressor's oneshot and save it as compressed-tensors (pack-quantized).

Runs in the llm-compressor reference venv (scripts/setup_llmcompressor_reference.sh), on CPU, offline:

    /work/venv-llmc/bin/python scripts/produce/llmcompressor.py BASE_DIR OUT_DIR --modifier gptq|awq
        [--sym | --no-sym] [--group-size 128] [--bits 4]
        [--calib-tokens FILE.pt | --n-samples 128 --seqlen 512 --seed 0]

--modifier gptq: GPTQModifier (library defaults: block 128, dampening 0.01, actorder static = "weight", i.e. no
g_idx saved; --actorder group saves weight_g_idx). --modifier awq: AWQModifier (llmcompressor.modifiers.transform)
followed by QuantizationModifier, the pair the deprecated AWQModifier shim builds. Either way the scheme is W4A16
(symmetric) or W4A16_ASYM with the group size overridden, targets Linear, lm_head ignored.

Calibration is either --calib-tokens (an int64 tensor [n, seqlen] saved with torch.save) or the harness's own draw
(identical to our runs: harness.data.calibration_tokens on the 'wiki' source with the base model's tokenizer). The
tokens are handed to oneshot as an in-memory datasets.Dataset of input_ids/attention_mask, unshuffled; nothing is
fetched from a hub. The output is written to a temporary directory next to OUT_DIR and renamed into place, with a
PRODUCER.json recording versions, arguments and the calibration tokens' fingerprint.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# `python scripts/produce/llmcompressor.py` puts this directory first on sys.path, where this very file would shadow
# the llmcompressor package: drop it, and make the repository importable for the harness's calibration draw.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# the producers' shared helpers, loaded by path (this directory is off sys.path, see above)
_spec = importlib.util.spec_from_file_location("_produce_common", HERE / "_common.py")
common = sys.modules["_produce_common"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

GPTQ_ONLY = ("actorder", "dampening_frac", "block_size")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path, help="base model directory (config.json, safetensors, tokenizer)")
    p.add_argument("out", type=Path, help="output directory (must not exist unless --force)")
    p.add_argument("--modifier", choices=["gptq", "awq"], required=True)
    p.add_argument("--bits", type=int, default=4, choices=[4, 8], help="4 = W4A16[_ASYM], 8 = W8A16 (sym only)")
    p.add_argument("--group-size", type=int, default=128, help="-1 = per channel")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric (default: --sym for gptq, --no-sym for awq)")
    p.add_argument("--actorder", choices=["static", "group", "none"], default="static",
                   help="GPTQ activation ordering (library default static; group saves weight_g_idx)")
    p.add_argument("--dampening-frac", type=float, default=0.01, help="GPTQ dampening (library default 0.01)")
    p.add_argument("--block-size", type=int, default=128, help="GPTQ block size (library default 128)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="dtype the model is loaded (and saved) in; auto = the checkpoint's")
    p.add_argument("--ignore", action="append", default=[],
                   help="more modules to leave unquantized besides lm_head (llm-compressor's syntax, e.g. "
                        "'re:.*mlp.gate$' for a mixture's router, as its MoE examples do); repeatable")
    common.add_calibration_args(p)  # --calib-tokens, or the harness draw (--calib-source/--n-samples/...)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    if args.sym is None:
        args.sym = args.modifier == "gptq"
    if args.bits == 8 and not args.sym:
        p.error("compressed-tensors has no W8A16_ASYM preset; 8-bit is symmetric only here")
    return args


def versions() -> dict:
    from importlib.metadata import version

    out = {}
    for dist in ("llmcompressor", "compressed-tensors", "torch", "transformers", "accelerate", "datasets",
                 "safetensors"):
        try:
            out[dist] = version(dist)
        except Exception:  # noqa: BLE001 - a missing optional package is recorded as absent
            out[dist] = None
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    out = args.out.resolve()
    if out.exists() and not args.force:
        raise SystemExit(f"{out} exists (use --force to replace it)")

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    patches = []
    if not torch.accelerator.is_available():
        # llmcompressor 0.14.0.1's AWQ pins its cached activations (IntermediatesCache.pin_memory) before the grid
        # search, unconditionally; without an accelerator torch raises "Cannot access accelerator device when none is
        # available". Pinning only speeds host-to-device copies and never changes a value: skip it on CPU.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
        patches.append("IntermediatesCache.pin_memory -> no-op (no accelerator)")

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype)
    drawn = common.resolve_calibration(args, tokenizer, model.config.vocab_size)
    tokens, calib = drawn.tokens, drawn.info
    n, seqlen = tokens.shape
    dataset = Dataset.from_dict({"input_ids": tokens.tolist(),
                                 "attention_mask": torch.ones_like(tokens).tolist()})

    scheme_name = f"W{args.bits}A16" + ("" if args.sym else "_ASYM")
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(scheme_name, ["Linear"])
    if args.group_size == -1:
        scheme.weights.strategy = "channel"
        scheme.weights.group_size = None
    else:
        scheme.weights.group_size = args.group_size
    quant = {"config_groups": {"group_0": scheme}, "ignore": ["lm_head", *args.ignore]}
    if args.modifier == "gptq":
        actorder = None if args.actorder == "none" else args.actorder
        recipe = [GPTQModifier(**quant, block_size=args.block_size, dampening_frac=args.dampening_frac,
                               actorder=actorder)]
    else:
        recipe = [AWQModifier(), QuantizationModifier(**quant)]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        oneshot(model=model, tokenizer=tokenizer, recipe=recipe, dataset=dataset, num_calibration_samples=n,
                max_seq_length=seqlen, shuffle_calibration_samples=False, output_dir=str(tmp))
        producer = {
            "tool": "llmcompressor", "script": "scripts/produce/llmcompressor.py", "versions": versions(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if args.modifier == "gptq" or k not in GPTQ_ONLY},
            "argv": sys.argv[1:] if argv is None else list(argv),
            "scheme": scheme_name, "recipe": [type(m).__name__ for m in recipe],
            "calibration": calib, "patches": patches,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / "PRODUCER.json").write_text(json.dumps(producer, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(out)


if __name__ == "__main__":
    main()
