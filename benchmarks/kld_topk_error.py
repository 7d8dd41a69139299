"""How far a top-k + tail-bucket KLD (what llama.cpp-style caches keep) is from the exact KLD, on the packaged model.

This measurement is why the harness caches the baseline's lm_head input instead (exact; harness/teacher.py):
see docs/statistics.md.

    python benchmarks/kld_topk_error.py --windows 2 --ks 8 16 32 64 128 256

The baseline is the packaged SmolLM2-135M (weights dequantized from a 4-bit GGUF), the quantized model RTN w4 g128
and w3 g128 (fake-quant); both on the first windows of the wiki eval split. Prints, per k, the mean bucketed KLD,
the mean exact KLD and their relative difference (the bucketed value is a lower bound).
"""
from __future__ import annotations

import argparse
import copy

import torch


def bucketed_kld(lq: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per position from P's top-k (logp, idx) [L, k]: exact over the top-k plus the tail bucket
    p_tail log(p_tail / q_tail), a lower bound of the exact value (log-sum inequality)."""
    p = top_logp.exp()
    lq_top = lq.gather(-1, top_idx)
    tiny = torch.finfo(lq.dtype).tiny
    p_tail = (1 - p.sum(-1)).clamp(min=tiny)
    q_tail = (1 - lq_top.exp().sum(-1)).clamp(min=tiny)
    return (p * (top_logp - lq_top)).sum(-1) + p_tail * (p_tail.log() - q_tail.log())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    ap.add_argument("--specs", nargs="+", default=["4,128", "3,128"])
    args = ap.parse_args()

    from core.quant import quantize_weight
    from core.spec import QuantSpec
    from harness.config import ModelConfig, TextSourceConfig
    from harness.data import eval_tokens
    from harness.models import default_cache_dir, load_model
    from harness.perplexity import make_windows
    from harness.teacher import window_logprobs
    from structure.architectures import apply_artifacts, layout_for

    cpu = torch.device("cpu")
    model, tok = load_model(ModelConfig(), cpu)
    tokens = eval_tokens("wiki", TextSourceConfig(kind="wiki"), tok, default_cache_dir(), args.windows * args.seqlen)
    windows = make_windows(tokens.tokens, args.seqlen, args.windows, None)
    layout = layout_for(model)
    print(f"# packaged SmolLM2-135M (weights from a 4-bit GGUF); {args.windows} wiki windows of {args.seqlen}")
    print(f"{'spec':8} {'k':>5} {'bucketed':>10} {'exact':>10} {'rel diff':>9} {'tail mass':>9}")
    with torch.no_grad():
        base = [window_logprobs(model, w[None]) for w in windows]
        for spec_text in args.specs:
            bits, group = map(int, spec_text.split(","))
            q = copy.deepcopy(model)
            apply_artifacts(q, {n: quantize_weight(lin.weight.data, QuantSpec(bits, group))
                                for n, lin in layout.quantizable_linears(q).items()})
            quant = [window_logprobs(q, w[None]) for w in windows]
            exact = torch.cat([(lp.exp() * (lp - lq)).sum(-1) for lp, lq in zip(base, quant)])
            for k in args.ks:
                tops = [lp.topk(k, dim=-1) for lp in base]
                bucketed = torch.cat([bucketed_kld(lq, t.values, t.indices) for t, lq in zip(tops, quant)])
                tail = torch.cat([1 - t.values.exp().sum(-1) for t in tops]).mean().item()
                rel = (exact.mean() - bucketed.mean()).item() / exact.mean().item()
                print(f"w{bits}g{group:<5} {k:5d} {bucketed.mean().item():10.5f} {exact.mean().item():10.5f} "
                      f"{rel:9.2%} {tail:9.4f}", flush=True)


if __name__ == "__main__":
    main()
