"""Quantize a base model directory with AutoAWQ (the real library) into an AWQ checkpoint directory.

Run it with the AutoAWQ reference venv (scripts/setup_awq_reference.sh), from anywhere:
    /work/venv-awq/bin/python scripts/produce/autoawq.py --model DIR --out DIR [--version gemm --group-size 128 ...]

The library's own pipeline: AutoAWQForCausalLM.from_pretrained -> .quantize(tokenizer, quant_config, calib_data)
-> .save_quantized(out), plus tokenizer.save_pretrained(out) as AutoAWQ's examples do. Calibration is either
--calib-tokens FILE.pt (an int64 tensor [n, seqlen]) or the harness's own draw (harness.data.calibration_tokens,
--calib-source wiki --n-samples 128 --seqlen 512 --seed 0 by default); the windows go in as lists of ids with
max_calib_samples=n and max_calib_seq_len=seqlen, which AutoAWQ concatenates and re-splits into the same windows
(checked). The checkpoint is built in a temp dir, gets PRODUCER.json, and is renamed onto --out.

AutoAWQ 0.2.9 is written for CUDA and transformers 4.x. Three shims (a subclass passed as quantizer_cls; the
installed files are untouched) make its CPU run with transformers 5 correct, without changing its algorithm:
  1. the layer kwargs it captures include the catcher pass's DynamicCache (`past_key_values`); every later block
     forward would append to it, so it is dropped and use_cache=False set (as benchmarks/crosscheck_awq.py);
  2. the scale search snapshots weights with `{k: v.cpu()}` (a copy on GPU, an alias on CPU) and then scales them
     in place, so on CPU each trial would compound the last: the inspected module's state_dict returns clones;
  3. the clip search asserts out_features % 64 == 0 (its output-channel batching, for memory). Rows are searched
     independently, so a layer with other out_features (the tiny golden's v/k_proj: 32) is padded with zero rows
     to a multiple of 64 and the padding's results dropped; other layers go straight through.
Limits of AutoAWQ 0.2.9 (refused here before any work, with the library's own error quoted): --bits 4 only
(WQLinear_GEMM/GEMV raise NotImplementedError otherwise), --no-zero-point cannot be packed (their from_linear
asserts `zeros is not None`), --group-size -1 fails in the scale search (`weight.view(-1, -1)`).
Layout notes: scripts/produce/README.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # harness (the calibration draw)
_spec = importlib.util.spec_from_file_location("_produce_common", HERE / "_common.py")
common = sys.modules["_produce_common"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

SHIMS = [
    "init_quant: drop captured past_key_values (DynamicCache), set use_cache=False",
    "_search_best_scale: inspected module's state_dict returns clones (CPU alias bug in _compute_best_scale)",
    "_compute_best_clip: pad output rows with zeros to a multiple of 64 when needed, drop the padding's results",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="base model directory (HF save_pretrained layout)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--version", choices=["gemm", "gemv"], default="gemm", help="AutoAWQ packing/kernel version")
    p.add_argument("--bits", type=int, default=4, help="w_bit (AutoAWQ 0.2.9 packs 4 only)")
    p.add_argument("--group-size", type=int, default=128, help="q_group_size (must divide every in_features)")
    p.add_argument("--zero-point", action=argparse.BooleanOptionalAction, default=True,
                   help="asymmetric with zero point (AutoAWQ's default; the only one it can pack)")
    p.add_argument("--duo-scaling", action=argparse.BooleanOptionalAction, default=True,
                   help="scale = x_mean^a / w_mean^(1-a) (AutoAWQ's default) instead of x_mean^a")
    p.add_argument("--apply-clip", action=argparse.BooleanOptionalAction, default=True,
                   help="run the clipping search (AutoAWQ's default)")
    p.add_argument("--dtype", choices=["float16", "float32", "bfloat16"], default="float16",
                   help="dtype the base model is loaded and searched in (AutoAWQ's default float16); the packed "
                        "layers are always cast to fp16 by AutoAWQ before packing")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    common.add_calibration_args(p)
    args = p.parse_args(argv)
    if args.bits != 4:
        p.error("AutoAWQ 0.2.9 packs only 4-bit weights (WQLinear_GEMM/GEMV: "
                "NotImplementedError('Only 4-bit are supported for now.'))")
    if not args.zero_point:
        p.error("AutoAWQ 0.2.9 cannot pack zero_point=False into gemm/gemv: WQLinear_GEMM.from_linear and "
                "WQLinear_GEMV.from_linear assert `scales is not None and zeros is not None` (AssertionError)")
    if args.group_size <= 0:
        p.error("AutoAWQ 0.2.9 needs a positive group size: with -1 its scale search fails at "
                "weight.view(-1, self.group_size) (RuntimeError: only one dimension can be inferred)")
    return args


def cpu_quantizer_cls():
    import torch
    from awq.quantize.quantizer import AwqQuantizer

    class CPUAwqQuantizer(AwqQuantizer):
        """AwqQuantizer with the three CPU/transformers-5 shims of the module docstring."""

        def init_quant(self, *a, **k):
            modules, layer_kwargs, inps = super().init_quant(*a, **k)
            layer_kwargs.pop("past_key_values", None)
            layer_kwargs["use_cache"] = False
            return modules, layer_kwargs, inps

        def _search_best_scale(self, module, prev_op, layers, inp, module2inspect=None, kwargs={}):
            inspected = module2inspect if module2inspect is not None else layers[0]
            state_dict = inspected.state_dict
            inspected.state_dict = lambda *a, **k: {n: t.clone() for n, t in state_dict(*a, **k).items()}
            try:
                return super()._search_best_scale(module, prev_op, layers, inp, module2inspect, kwargs)
            finally:
                del inspected.state_dict

        def _compute_best_clip(self, w, input_feat, *a, **k):
            rows = w.shape[0]
            if rows % 64 == 0:
                return super()._compute_best_clip(w, input_feat, *a, **k)
            pad = torch.zeros((-rows) % 64, *w.shape[1:], dtype=w.dtype, device=w.device)
            return super()._compute_best_clip(torch.cat([w, pad]), input_feat, *a, **k)[:rows]

    return CPUAwqQuantizer


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import awq
    from awq import AutoAWQForCausalLM
    from transformers import AutoConfig, AutoTokenizer

    out = common.AtomicOutput(args.out, args.force)  # refuses an existing --out before any work
    model_dir = str(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib = common.resolve_calibration(args, tokenizer, AutoConfig.from_pretrained(model_dir).vocab_size)
    quant_config = {"zero_point": args.zero_point, "q_group_size": args.group_size, "w_bit": args.bits,
                    "version": args.version}
    n, seqlen = calib.tokens.shape
    quantize_kwargs = {"duo_scaling": args.duo_scaling, "apply_clip": args.apply_clip, "max_calib_samples": n,
                       "max_calib_seq_len": seqlen, "export_compatible": False}
    print(f"AutoAWQ {awq.__version__}: {quant_config} {quantize_kwargs}; calibration {calib.info}", flush=True)
    model = AutoAWQForCausalLM.from_pretrained(model_dir, torch_dtype=getattr(torch, args.dtype), device_map="cpu")
    t0 = time.perf_counter()
    model.quantize(tokenizer, quant_config, calib_data=calib.tokens.tolist(), quantizer_cls=cpu_quantizer_cls(),
                   **quantize_kwargs)
    seen = tuple(model.quantizer.inps.shape[:2])
    if seen != (n, seqlen):
        raise RuntimeError(f"AutoAWQ calibrated on {seen} windows, expected {(n, seqlen)}")
    print(f"quantized in {time.perf_counter() - t0:.1f} s", flush=True)
    with out as tmp:
        model.save_quantized(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        saved = json.loads((tmp / "config.json").read_text()).get("quantization_config", {})
        if saved.get("version") != args.version:
            raise RuntimeError(f"AutoAWQ saved version {saved.get('version')!r}, asked for {args.version!r}")
        common.write_producer_json(tmp, tool="autoawq", tool_version=awq.__version__,
                                   script="scripts/produce/autoawq.py", args=args, calib=calib,
                                   library_config={"quant_config": quant_config, **quantize_kwargs,
                                                   "torch_dtype": args.dtype, "device_map": "cpu"},
                                   extra={"shims": SHIMS})
    print(out.out)


if __name__ == "__main__":
    main()
