"""A streamed run of a checkpoint larger than the machine's free memory: wall time per pass against the time it
takes to read the checkpoint from disk, and the peak RSS.

    python benchmarks/bench_big_checkpoint.py --dir /big/disk/llama13b              # 13B shape, bf16, ~24.6 GiB
    python benchmarks/bench_big_checkpoint.py --dir /tmp/small --hidden 256 --intermediate 512 --layers 2 \\
        --heads 4 --kv-heads 4                                                        # a smoke run

1. Writes a random-weight Llama checkpoint (default: the 13B shape, hidden 5120, intermediate 13824, 40 blocks,
   40 heads, bf16, untied head, the packaged SmolLM2 tokenizer and its 49152-token vocabulary) shard by shard:
   no step holds more than one shard of tensors. An existing complete checkpoint in --dir is reused.
2. Times one sequential read of every shard (what the disk delivers; the checkpoint is larger than the page cache
   can keep, so this is the disk's speed, not memory's).
3. Runs `python -m harness model=hf model.path=DIR model.streaming=true method=<method> eval=ppl
   eval.seqlen=512 eval.max_windows=1 eval.ppl_sets=[wiki]` in a child process (its peak RSS is its own) with an
   empty cache directory (every pass is computed) and reads the run's stage rows: load, fingerprint, baseline,
   quantize, ppl. Also the child's minor page faults and user/system CPU seconds (those do not depend on what
   else the machine runs).

Prints one table: pass, wall seconds, passes' wall over the disk-read time, and the child's peak RSS. Nothing
here is a test: the numbers depend on the machine (it prints the CPU and the disk-read rate beside them).
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

REPO = Path(__file__).resolve().parent.parent


def write_checkpoint(directory: Path, args: argparse.Namespace) -> None:
    """Random weights (normal, sd 0.02; norms 1) written shard by shard, with config, index and tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from harness.config import ModelConfig
    from harness.models import load_model
    from structure.streaming import skeleton

    done = directory / "model.safetensors.index.json"
    if done.exists():
        print(f"# reusing the checkpoint in {directory}")
        return
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = load_model(ModelConfig(), torch.device("cpu"))[1]  # the packaged tokenizer (and its vocabulary)
    config = AutoConfig.for_model("llama", hidden_size=args.hidden, intermediate_size=args.intermediate,
                                  num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                  num_key_value_heads=args.kv_heads, vocab_size=len(tokenizer),
                                  max_position_embeddings=4096, tie_word_embeddings=False,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.torch_dtype = "bfloat16"
    shapes = {n: tuple(p.shape) for n, p in skeleton(config, torch.bfloat16).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    shard, shard_bytes, index, number = {}, 0, {}, 0
    names = list(shapes)

    def flush() -> None:
        nonlocal shard, shard_bytes, number
        number += 1
        name = f"model-{number:05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        index.update({n: name for n in shard})
        print(f"#   wrote {name} ({shard_bytes / 2**30:.2f} GiB)", flush=True)
        shard, shard_bytes = {}, 0

    for n in names:
        shape = shapes[n]
        if n.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        size = t.numel() * 2
        if shard and shard_bytes + size > args.shard_gib * 2**30:
            flush()
        shard[n], shard_bytes = t, shard_bytes + size
    flush()
    total = sum((directory / f).stat().st_size for f in set(index.values()))
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    os.replace(tmp, done)  # written last: a checkpoint without it is incomplete and rewritten


def read_seconds(directory: Path) -> tuple[float, int]:
    """One sequential read of every shard, 16 MiB at a time: (seconds, bytes)."""
    start, total = time.perf_counter(), 0
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(1 << 24):
                total += len(chunk)
    return time.perf_counter() - start, total


def run_streamed(directory: Path, method: str, results: Path) -> tuple[dict[str, float], float, dict]:
    """(stage seconds, child wall seconds, the child's peak RSS, minor page faults and user/system CPU seconds) of
    one streamed harness run."""
    import pandas as pd

    code = ("import resource, runpy, sys; sys.argv = sys.argv[1:]\n"
            "try:\n    runpy.run_module('harness', run_name='__main__')\n"
            "finally:\n    u = resource.getrusage(resource.RUSAGE_SELF)\n"
            "    print('RUSAGE', u.ru_maxrss, u.ru_minflt, u.ru_utime, u.ru_stime, file=sys.stderr)")
    argv = [sys.executable, "-c", code, "harness", "model=hf", f"model.path={directory}", "model.streaming=true",
            f"method={method}", "eval=ppl", "eval.seqlen=512", "eval.max_windows=1", "eval.ppl_sets=[wiki]",
            f"results_dir={results}", f"cache_dir={results / 'cache'}", "hydra.run.dir=" + str(results / "hydra")]
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"the streamed run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    usage = next(line.split()[1:] for line in proc.stderr.splitlines() if line.startswith("RUSAGE"))
    rows = pd.concat(pd.read_parquet(p) for p in results.glob("*/rows.parquet"))
    stages = rows[rows.suite == "stage"].set_index("metric")["value"].to_dict()
    return stages, wall, {"peak_gib": int(usage[0]) / 2**20, "minor_faults": int(usage[1]),
                          "user_s": float(usage[2]), "sys_s": float(usage[3])}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True, help="where the checkpoint is written (or reused)")
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--intermediate", type=int, default=13824)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--kv-heads", type=int, default=40)
    ap.add_argument("--shard-gib", type=float, default=2.0)
    ap.add_argument("--method", default="rtn")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from harness.provenance import device_name, git_sha
    from structure.streaming import available_memory

    import torch

    start = time.perf_counter()
    write_checkpoint(args.dir, args)
    print(f"# checkpoint ready in {time.perf_counter() - start:.0f} s")
    disk_s, size = read_seconds(args.dir)
    free = available_memory(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="bench_big_") as tmp:
        stages, wall, usage = run_streamed(args.dir, args.method, Path(tmp))
    print(f"# {args.layers} blocks, hidden {args.hidden}, bf16: {size / 2**30:.1f} GiB on disk, "
          f"{free / 2**30:.1f} GiB free memory; one read of it: {disk_s:.0f} s ({size / disk_s / 2**20:.0f} MiB/s)")
    print(f"# {device_name('cpu')}; commit {git_sha()}; method={args.method}, 1 window of 512 tokens (wiki)")
    print("| pass | wall s | / disk read |\n|---|---:|---:|")
    for name, seconds in stages.items():
        print(f"| {name.removesuffix('_s')} | {seconds:.0f} | {seconds / disk_s:.2f} |")
    print(f"| whole run (child process) | {wall:.0f} | {wall / disk_s:.2f} |")
    print(f"peak RSS of the run: {usage['peak_gib']:.2f} GiB; minor page faults: {usage['minor_faults']:,}; "
          f"CPU: {usage['user_s']:.0f} s user, {usage['sys_s']:.0f} s system (the kernel's share: page faults)")


if __name__ == "__main__":
    main()
