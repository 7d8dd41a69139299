"""Where a method's quantization time goes: cProfile around `quantize` on the first blocks of the packaged model,
the top operations by own time, and the process's user/system CPU seconds and minor page faults.

    python benchmarks/profile_quantize.py --method awq --blocks 2 --n-samples 32 --batch-size 8
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/profile_quantize.py --method awq ...   # with huge pages (docs/memory.md)
    python benchmarks/profile_quantize.py --method gptq --blocks 6

Packaged SmolLM2-135M (weights from a 4-bit GGUF), wiki calibration (seed 0). A benchmark, not a test: the figures
depend on the machine, which it prints.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["awq", "gptq"], required=True)
    parser.add_argument("--blocks", type=int, default=2, help="first N decoder blocks of the packaged model")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=None, help="default: 64 for awq, 128 for gptq")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per forward (default: the method's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from core.spec import QuantSpec
    from harness.config import ModelConfig, TextSourceConfig
    from harness.data import calibration_tokens
    from harness.models import default_cache_dir, load_model
    from harness.provenance import device_name, git_sha
    from methods.awq import AWQ, AWQConfig
    from methods.gptq import GPTQ, GPTQConfig
    from structure.architectures import layout_for

    model, tokenizer = load_model(ModelConfig(), torch.device("cpu"))
    calib = calibration_tokens("wiki", TextSourceConfig(kind="wiki"), tokenizer, default_cache_dir(),
                               args.n_samples, args.seqlen, 0)
    layout = layout_for(model)
    del layout.blocks(model)[args.blocks:]
    model.config.num_hidden_layers = args.blocks
    batch = {} if args.batch_size is None else {"batch_size": args.batch_size}
    method = AWQ(AWQConfig(**batch)) if args.method == "awq" else GPTQ(GPTQConfig(**batch))
    group = args.group_size or (64 if args.method == "awq" else 128)

    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    method.quantize(model, layout, QuantSpec(args.bits, group), calib.tokens, torch.device("cpu"))
    profile.disable()
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"# {device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"commit {git_sha()}; {args.method} w{args.bits}g{group}, first {args.blocks} blocks, calibration "
          f"{args.n_samples} x {args.seqlen}, batch {method.config.batch_size}")
    print(f"wall {wall:.2f} s; process user {usage.ru_utime:.1f} s, system {usage.ru_stime:.1f} s, "
          f"minor page faults {usage.ru_minflt}")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
