"""lm-eval at batch size 1 against larger batches on the packaged SmolLM2-135M, side by side in one process: wall
time, requests per second, and the largest log-likelihood difference from batch 1 (batching must not change them).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_lmeval_batch.py --limit 100 --batch-sizes 1 8 16 32

The quick eval's workload by default (arc_easy, piqa, hellaswag, 100 documents each: 999 requests). Batch sizes
run in the order given, alternated over --repeats; the medians and the ratio to batch 1 are printed. The packaged
model's weights are dequantized from a 4-bit GGUF (Q4_1).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from harness.config import ModelConfig
from harness.lmeval import LMEvalConfig, run_lm_eval
from harness.models import load_model
from harness.provenance import device_name, git_sha


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="arc_easy,piqa,hellaswag")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    if args.batch_sizes[0] != 1:
        args.batch_sizes.insert(0, 1)
    model, tokenizer = load_model(ModelConfig(), torch.device("cpu"))[:2]
    times: dict[int, list[float]] = {b: [] for b in args.batch_sizes}
    lls: dict[int, np.ndarray] = {}
    accs: dict[int, np.ndarray] = {}
    for _ in range(args.repeats):
        for size in args.batch_sizes:
            cfg = LMEvalConfig(tasks=args.tasks.split(","), limit=args.limit, batch_size=size, passthrough=False)
            start = time.perf_counter()
            _, docs = run_lm_eval(model, tokenizer, cfg, torch.device("cpu"))
            times[size].append(time.perf_counter() - start)
            docs = docs.sort_values(["task", "doc_id"])
            lls[size] = np.concatenate([np.asarray(x, float) for x in docs["loglikelihoods"]])
            accs[size] = docs[["acc", "acc_norm"]].to_numpy()
    requests = len(lls[1])
    print(f"# lm-eval {args.tasks}, limit {args.limit} ({requests} requests); packaged SmolLM2-135M (weights "
          f"dequantized from a 4-bit GGUF); {device_name('cpu')}; commit {git_sha()}; median of {args.repeats}")
    print("| batch | wall s | requests/s | vs batch 1 | max abs Δ loglik | per-doc outcomes equal |")
    print("|---:|---:|---:|---:|---:|---|")
    base = statistics.median(times[1])
    for size in args.batch_sizes:
        t = statistics.median(times[size])
        delta = float(np.max(np.abs(lls[size] - lls[1])))
        print(f"| {size} | {t:.1f} | {requests / t:.1f} | {base / t:.2f}x | {delta:.2e} | "
              f"{bool((accs[size] == accs[1]).all())} |")


if __name__ == "__main__":
    main()
