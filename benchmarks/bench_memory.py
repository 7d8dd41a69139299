"""Peak host memory of quantizing a model in memory against streaming it block by block from its safetensors
checkpoint (structure/streaming.py), over models of growing depth. Each measurement runs in a fresh process, so its
peak RSS (VmHWM) is its own.

    python benchmarks/bench_memory.py                              # depths 4,16,64; rtn, gptq, awq: ~3.2 GB at 64
    python benchmarks/bench_memory.py --depths 2,4 --hidden 256 --intermediate 512 --vocab 1000 \\
        --calib-samples 2 --calib-seqlen 64 --shard-size 2MB        # a smoke run: a few minutes on 2 cores

The goal: the streamed path's peak RSS stays flat in depth (a few blocks, the activations and the embeddings),
while the in-memory path's grows linearly with the checkpoint; and the two produce identical artifacts.

The models are random Llama-family checkpoints (hidden 1024, intermediate 2816, 16 heads, 8 kv heads, vocab 32000,
untied head by default) written with save_pretrained, sharded with an index file, into a temporary directory that
is removed at the end. Both paths quantize to w4g128 on the CPU in fp32 with the same random calibration tokens;
"identical" compares a sha256 over every artifact's codes, scales and zeros and over the method's modified tensors.
Peak RSS covers the whole child process (imports, load, quantize), not the digest computed after it; wall
seconds cover load + quantize. Rows print as they finish; the last lines give, per method, the peak at the largest
depth over the peak at the smallest (~1: flat; near the checkpoint's ratio: linear). A failing child's stderr
tail is printed and the script exits non-zero, as it does when any row is not identical.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BITS, GROUP_SIZE = 4, 128
METHODS = ("rtn", "gptq", "awq", "awq_gptq")
AWQ_SMALL = {"n_grid": 10, "clip_grid": 10, "clip_n_tokens": 256}  # AutoAWQ's 20/20/512 cost ~4x the time


def method_config(name: str):
    from methods.awq.config import AWQConfig, AWQGPTQConfig
    from methods.gptq import GPTQConfig
    from methods.rtn import RTNConfig

    return {"rtn": RTNConfig, "gptq": GPTQConfig, "awq": lambda: AWQConfig(**AWQ_SMALL),
            "awq_gptq": lambda: AWQGPTQConfig(awq=AWQConfig(**AWQ_SMALL))}[name]()


# ---------------------------------------------------------------- child processes

def write_checkpoint(args: argparse.Namespace) -> None:
    """Save a random Llama of args.depth blocks to args.dir (a child: building it takes the whole model's memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=args.hidden, intermediate_size=args.intermediate,
                                  num_hidden_layers=args.depth, num_attention_heads=args.heads,
                                  num_key_value_heads=args.kv_heads, vocab_size=args.vocab, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(args.dir, max_shard_size=args.shard_size)


def _hash_tensor(h, label: str, t) -> None:
    h.update(f"{label} {t.dtype} {tuple(t.shape)}\n".encode())  # names and shapes too: a renamed tensor differs
    h.update(t.detach().cpu().contiguous().numpy().tobytes())


def result_digest(result) -> str:
    """sha256 over the artifacts (sorted by name; an ArtifactStore reads one file at a time) and modified tensors."""
    h = hashlib.sha256()
    for name in sorted(result.artifacts):
        art = result.artifacts[name]
        for field in ("codes", "scales", "zeros"):
            _hash_tensor(h, f"{name}.{field}", getattr(art, field))
    for name in sorted(result.modified):
        _hash_tensor(h, name, result.modified[name])
    return h.hexdigest()


def measure(args: argparse.Namespace) -> None:
    """Load args.dir in memory or streamed, quantize it with args.method; print one JSON line."""
    import torch
    from transformers import AutoModelForCausalLM

    from core.spec import QuantSpec
    from harness.provenance import peak_rss_mb
    from methods import build_method
    from structure.architectures import layout_for
    from structure.pipeline import BlockPipeline
    from structure.streaming import RESIDENT, load_streamed

    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    method = build_method(method_config(args.method))
    calib = None
    if method.needs_calibration:
        calib = torch.randint(0, args.vocab, (args.calib_samples, args.calib_seqlen),
                              generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    if args.child == "memory":
        model, residency = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32).eval(), RESIDENT
    else:
        model, residency = load_streamed(args.dir, torch.float32, cpu, args.scratch)
    try:
        pipeline = BlockPipeline(model, layout_for(model), cpu, residency)
        result = method.quantize_blocks(pipeline, QuantSpec(BITS, GROUP_SIZE), calib)
        wall = time.perf_counter() - start
        peak = peak_rss_mb()  # before the digest, which reads every artifact once more
        digest = result_digest(result)
    finally:
        if args.child == "streamed":
            residency.close()  # removes the scratch directory: overlay files and the ArtifactStore
    print(json.dumps({"peak_mb": peak, "wall_s": wall, "digest": digest, "artifacts": len(result.artifacts)}))


# ---------------------------------------------------------------- parent

def model_args(args: argparse.Namespace) -> list[str]:
    """The options every child needs, as given to the parent."""
    out = ["--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--vocab", str(args.vocab),
           "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--calib-samples", str(args.calib_samples),
           "--calib-seqlen", str(args.calib_seqlen), "--shard-size", args.shard_size]
    return out + (["--threads", str(args.threads)] if args.threads else [])


def run_child(argv: list[str]) -> str:
    """Run this script as a child; its stdout. On failure: the stderr tail, and exit non-zero."""
    env = {**os.environ, "TQDM_DISABLE": "1"}  # progress bars would bury a failure's traceback in stderr
    proc = subprocess.run([sys.executable, __file__, *argv], check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-40:])
        sys.exit(f"child {' '.join(argv)} failed with exit status {proc.returncode}:\n{tail}")
    return proc.stdout


