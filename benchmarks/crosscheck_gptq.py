"""Cross-check our GPTQ against GPTQModel 7.6.0 on the packaged model (a benchmark, not a test).

Both sides get the SAME calibration windows (harness.data, fingerprints compared) and the same settings
(asymmetric, damp 0.01, block 128, true-sequential, GPTQModel's act_group_aware off). Each side quantizes in
its own subprocess (so peak RSS is its own) and writes a GPTQ checkpoint; both checkpoints are then read by
checkpoints.base.load_checkpoint_model (GPTQModel's through the same reader: a format interop check too) and
evaluated with the same perplexity code, so only the quantization differs. Scales are fp16 on both sides.

Run with the reference venv (scripts/setup_gptq_reference.sh), from the repo root:
    /work/venv-gptq/bin/python benchmarks/crosscheck_gptq.py --configs w4g128 w3g128 --desc-act off
    /work/venv-gptq/bin/python benchmarks/crosscheck_gptq.py --layer-check     # layer-level, seconds
    /work/venv-gptq/bin/python benchmarks/crosscheck_gptq.py --export-check --n-samples 4 --eval-windows 2
        # our exported checkpoint loaded by GPTQModel's CPU kernel: logits against our fake-quant model
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from harness.provenance import cpu_seconds, peak_rss_mb, reset_peak_rss, rss_mb

ROOT = Path(__file__).resolve().parent.parent


def parse_config(tag: str) -> tuple[int, int | None]:
    """'w4g128' -> (4, 128); 'w3gC' -> (3, None)."""
    if not (tag.startswith("w") and "g" in tag):
        raise ValueError(f"--configs entry {tag!r}: expected like w4g128 or w3gC")
    bits, group = tag[1:].split("g")
    return int(bits), None if group == "C" else int(group)


def calibration(args, tokenizer):
    from harness.config import TextSourceConfig
    from harness.data import calibration_tokens
    from harness.models import default_cache_dir

    return calibration_tokens(args.calib_source, TextSourceConfig(kind=args.calib_source), tokenizer,
                              default_cache_dir(), args.n_samples, args.seqlen, args.seed)


# ----------------------------------------------------------------------------------------------- workers
def worker_ours(args, out_dir: Path) -> dict:
    from structure.architectures import layout_for
    from harness.config import ModelConfig
    from kernels.export import save_quantized
    from harness.models import load_model
    from kernels.pack import pack_gptq
    from core.spec import QuantSpec
    from methods.gptq import GPTQ, GPTQConfig

    model, tokenizer = load_model(ModelConfig(), torch.device("cpu"))
    calib = calibration(args, tokenizer)
    bits, group = parse_config(args.config)
    spec = QuantSpec(bits, group)
    base_rss = rss_mb()
    reset_peak_rss()
    start, cpu0 = time.perf_counter(), cpu_seconds()
    method = GPTQ(GPTQConfig(desc_act=args.desc_act == "on", damp_percent=args.damp_percent,
                             hessian_dtype=args.hessian_dtype))
    result = method.quantize(model, layout_for(model), spec, calib.tokens, torch.device("cpu"))
    arts = result.artifacts
    for art in arts.values():  # GPTQModel packs inside quantize(): pack ours too so both times cover the same work
        pack_gptq(art)
    wall = time.perf_counter() - start
    cpu = cpu_seconds() - cpu0
    peak = peak_rss_mb()
    save_quantized(model, arts, out_dir, "gptq", spec, tokenizer)
    retries = sum(s["damp_retries"] for s in result.stats.values())
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak, "base_rss_mib": base_rss, "calib_fingerprint": calib.fingerprint,
            "damp_retries": retries}


def worker_theirs(args, out_dir: Path) -> dict:
    from gptqmodel import GPTQModel, QuantizeConfig

    from harness.config import ModelConfig
    from harness.models import default_cache_dir, model_location

    location = model_location(ModelConfig(), default_cache_dir())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location)
    calib = calibration(args, tokenizer)
    bits, group = parse_config(args.config)
    qcfg = QuantizeConfig(bits=bits, group_size=-1 if group is None else group, desc_act=args.desc_act == "on",
                          sym=False, damp_percent=args.damp_percent, act_group_aware=False, offload_to_disk=False,
                          static_groups=False, true_sequential=True)
    model = GPTQModel.load(location, qcfg, device="cpu", dtype=torch.float32)
    rows = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib.tokens]
    base_rss = rss_mb()
    reset_peak_rss()
    start, cpu0 = time.perf_counter(), cpu_seconds()
    model.quantize(rows, batch_size=1)
    wall = time.perf_counter() - start
    cpu = cpu_seconds() - cpu0
    peak = peak_rss_mb()
    model.save(str(out_dir))
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak, "base_rss_mib": base_rss, "calib_fingerprint": calib.fingerprint}


# ----------------------------------------------------------------------------------------------- parent
def run_worker(args, side: str, config: str, desc_act: str, out_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--config", config, "--desc-act-one", desc_act,
           "--out-dir", str(out_dir), "--n-samples", str(args.n_samples), "--seqlen", str(args.seqlen),
           "--seed", str(args.seed), "--calib-source", args.calib_source, "--damp-percent", str(args.damp_percent),
           "--threads", str(args.threads), "--hessian-dtype", args.hessian_dtype]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "GPTQMODEL_CPU_WORKERS": str(max(2, args.threads)),  # GPTQModel refuses fewer than 2
           "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} {config} desc_act={desc_act} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def eval_sets(args, tokenizer) -> dict[str, torch.Tensor]:
    from harness.config import TextSourceConfig
    from harness.data import eval_tokens
    from harness.models import default_cache_dir
    from harness.perplexity import make_windows

    out = {}
    for name in args.eval_sets:
        ts = eval_tokens(name, TextSourceConfig(kind=name), tokenizer, default_cache_dir(), args.eval_seqlen * args.eval_windows)
        out[name] = make_windows(ts.tokens, args.eval_seqlen, args.eval_windows, None)
    return out


def ppl_row(model, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    from harness.perplexity import perplexity
    from structure.architectures import layout_for
    from structure.pipeline import BlockPipeline

    pipeline = BlockPipeline(model, layout_for(model), "cpu")
    return {name: perplexity(pipeline, w, desc=name)["ppl"] for name, w in windows.items()}


def main_parent(args) -> None:
    import copy

    from structure.architectures import apply_artifacts, layout_for
    from harness.config import ModelConfig
    from checkpoints.base import load_checkpoint_model as load_quantized_model
    from harness.models import load_model
    from core.spec import QuantSpec
    from core.quant import quantize_weight

    torch.set_num_threads(args.threads)
    base, tokenizer = load_model(ModelConfig(), torch.device("cpu"))
    windows = eval_sets(args, tokenizer)
    print(f"# model: SmolLM2-135M-Instruct (packaged; weights dequantized from Q4_1 GGUF)\n"
          f"# calibration: {args.n_samples} x {args.seqlen} tokens from '{args.calib_source}' (seed {args.seed}); "
          f"eval: {args.eval_windows} windows x {args.eval_seqlen} tokens per set; threads={args.threads}; "
          f"asym, damp {args.damp_percent}, block 128, true_sequential, GPTQModel act_group_aware=False", flush=True)
    rows = [{"config": "fp", "desc_act": "-", "side": "fp", **ppl_row(base, windows)}]
    with tempfile.TemporaryDirectory(prefix="crosscheck_gptq_") as tmp:
        for config in args.configs:
            bits, group = parse_config(config)
            for rule in args.rtn_rules:
                model = copy.deepcopy(base)
                arts = {n: quantize_weight(lin.weight.data, QuantSpec(bits, group), rule)
                        for n, lin in layout_for(model).quantizable_linears(model).items()}
                apply_artifacts(model, arts)
                rows.append({"config": config, "desc_act": "-", "side": f"rtn_{rule}", **ppl_row(model, windows)})
                print(rows[-1], flush=True)
            for desc_act in args.desc_act:
                result = {}
                for side in ("ours", "theirs"):
                    out_dir = Path(tmp) / f"{side}_{config}_{desc_act}"
                    info = run_worker(args, side, config, desc_act, out_dir)
                    model, _ = load_quantized_model(out_dir)
                    result[side] = {"config": config, "desc_act": desc_act, "side": side, **ppl_row(model, windows), **info}
                    print(result[side], flush=True)
                if result["ours"]["calib_fingerprint"] != result["theirs"]["calib_fingerprint"]:
                    raise RuntimeError("the two sides saw different calibration tokens")
                result["ours"]["time_ratio"] = result["ours"]["wall_s"] / result["theirs"]["wall_s"]
                rows += [result["ours"], result["theirs"]]
    print_table(rows, args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


def print_table(rows: list[dict], args) -> None:
    sets = args.eval_sets
    head = f"{'config':8} {'act':4} {'side':16} " + " ".join(f"{s:>8}" for s in sets) + \
        f" {'quant_s':>8} {'ours/theirs':>11} {'peakRSS_MiB':>11} {'ppl ours/theirs (max)':>21}"
    print("\n" + head + "\n" + "-" * len(head))
    theirs = {(r["config"], r["desc_act"]): r for r in rows if r["side"] == "theirs"}
    for r in rows:
        cells = " ".join(f"{r[s]:8.3f}" for s in sets)
        extra = ""
        if "wall_s" in r:
            ratio = f"{r['time_ratio']:11.2f}" if "time_ratio" in r else " " * 11
            rel = ""
            if r["side"] == "ours":
                t = theirs[(r["config"], r["desc_act"])]
                rel = f"{max(r[s] / t[s] for s in sets):21.4f}"
            extra = f" {r['wall_s']:8.1f} {ratio} {r['peak_rss_mib']:11.0f} {rel}"
        print(f"{r['config']:8} {r['desc_act']:4} {r['side']:16} {cells}{extra}")


# ----------------------------------------------------------------------------------------------- layer check
def layer_check() -> None:
    """Same W and activations through GPTQModel's GPTQ class and ours: max |Q_ours - Q_theirs|."""
    from gptqmodel.quantization.config import GPTQConfig as RefConfig
    from gptqmodel.quantization.gptq import GPTQ as RefGPTQ
    from torch import nn

    from core.spec import QuantSpec
    from methods.gptq import HessianAccumulator, gptq_quantize_layer

    torch.manual_seed(0)
    inp, out = 200, 96
    X = torch.randn(4, 256, inp) @ (torch.randn(inp, inp) / inp**0.5) * torch.linspace(0.1, 3, inp)
    X[..., 7] = 0  # a dead input
    print(f"{'bits':>4} {'group':>5} {'desc_act':>8} {'static':>6} {'sym':>5} {'max|dQ|':>10} {'g_idx equal':>11}")
    for bits, group, desc_act, static, sym in [(4, 64, False, False, False), (3, 64, False, False, False),
                                               (4, 128, False, False, False), (3, 128, True, False, False),
                                               (4, 64, True, True, False), (4, None, False, False, False),
                                               (3, 64, False, False, True)]:
        lin = nn.Linear(inp, out, bias=False)
        W = lin.weight.data.clone()
        ref = RefGPTQ(lin, RefConfig(bits=bits, group_size=-1 if group is None else group, desc_act=desc_act,
                                     static_groups=static, sym=sym, damp_percent=0.01, act_group_aware=False,
                                     offload_to_disk=False, fallback=None))
        ref.quantizer.configure(perchannel=True)
        acc = HessianAccumulator(inp, "cpu", dtype=torch.float32)  # the reference's precision, for a like-for-like check
        for x in X:
            ref.add_batch(x[None], None)
            acc.add(x[None])
        Q_ref, _, _, g_ref, *_ = ref.quantize(blocksize=128)
        art, _ = gptq_quantize_layer(W, acc.H, QuantSpec(bits, group, sym), desc_act=desc_act, static_groups=static,
                                     dtype=torch.float32)
        dq = (art.dequantize() - Q_ref.float()).abs().max().item()
        g_eq = torch.equal(art.group_index().to(torch.int32), g_ref.to(torch.int32)) if group else "-"
        print(f"{bits:4} {str(group):>5} {str(desc_act):>8} {str(static):>6} {str(sym):>5} {dq:10.2e} {str(g_eq):>11}")


