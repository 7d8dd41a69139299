"""GPTQ with and without the output cache (structure.blockwise.OutputCache), side by side in one process: wall time
per configuration, their ratio, and a check that both give bit-identical codes, scales and zeros.

    python benchmarks/bench_gptq_output_cache.py                       # first 4 blocks, 32 x 512, w4g128
    python benchmarks/bench_gptq_output_cache.py --blocks 30 --repeats 1

The cache only saves recomputation (the outputs of linears and attentions already quantized); a difference in any
artifact is an error. Timings alternate A/B/A/B so drift on a shared machine hits both; the machine's CPU and
thread count are printed beside them. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4, help="first N decoder blocks of the packaged model")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from core.spec import QuantSpec
    from harness.config import ModelConfig, TextSourceConfig
    from harness.data import calibration_tokens
    from harness.models import default_cache_dir, load_model
    from harness.provenance import device_name, git_sha
    from methods.gptq import GPTQ, GPTQConfig
    from structure.architectures import layout_for

    base, tokenizer = load_model(ModelConfig(), torch.device("cpu"))
    calib = calibration_tokens("wiki", TextSourceConfig(kind="wiki"), tokenizer, default_cache_dir(),
                               args.n_samples, args.seqlen, 0)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    layout = layout_for(base)
    del layout.blocks(base)[args.blocks:]
    base.config.num_hidden_layers = args.blocks

    def run(cache_gb: float):
        base.load_state_dict(state, strict=False)
        start = time.perf_counter()
        result = GPTQ(GPTQConfig(output_cache_gb=cache_gb)).quantize(
            base, layout, QuantSpec(args.bits, args.group_size), calib.tokens, torch.device("cpu"))
        return time.perf_counter() - start, result.artifacts

    times: dict[float, list[float]] = {0.0: [], 2.0: []}
    arts = {}
    for _ in range(args.repeats):
        for gb in times:
            wall, arts[gb] = run(gb)
            times[gb].append(wall)
    same = all(torch.equal(getattr(arts[0.0][n], f), getattr(arts[2.0][n], f))
               for n in arts[0.0] for f in ("codes", "scales", "zeros"))
    print(f"# {device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"commit {git_sha()}; packaged SmolLM2-135M (weights from a 4-bit GGUF), first {args.blocks} blocks, "
          f"w{args.bits}g{args.group_size}, calibration {args.n_samples} x {args.seqlen}, {args.repeats} repeats")
    print("output_cache_gb  wall s (each)              median")
    for gb, walls in times.items():
        print(f"{gb:>15}  {', '.join(f'{w:.2f}' for w in walls):<25}  {statistics.median(walls):.2f}")
    print(f"ratio cached / uncached: {statistics.median(times[2.0]) / statistics.median(times[0.0]):.3f}; "
          f"artifacts bit-identical: {same}")
    if not same:
        raise SystemExit("the output cache changed the quantized weights: that is a bug")


if __name__ == "__main__":
    main()