def measure_in_child(path: str, checkpoint: Path, method: str, scratch: Path, args: argparse.Namespace) -> dict:
    out = run_child(["--child", path, "--dir", str(checkpoint), "--method", method, "--scratch", str(scratch),
                     *model_args(args)])
    return json.loads(out.strip().splitlines()[-1])


def checkpoint_mb(directory: Path) -> float:
    from structure.streaming import Checkpoint

    return Checkpoint(directory).nbytes() / 2**20


def print_header(args: argparse.Namespace, depths: list[int], methods: list[str]) -> None:
    import torch

    from harness.provenance import device_name, git_sha

    if args.threads:
        torch.set_num_threads(args.threads)  # so that device_name reports the children's thread count
    print(f"# {device_name(torch.device('cpu'))}; torch {torch.__version__}; commit {git_sha()}")
    print(f"# random llama: hidden {args.hidden}, intermediate {args.intermediate}, heads {args.heads}/{args.kv_heads} "
          f"kv, vocab {args.vocab}, untied head, fp32, shards <= {args.shard_size}; depths {depths}")
    print(f"# w{BITS}g{GROUP_SIZE} on cpu; calib {args.calib_samples} x {args.calib_seqlen} random tokens; "
          f"methods {methods}; AWQ with {AWQ_SMALL} (cheaper than AutoAWQ's defaults), GPTQ and RTN defaults")
    print(f"{'depth':>5s} {'method':8s} {'ckpt MB':>8s} {'mem peak MB':>11s} {'stream peak MB':>14s} "
          f"{'mem wall s':>10s} {'stream wall s':>13s} {'identical':>9s}", flush=True)


def print_ratios(rows: dict[tuple[int, str], dict], depths: list[int], methods: list[str]) -> None:
    """Peak at the largest depth / peak at the smallest, per method: ~1 is flat, ~depth ratio is linear."""
    lo, hi = min(depths), max(depths)
    if lo == hi:
        return
    for m in methods:
        a, b = rows[lo, m], rows[hi, m]
        print(f"{m}: depth {hi} / depth {lo}: streamed peak x{b['streamed']['peak_mb'] / a['streamed']['peak_mb']:.2f}, "
              f"in-memory peak x{b['memory']['peak_mb'] / a['memory']['peak_mb']:.2f} "
              f"(checkpoint x{b['ckpt_mb'] / a['ckpt_mb']:.2f})")