# ----------------------------------------------------------------------------------------------- noise floor
def noise_floor(args) -> None:
    """Ours twice on the same calibration, once with 1 and once with 2 torch threads: only the floating-point
    summation order differs. The ppl spread between the two is the resolution of any ours-vs-theirs comparison."""
    from harness.config import ModelConfig
    from checkpoints.base import load_checkpoint_model as load_quantized_model
    from harness.models import load_model

    torch.set_num_threads(args.threads)
    _, tokenizer = load_model(ModelConfig(), torch.device("cpu"))
    windows = eval_sets(args, tokenizer)
    print(f"# noise floor: ours with 1 vs 2 threads; hessian_dtype={args.hessian_dtype}; calibration "
          f"{args.n_samples} x {args.seqlen}; eval {args.eval_windows} x {args.eval_seqlen} per set; CPU kernel family "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"{'config':8} {'act':4} {'threads':>7} " + " ".join(f"{s:>8}" for s in args.eval_sets))
    with tempfile.TemporaryDirectory(prefix="noise_floor_") as tmp:
        for config in args.configs:
            for desc_act in args.desc_act:
                ppl = {}
                for threads in (1, 2):
                    out_dir = Path(tmp) / f"{config}_{desc_act}_{threads}"
                    run_worker(argparse.Namespace(**{**vars(args), "threads": threads}), "ours", config, desc_act,
                               out_dir)
                    ppl[threads] = ppl_row(load_quantized_model(out_dir)[0], windows)
                    print(f"{config:8} {desc_act:4} {threads:7d} " +
                          " ".join(f"{ppl[threads][s]:8.3f}" for s in args.eval_sets), flush=True)
                print(f"{config:8} {desc_act:4} {'2/1':>7} " +
                      " ".join(f"{ppl[2][s] / ppl[1][s]:8.4f}" for s in args.eval_sets), flush=True)


