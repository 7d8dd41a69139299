"""GPTQ and AWQ wall time per decoder block on the upcycled MoE against the dense model it was built from, side by
side in one process, on the same calibration tokens.

    python benchmarks/bench_moe.py                                  # first 4 blocks, 32 x 512, w4 g128, Mixtral layout
    python benchmarks/bench_moe.py --blocks 30 --layout qwen2_moe --methods gptq

The dense model is the packaged SmolLM2-135M (weights from a 4-bit GGUF); the MoE is it upcycled (harness/upcycle.py:
8 experts, top-2, each a perturbed copy of the dense MLP). Each block's time is the method's step on that block (its
calibration forwards, statistics and quantization), taken inside the pipeline's walk; configurations alternate
dense/MoE per method so drift on a shared machine hits both. Prints the machine, threads and commit beside the
figures. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


class TimedPipeline:
    """Wraps a BlockPipeline's calibrated pass so each block's step is timed (seconds per block, in order)."""

    def __init__(self, pipeline) -> None:
        self.pipeline, self.seconds = pipeline, []

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def calibrated_pass(self, step, calib, desc, batch_size=1, records=None):
        def timed(ctx):
            start = time.perf_counter()
            try:
                return step(ctx)
            finally:
                self.seconds.append(time.perf_counter() - start)

        return self.pipeline.calibrated_pass(timed, calib, desc, batch_size, records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4, help="first N decoder blocks of each model")
    parser.add_argument("--layout", default="mixtral", choices=["mixtral", "qwen2_moe"])
    parser.add_argument("--methods", default="gptq,awq")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from core.spec import QuantSpec
    from harness.config import ModelConfig, TextSourceConfig
    from harness.data import calibration_tokens
    from harness.models import default_cache_dir, load_model
    from harness.provenance import device_name, git_sha
    from methods import build_method
    from methods.awq import AWQConfig
    from methods.gptq import GPTQConfig
    from structure.architectures import layout_for
    from structure.pipeline import BlockPipeline

    models = {"dense": ModelConfig(), "moe": ModelConfig(name="smollm2_moe", upcycle=args.layout)}
    calib = None
    spec = QuantSpec(args.bits, args.group_size)
    configs = {"gptq": GPTQConfig(), "awq": AWQConfig()}
    print(f"# {device_name(torch.device('cpu'))}, {args.threads} threads, torch {torch.__version__}, commit "
          f"{git_sha()}; w{args.bits}g{args.group_size}, first {args.blocks} blocks, calibration {args.n_samples} x "
          f"{args.seqlen} wiki (seed 0); MoE: {args.layout} layout, 8 experts, top-2")
    print(f"{'method':>6} {'model':>6} {'s/block (median)':>17} {'total s':>8}  per block")
    for method in args.methods.split(","):
        medians = {}
        for label, model_cfg in models.items():
            model, tokenizer = load_model(model_cfg, torch.device("cpu"))
            if calib is None:
                calib = calibration_tokens("wiki", TextSourceConfig(kind="wiki"), tokenizer, default_cache_dir(),
                                           args.n_samples, args.seqlen, 0).tokens
            layout = layout_for(model)
            del layout.blocks(model)[args.blocks:]
            model.config.num_hidden_layers = args.blocks
            timed = TimedPipeline(BlockPipeline(model, layout, torch.device("cpu")))
            build_method(configs[method]).quantize_blocks(timed, spec, calib)
            medians[label] = statistics.median(timed.seconds)
            print(f"{method:>6} {label:>6} {medians[label]:>17.2f} {sum(timed.seconds):>8.1f}  "
                  + " ".join(f"{s:.1f}" for s in timed.seconds))
            del model
        print(f"{method:>6}  MoE / dense per block: {medians['moe'] / medians['dense']:.2f}x")


if __name__ == "__main__":
    main()
