"""Quantize a base model directory with Intel's AutoRound (SignRound) on CPU and export it, offline.

Runs in the AutoRound reference venv (scripts/setup_autoround_reference.sh):

    /work/venv-autoround/bin/python scripts/produce/autoround.py BASE_DIR OUT_DIR
        [--bits 4] [--group-size 128] [--sym | --no-sym] [--iters N] [--format auto_round]
        [--also FORMAT=DIR ...] [--calib-tokens FILE.pt | --n-samples 128 --seqlen 512 --seed 0] [--ar-seed 42]

--format is one of auto_round, auto_gptq, auto_awq, llm_compressor (AutoRound's own names). --also saves the SAME
quantized model in further formats (one tuning run, several layouts: readers can be checked against each other).
--iters defaults to the library's (200 tuning steps per block); --iters 0 is AutoRound's RTN mode.

Calibration is either --calib-tokens (an int64 tensor [n, seqlen] saved with torch.save) or the harness's own draw
(identical to our runs: harness.data.calibration_tokens on the 'wiki' source with the base model's tokenizer). The
windows are handed to AutoRound as an in-memory list of {"input_ids": [1, seqlen]} batches, in order; nothing is
fetched from a hub (AutoRound then builds its own attention mask: all ones except the last position, which it also
drops from the loss). Each output is written to a temporary directory next to it and renamed into place, with a
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

FORMATS = ("auto_round", "auto_gptq", "auto_awq", "llm_compressor")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path, help="base model directory (config.json, safetensors, tokenizer)")
    p.add_argument("out", type=Path, help="output directory for --format (must not exist unless --force)")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=128, help="-1 = per channel")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True, help="symmetric (default)")
    p.add_argument("--iters", type=int, default=None, help="tuning steps per block (default: the library's, 200)")
    p.add_argument("--format", choices=FORMATS, default="auto_round")
    p.add_argument("--also", action="append", default=[], metavar="FORMAT=DIR",
                   help="also save the same quantized model in FORMAT under DIR (repeatable)")
    p.add_argument("--ar-seed", type=int, default=42, help="AutoRound's own seed (library default 42)")
    p.add_argument("--batch-size", type=int, default=8, help="AutoRound tuning batch size (library default 8)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="dtype the model is loaded in; auto = the checkpoint's")
    common.add_calibration_args(p)  # --calib-tokens, or the harness draw (--calib-source/--n-samples/...)
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    args = p.parse_args(argv)
    args.outputs = {args.format: args.out.resolve()}
    for item in args.also:
        fmt, sep, path = item.partition("=")
        if not sep or fmt not in FORMATS or fmt in args.outputs:
            p.error(f"--also {item!r}: want FORMAT=DIR with FORMAT one of {FORMATS}, each format once")
        args.outputs[fmt] = Path(path).resolve()
    if "auto_round" in args.outputs and len(args.outputs) > 1 and not args.sym and args.bits == 4:
        # auto-round 0.16.1: asymmetric int4 auto_round is AWQ-packed (auto_round:auto_awq); exported next to another
        # format it is packed after tuning through export_to_autoround.pack_layer, which fails with
        # "TypeError: WQLinear_GEMM.__init__() got an unexpected keyword argument 'weight_dtype'".
        p.error("asymmetric 4-bit --format auto_round cannot be combined with --also in auto-round 0.16.1; "
                "run each format separately")
    return args


def versions() -> dict:
    from importlib.metadata import version

    out = {}
    for dist in ("auto-round", "torch", "transformers", "accelerate", "safetensors", "compressed-tensors"):
        try:
            out[dist] = version(dist)
        except Exception:  # noqa: BLE001 - a missing optional package is recorded as absent
            out[dist] = None
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    for out in args.outputs.values():
        if out.exists() and not args.force:
            raise SystemExit(f"{out} exists (use --force to replace it)")
        out.parent.mkdir(parents=True, exist_ok=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from auto_round import AutoRound

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype)
    drawn = common.resolve_calibration(args, tokenizer, model.config.vocab_size)
    tokens, calib = drawn.tokens, drawn.info
    n, seqlen = tokens.shape
    dataset = [{"input_ids": row.unsqueeze(0)} for row in tokens]

    formats = list(args.outputs)
    kwargs = {} if args.iters is None else {"iters": args.iters}
    ar = AutoRound(model, tokenizer=tokenizer, bits=args.bits, group_size=args.group_size, sym=args.sym,
                   dataset=dataset, nsamples=n, seqlen=seqlen, batch_size=min(args.batch_size, n),
                   seed=args.ar_seed, device_map="cpu", format=",".join(formats), **kwargs)

    work = Path(tempfile.mkdtemp(prefix=".autoround.", dir=args.out.resolve().parent))
    try:
        _, folders = ar.quantize_and_save(output_dir=str(work / "export"), format=",".join(formats))
        folders = [folders] if isinstance(folders, str) else list(folders)
        if len(folders) != len(formats):
            raise RuntimeError(f"AutoRound wrote {folders} for formats {formats}")
        by_format = {}
        for fmt in formats:  # one format: the folder itself; several: a subfolder named after the backend,
            # e.g. auto-gptq, or auto-round-auto-gptq (auto_round packs sym int like GPTQ, asym int4 like AWQ)
            dashed = fmt.replace("_", "-")
            match = [f for f in folders if len(formats) == 1 or Path(f).name == dashed
                     or Path(f).name.startswith(dashed + "-")]
            if len(match) != 1:
                raise RuntimeError(f"cannot tell which of {folders} holds format {fmt}")
            by_format[fmt] = Path(match[0])
        producer = {
            "tool": "auto-round", "script": "scripts/produce/autoround.py", "versions": versions(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "outputs"},
            "argv": sys.argv[1:] if argv is None else list(argv),
            "iters": ar.iters if hasattr(ar, "iters") else args.iters,
            "formats_saved_from_one_run": formats,
            "calibration": calib,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        for fmt, folder in by_format.items():
            out = args.outputs[fmt]
            (folder / "PRODUCER.json").write_text(json.dumps(dict(producer, format=fmt), indent=2) + "\n")
            staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
            staged.rmdir()
            shutil.move(str(folder), staged)  # same filesystem as out: the rename below is atomic
            os.chmod(staged, 0o755)
            for f in staged.iterdir():
                os.chmod(f, 0o644)
            if out.exists():
                shutil.rmtree(out)
            staged.rename(out)
            print(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
