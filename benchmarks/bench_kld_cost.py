"""What KLD against the baseline costs on top of a perplexity-only evaluation, measured side by side in one process.

    python benchmarks/bench_kld_cost.py --windows 2 --repeats 3

The packaged SmolLM2-135M (weights from a 4-bit GGUF), RTN w4 g128 fake-quantized, wiki eval windows of 2048.
Prints the one-time cost of the baseline (cold cache: one unquantized forward per window), then the evaluation
time with and without KLD (warm cache), alternated so that machine load hits both alike, and their ratio; plus
the cache size per million tokens.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from core.quant import quantize_weight
    from core.spec import QuantSpec
    from harness.config import ModelConfig, TextSourceConfig
    from harness.data import eval_tokens
    from harness.models import default_cache_dir, load_model
    from harness.perplexity import make_windows, token_stats
    from harness.provenance import device_name
    from harness.teacher import compute_teacher
    from structure.architectures import apply_artifacts, layout_for
    from structure.pipeline import BlockPipeline

    cpu = torch.device("cpu")
    model, tok = load_model(ModelConfig(), cpu)
    windows = make_windows(eval_tokens("wiki", TextSourceConfig(kind="wiki"), tok, default_cache_dir(),
                                       args.windows * 2048).tokens, 2048, args.windows, None)
    t0 = time.perf_counter()
    teacher = compute_teacher(BlockPipeline(model, layout_for(model), cpu), windows)
    cold = time.perf_counter() - t0
    apply_artifacts(model, {n: quantize_weight(lin.weight.data, QuantSpec(4, 128))
                            for n, lin in layout_for(model).quantizable_linears(model).items()})
    times = {"ppl only": [], "ppl + KLD": []}
    for _ in range(args.repeats):
        for label, t in (("ppl only", None), ("ppl + KLD", teacher)):
            start = time.perf_counter()
            token_stats(model, windows, cpu, t)
            times[label].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    per_million = teacher[0].numel() * 4 / (windows.shape[1] - 1) * 1e6 / 2**30
    print(f"# {device_name(cpu)}; {args.windows} wiki windows of 2048; median of {args.repeats}, alternated")
    print(f"baseline, cold cache (one unquantized forward per window): {cold:.2f} s")
    for k, v in med.items():
        print(f"{k:10s} {v:7.2f} s   (runs: {', '.join(f'{x:.2f}' for x in times[k])})")
    paired = [b / a for a, b in zip(times["ppl only"], times["ppl + KLD"])]
    print(f"ratio (ppl + KLD) / ppl only: {med['ppl + KLD'] / med['ppl only']:.3f} (of the medians); per repeat "
          f"{', '.join(f'{r:.3f}' for r in paired)}, median {statistics.median(paired):.3f}")
    print(f"cache size: {per_million:.2f} GiB per million predicted tokens (hidden {teacher.shape[-1]} x fp32)")


if __name__ == "__main__":
    main()