# ----------------------------------------------------------------------------------------------- export check
def export_check(args) -> None:
    """Our GPTQ checkpoint (symmetric, see below) loaded by GPTQModel's CPU torch kernel: logits against ours."""
    import copy

    from gptqmodel import BACKEND, GPTQModel

    from structure.architectures import layout_for
    from harness.config import ModelConfig
    from checkpoints.base import load_checkpoint_model as load_quantized_model
    from kernels.export import save_quantized
    from harness.models import load_model
    from core.spec import QuantSpec
    from methods.gptq import GPTQ, GPTQConfig

    torch.set_num_threads(args.threads)
    base, tokenizer = load_model(ModelConfig(), torch.device("cpu"))
    windows = eval_sets(args, tokenizer)
    calib = calibration(args, tokenizer)
    print(f"# export check (symmetric GPTQ): calibration {args.n_samples} x {args.seqlen}; logits on {args.eval_windows} windows x "
          f"{args.eval_seqlen} tokens per set; our checkpoint -> GPTQModel.load(backend=GPTQ_TORCH, CPU). Its torch "
          f"kernel takes only fp16/bf16, so it runs bf16, next to our fake-quant model in bf16 and in fp32; "
          f"ours bf16 vs fp32 is the scale of bf16 rounding alone.")
    head = (f"{'config':8} {'act':4} {'max|dlogit| theirs-ours(bf16)':>30} {'ours bf16-fp32':>14} "
            f"{'argmax agree':>12} " + " ".join(f"{f'{s} ours/bf16/theirs':>26}" for s in windows))
    print(head)
    with tempfile.TemporaryDirectory(prefix="export_check_") as tmp:
        for config in args.configs:
            bits, group = parse_config(config)
            for desc_act in args.desc_act:
                model = copy.deepcopy(base)
                # symmetric: GPTQModel 7.6 refuses to load an asymmetric GPTQ-v1 checkpoint unless its own
                # quantizer wrote it (quantization_config.meta), a guard against old AutoGPTQ's zero-point bug
                spec = QuantSpec(bits, group, symmetric=True)
                arts = GPTQ(GPTQConfig(desc_act=desc_act == "on")).quantize(model, layout_for(model), spec,
                                                                            calib.tokens, torch.device("cpu")).artifacts
                out_dir = Path(tmp) / f"{config}_{desc_act}"
                save_quantized(model, arts, out_dir, "gptq", spec, tokenizer)
                ours, _ = load_quantized_model(out_dir)  # the checkpoint's fp16 scales, as GPTQModel reads them
                ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
                theirs = GPTQModel.load(str(out_dir), device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.bfloat16)
                tokens = torch.cat(list(windows.values()))
                with torch.no_grad():
                    fp32 = ours(tokens).logits
                    bf16 = ours_bf16(tokens).logits.float()
                    their = theirs.model(tokens).logits.float()
                d_theirs = (their - bf16).abs().max().item()
                d_bf16 = (bf16 - fp32).abs().max().item()
                agree = (their.argmax(-1) == bf16.argmax(-1)).float().mean().item()
                ppl = [ppl_row(m, windows) for m in (ours, ours_bf16, theirs.model)]
                cells = " ".join(f"{'/'.join(f'{p[s]:.3f}' for p in ppl):>26}" for s in windows)
                print(f"{config:8} {desc_act:4} {d_theirs:30.3e} {d_bf16:14.3e} {agree:12.4f} {cells}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["w4g128", "w3g128", "w4g64", "w3g64"])
    p.add_argument("--desc-act", nargs="+", choices=["off", "on"], default=["off", "on"])
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-source", default="wiki")
    p.add_argument("--eval-sets", nargs="+", default=["wiki", "code", "prose"])
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--rtn-rules", nargs="*", default=["minmax_zero", "minmax"],
                   help="RTN baselines: minmax_zero (GPTQ paper's RTN, same quantizer as GPTQ), minmax (AWQ paper's)")
    p.add_argument("--damp-percent", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hessian-dtype", choices=["float64", "float32"], default="float64",
                   help="ours: method.hessian_dtype (float32 = the references' precision)")
    p.add_argument("--out", default=None, help="write all rows as JSON here")
    p.add_argument("--layer-check", action="store_true", help="only the layer-level comparison")
    p.add_argument("--noise-floor", action="store_true",
                   help="only: ours with 1 vs 2 threads, to show how far summation order alone moves ppl")
    p.add_argument("--export-check", action="store_true",
                   help="only: load our exported GPTQ checkpoint with GPTQModel and compare logits")
    p.add_argument("--worker", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--desc-act-one", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.layer_check:
        layer_check()
    elif args.export_check:
        export_check(args)
    elif args.noise_floor:
        noise_floor(args)
    elif args.worker:
        torch.set_num_threads(args.threads)
        args.desc_act = args.desc_act_one
        fn = worker_ours if args.worker == "ours" else worker_theirs
        info = fn(args, Path(args.out_dir))
        print(json.dumps(info))
    else:
        main_parent(args)


if __name__ == "__main__":
    main()