def run_table(args: argparse.Namespace, depths: list[int], methods: list[str]) -> None:
    print_header(args, depths, methods)
    rows: dict[tuple[int, str], dict] = {}
    all_identical = True
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        for depth in depths:
            checkpoint = Path(tmp) / f"llama_{depth}"
            run_child(["--child", "write", "--dir", str(checkpoint), "--depth", str(depth), *model_args(args)])
            ckpt_mb = checkpoint_mb(checkpoint)
            for m in methods:
                scratch = Path(tmp) / f"scratch_{depth}_{m}"
                row = rows[depth, m] = {"ckpt_mb": ckpt_mb,
                                        "memory": measure_in_child("memory", checkpoint, m, scratch, args),
                                        "streamed": measure_in_child("streamed", checkpoint, m, scratch, args)}
                mem, st = row["memory"], row["streamed"]
                same = mem["digest"] == st["digest"] and mem["artifacts"] == st["artifacts"]
                all_identical &= same
                print(f"{depth:5d} {m:8s} {ckpt_mb:8.0f} {mem['peak_mb']:11.0f} {st['peak_mb']:14.0f} "
                      f"{mem['wall_s']:10.1f} {st['wall_s']:13.1f} {'yes' if same else 'NO':>9s}", flush=True)
            for f in checkpoint.iterdir():  # free the disk before the next, deeper checkpoint
                f.unlink()
    print_ratios(rows, depths, methods)
    if not all_identical:
        sys.exit("streamed and in-memory artifacts differ (identical=NO above)")


def _depths(text: str) -> list[int]:
    try:
        depths = [int(d) for d in text.split(",")]
    except ValueError:
        depths = [0]
    if min(depths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: depths must be a comma list of positive integers")
    return depths


def _methods(text: str) -> list[str]:
    methods = text.split(",")
    if not set(methods) <= set(METHODS):
        raise argparse.ArgumentTypeError(f"{text!r}: methods must come from {','.join(METHODS)}")
    return methods


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default=[4, 16, 64], type=_depths,
                   help="comma list of decoder-block counts (default: 4,16,64)")
    p.add_argument("--methods", default=["rtn", "gptq", "awq"], type=_methods,
                   help=f"comma list from {','.join(METHODS)} (default: rtn,gptq,awq)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (a multiple of 128; default 1024)")
    p.add_argument("--intermediate", type=int, default=2816, help="MLP size (a multiple of 128; default 2816)")
    p.add_argument("--heads", type=int, default=16, help="attention heads (default 16)")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (default 8)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    p.add_argument("--calib-samples", type=int, default=4, help="calibration windows (default 4; RTN uses none)")
    p.add_argument("--calib-seqlen", type=int, default=128, help="tokens per calibration window (default 128)")
    p.add_argument("--shard-size", default="500MB",
                   help="save_pretrained's max_shard_size (default 500MB; smaller to get an index at small sizes)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in every child (default: torch's)")
    # internal: what a child process does
    p.add_argument("--child", choices=["write", "memory", "streamed"], help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    problems = [f"--{name} {value} is not a multiple of the group size {GROUP_SIZE}"
                for name, value in (("hidden", args.hidden), ("intermediate", args.intermediate))
                if value % GROUP_SIZE]
    if args.hidden % args.heads or args.heads % args.kv_heads:
        problems.append(f"--hidden {args.hidden}, --heads {args.heads}, --kv-heads {args.kv_heads}: "
                        "heads must divide hidden and kv-heads must divide heads")
    if min(args.calib_samples, args.calib_seqlen) < 1:
        problems.append("--calib-samples and --calib-seqlen must be >= 1")
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child == "write":
        write_checkpoint(args)
    elif args.child:
        measure(args)
    else:
        run_table(args, args.depths, args.methods)


if __name__ == "__main__":
    main()
