"""lm-eval's own loop at batch size 1 against larger batches and against shared-context scoring
(harness/lm_scoring.py) on the packaged SmolLM2-135M, side by side in one process: wall time, requests per second,
and the largest log-likelihood difference from lm-eval's loop at batch 1 (neither may change them).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_lmeval_batch.py --limit 100 --batch-sizes 8 \
        --shared-batch-sizes 4 8 16 32

The quick eval's workload by default (arc_easy, piqa, hellaswag, 100 documents each: 999 requests). Variants run
in the order given, alternated over --repeats; the medians and the ratio to lm-eval's loop at batch 1 are
printed. The packaged model's weights are dequantized from a 4-bit GGUF (Q4_1).
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
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[8], help="lm-eval's own loop (1 always runs)")
    ap.add_argument("--shared-batch-sizes", type=int, nargs="*", default=[8], help="shared contexts per forward")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    variants = [("lm-eval loop", 1)] + [("lm-eval loop", b) for b in args.batch_sizes if b != 1]
    variants += [("shared context", b) for b in args.shared_batch_sizes]
    model, tokenizer = load_model(ModelConfig(), torch.device("cpu"))[:2]
    times: dict[tuple, list[float]] = {v: [] for v in variants}
    lls: dict[tuple, np.ndarray] = {}
    accs: dict[tuple, np.ndarray] = {}
    for _ in range(args.repeats):
        for variant in variants:
            cfg = LMEvalConfig(tasks=args.tasks.split(","), limit=args.limit, batch_size=variant[1],
                               share_context=variant[0] == "shared context", passthrough=False)
            start = time.perf_counter()
            _, docs = run_lm_eval(model, tokenizer, cfg, torch.device("cpu"))
            times[variant].append(time.perf_counter() - start)
            docs = docs.sort_values(["task", "doc_id"])
            lls[variant] = np.concatenate([np.asarray(x, float) for x in docs["loglikelihoods"]])
            accs[variant] = docs[["acc", "acc_norm"]].to_numpy()
    reference = variants[0]
    requests = len(lls[reference])
    print(f"# lm-eval {args.tasks}, limit {args.limit} ({requests} requests); packaged SmolLM2-135M (weights "
          f"dequantized from a 4-bit GGUF); {device_name('cpu')}; commit {git_sha()}; median of {args.repeats}")
    print("| scoring | batch | wall s | requests/s | vs lm-eval loop at 1 | max abs Δ loglik | per-doc outcomes equal |")
    print("|---|---:|---:|---:|---:|---:|---|")
    base = statistics.median(times[reference])
    for variant in variants:
        t = statistics.median(times[variant])
        delta = float(np.max(np.abs(lls[variant] - lls[reference])))
        print(f"| {variant[0]} | {variant[1]} | {t:.1f} | {requests / t:.1f} | {base / t:.2f}x | {delta:.2e} | "
              f"{bool((accs[variant] == accs[reference]).all())} |")


if __name__ == "__main__":
    main()
