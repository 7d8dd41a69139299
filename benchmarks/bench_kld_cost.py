"""What KLD against the baseline costs, measured side by side in one process.

    python benchmarks/bench_kld_cost.py --windows 2 --repeats 3

The packaged SmolLM2-135M (weights from a 4-bit GGUF), RTN w4 g128 fake-quantized, wiki eval windows of 2048.
Alternated over the repeats, so that machine load hits every variant alike:
- the baseline pass: the unquantized model's lm_head inputs alone (what a baseline was before it was summarized),
  and with the summary (harness/teacher.py: one lm_head product and the expected output embedding per position);
- the evaluation of the quantized model: ppl only; ppl + KLD against the summarized baseline; ppl + KLD through
  both models' logits (what heads that cannot be summarized get).
Prints medians, each evaluation's ratio to the plain baseline pass and to ppl only, the largest KLD difference
between the two KLD paths, and the cache size per million tokens.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def fp64_kld(model, baseline_hidden, windows):
    """KL(P || Q) per predicted token with both models' logits and softmaxes in fp64 (the accuracy reference)."""
    import numpy as np

    from structure.head import lm_head_input

    weight = model.get_output_embeddings().weight.double()
    out = []
    for i, row in enumerate(windows):
        lp = torch.log_softmax(baseline_hidden[i].double() @ weight.T, -1)[:-1]
        lq = torch.log_softmax(lm_head_input(model, row[None]).double() @ weight.T, -1)[:-1]
        out.append((lp.exp() * (lp - lq)).sum(-1).numpy())
    return np.stack(out)


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
    from harness.teacher import Baseline, compute_teacher
    from structure.head import lm_head_input
    from structure.architectures import apply_artifacts, layout_for
    from structure.pipeline import BlockPipeline

    cpu = torch.device("cpu")
    model, tok = load_model(ModelConfig(), cpu)
    windows = make_windows(eval_tokens("wiki", TextSourceConfig(kind="wiki"), tok, default_cache_dir(),
                                       args.windows * 2048).tokens, 2048, args.windows, None)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    torch.set_grad_enabled(False)
    pipeline = BlockPipeline(model, layout_for(model), cpu)
    baseline = compute_teacher(pipeline, windows)
    plain = Baseline(baseline.hidden)
    variants = {"baseline: lm_head inputs": lambda: [lm_head_input(model, row[None]) for row in windows],
                "baseline: with summary": lambda: compute_teacher(pipeline, windows)}
    quantized = {"ppl only": None, "ppl + KLD (summary)": baseline, "ppl + KLD (both logits)": plain}
    times = {k: [] for k in [*variants, *quantized]}
    kld = {}
    for _ in range(args.repeats):
        model.load_state_dict(original)
        for label, run in variants.items():
            start = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - start)
        apply_artifacts(model, {n: quantize_weight(lin.weight.data, QuantSpec(4, 128))
                                for n, lin in layout_for(model).quantizable_linears(model).items()})
        for label, teacher in quantized.items():
            start = time.perf_counter()
            got = token_stats(model, windows, cpu, teacher)
            times[label].append(time.perf_counter() - start)
            kld[label] = got.get("kld")
    med = {k: statistics.median(v) for k, v in times.items()}
    base, ppl = med["baseline: lm_head inputs"], med["ppl only"]
    print(f"# {device_name(cpu)}; torch {torch.__version__}; {torch.get_num_threads()} threads; {args.windows} wiki "
          f"windows of 2048; median of {args.repeats}, alternated; packaged SmolLM2-135M (weights from a 4-bit GGUF)")
    print("| pass | median s | / baseline lm_head inputs | / ppl only | runs |")
    print("|---|---:|---:|---:|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} | {v / base:.3f} | {v / ppl:.3f} | {', '.join(f'{x:.2f}' for x in times[k])} |")
    exact = fp64_kld(model, baseline.hidden, windows)
    print(f"KLD against its fp64 computation (mean KLD {exact.mean():.4f}):")
    for label in ("ppl + KLD (summary)", "ppl + KLD (both logits)"):
        err = kld[label] - exact
        print(f"  {label}: max |error| per token {abs(err).max():.2e}, error of the mean "
              f"{err.mean() / exact.mean():+.1e} relative")
    per_million = sum(t[0].numel() * t.element_size() for t in baseline.tensors().values()) / (windows.shape[1] - 1)
    print(f"cache size: {per_million * 1e6 / 2**30:.2f} GiB per million predicted tokens (hidden "
          f"{baseline.hidden.shape[-1]}: lm_head inputs and expected embeddings in fp32, 3 scalars)")


if __name__ == "__main__":
    main()
