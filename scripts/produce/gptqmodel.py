"""Quantize a base model directory with GPTQModel (the real library) into a GPTQ checkpoint directory.

Run it with the GPTQModel reference venv (scripts/setup_gptq_reference.sh), from anywhere:
    /work/venv-gptq/bin/python scripts/produce/gptqmodel.py --model DIR --out DIR [--bits 4 --group-size 128 ...]

Defaults follow a harness run (asymmetric, w4 g128, damp 0.01, no act-order, true-sequential) with GPTQModel's
own extras turned off (act_group_aware, static_groups, offload_to_disk), as benchmarks/crosscheck_gptq.py does.
Calibration is either --calib-tokens FILE.pt (an int64 tensor [n, seqlen]) or the harness's own draw
(harness.data.calibration_tokens, --calib-source wiki --n-samples 128 --seqlen 512 --seed 0 by default: the same
windows a harness run with those calib.* settings quantizes with). The checkpoint is what GPTQModel's
model.save() writes (config.json with quantization_config, quantize_config.json, model.safetensors, tokenizer
files, generation_config.json, quant_log.csv) plus PRODUCER.json; it is built in a temp dir and renamed onto --out.

--format gptq writes checkpoint_format "gptq" (v1: qzeros stored as zero - 1); gptq_v2 writes the zeros as is.
Layout notes: scripts/produce/README.md. Runs on CPU (GPTQMODEL_CPU_WORKERS >= 2 is set if unset: GPTQModel
refuses fewer). The first quantize compiles a small C++ packing extension.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# this file is named like the library: keep its own directory off sys.path so `import gptqmodel` finds GPTQModel
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # harness (the calibration draw)
_spec = importlib.util.spec_from_file_location("_produce_common", HERE / "_common.py")
common = sys.modules["_produce_common"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="base model directory (HF save_pretrained layout)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=128, help="-1 = per output channel")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=False,
                   help="symmetric quantization (default off, like the harness)")
    p.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=False,
                   help="act-order: columns by descending diag(H), g_idx records each input's group")
    p.add_argument("--format", choices=["gptq", "gptq_v2"], default="gptq",
                   help="checkpoint_format: gptq (v1, qzeros = zero - 1) or gptq_v2 (qzeros = zero)")
    p.add_argument("--damp", type=float, default=0.01, help="damp_percent (relative to mean diag(H))")
    p.add_argument("--act-group-aware", action=argparse.BooleanOptionalAction, default=False,
                   help="GPTQModel's GAR (its default when desc_act is off; off here, as in the harness)")
    p.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype the base model is loaded and quantized in (scales are saved fp16 regardless)")
    p.add_argument("--batch-size", type=int, default=1, help="calibration forward batch size")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    common.add_calibration_args(p)
    args = p.parse_args(argv)
    if args.group_size != -1 and args.group_size <= 0:
        p.error("--group-size must be positive or -1 (per channel)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, args.threads)))  # GPTQModel refuses fewer than 2
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoConfig, AutoTokenizer

    out = common.AtomicOutput(args.out, args.force)  # refuses an existing --out before any work
    model_dir = str(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib = common.resolve_calibration(args, tokenizer, AutoConfig.from_pretrained(model_dir).vocab_size)
    settings = dict(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act, sym=args.sym,
                    damp_percent=args.damp, act_group_aware=args.act_group_aware, static_groups=args.static_groups,
                    true_sequential=args.true_sequential, offload_to_disk=False, format=args.format)
    qcfg = QuantizeConfig(**settings)
    print(f"GPTQModel {gptqmodel.__version__}: {settings}; calibration {calib.info}", flush=True)
    model = GPTQModel.load(model_dir, qcfg, device="cpu", dtype=getattr(torch, args.dtype))
    rows = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib.tokens]
    t0 = time.perf_counter()
    model.quantize(rows, batch_size=args.batch_size)
    print(f"quantized in {time.perf_counter() - t0:.1f} s", flush=True)
    with out as tmp:
        model.save(str(tmp))
        saved = json.loads((tmp / "config.json").read_text()).get("quantization_config", {})
        if saved.get("checkpoint_format", saved.get("format")) != args.format:
            raise RuntimeError(f"GPTQModel saved checkpoint_format {saved.get('checkpoint_format')!r}, "
                               f"asked for {args.format!r}")
        common.write_producer_json(tmp, tool="gptqmodel", tool_version=gptqmodel.__version__,
                                   script="scripts/produce/gptqmodel.py", args=args, calib=calib,
                                   library_config={**settings, "device": "cpu", "dtype": args.dtype,
                                                   "batch_size": args.batch_size})
    print(out.out)


if __name__ == "__main__":
    main()
