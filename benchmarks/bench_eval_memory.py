"""Peak memory of a perplexity + KLD evaluation on a large-vocabulary model: the full-logits path (what the
evaluator did before: the model's own forward, whole-window logits and log-softmaxes) against the chunked one
(harness.perplexity.token_stats: lm_head input, logits a chunk of positions at a time). Each runs in a fresh
process, so its peak RSS is its own.

    python benchmarks/bench_eval_memory.py               # Gemma-3-shaped: vocab 262144, ~1 GB of fp32 weights

The model is a random gemma3_text built from a config (vocab 262144, hidden 640, 4 blocks): the shape of the
family's output end, which is what the evaluation's memory depends on. Prints per path: weights, peak RSS, peak
above the weights, and the NLL and KLD sums, which must agree between the paths.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys


def build(vocab: int, hidden: int, layers: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma3_text", vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                  layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
                                  sliding_window=512, max_position_embeddings=4096,
                                  initializer_range=0.05)  # logits far from uniform
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> float:
    """Reset this process's peak RSS (Linux: clear_refs 5) to the current RSS, so that the peak measured next
    belongs to the evaluation alone, not to building the model; returns the RSS now, in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def child(path: str, vocab: int, hidden: int, layers: int, seqlen: int) -> None:
    import torch

    torch.set_grad_enabled(False)
    model = build(vocab, hidden, layers)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, vocab, (1, seqlen), generator=torch.Generator().manual_seed(1))
    # the baseline is the model before one block's MLP gets noise (not a scale: Gemma's post-norms would undo it)
    from harness.teacher import summarize
    from structure.head import lm_head_input

    teacher = lm_head_input(model, ids)[None]
    baseline = summarize(model, teacher, ids)  # what the harness caches (summarized where the head allows)
    w = model.model.layers[0].mlp.down_proj.weight
    w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(2)) * w.std())
    before = _reset_peak()
    if path == "full":
        from harness.teacher import window_logprobs

        lq = window_logprobs(model, ids)
        head = model.get_output_embeddings()
        lp = torch.log_softmax(head(teacher)[0, :-1], dim=-1)
        nll = float(-lq.gather(-1, ids[0, 1:, None]).sum())
        kld = float(torch.nn.functional.kl_div(lq, lp, reduction="none", log_target=True).sum())
    else:
        from harness.perplexity import token_stats

        got = token_stats(model, ids, torch.device("cpu"), baseline)
        nll, kld = float(got["nll"].sum()), float(got["kld"].sum())
    peak = _status_mb("VmHWM")
    print(json.dumps({"weights_mb": weights / 2**20, "before_eval_mb": before, "peak_mb": peak,
                      "nll_sum": nll, "kld_sum": kld}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--child", choices=["full", "chunked"])
    args = ap.parse_args()
    if args.child:
        child(args.child, args.vocab, args.hidden, args.layers, args.seqlen)
        return
    from harness.provenance import device_name

    import torch

    print(f"# {device_name(torch.device('cpu'))}; random gemma3_text, vocab {args.vocab}, hidden {args.hidden}, "
          f"{args.layers} blocks; one window of {args.seqlen}, ppl + KLD; torch {torch.__version__}")
    print(f"{'path':8s} {'weights MB':>10s} {'RSS before eval':>15s} {'peak RSS MB':>11s} {'peak - before':>13s} "
          f"{'NLL sum':>12s} {'KLD sum':>12s}")
    results = {}
    for path in ("full", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--child", path, "--vocab", str(args.vocab), "--hidden",
                              str(args.hidden), "--layers", str(args.layers), "--seqlen", str(args.seqlen)],
                             check=True, capture_output=True, text=True).stdout
        r = results[path] = json.loads(out.strip().splitlines()[-1])
        print(f"{path:8s} {r['weights_mb']:10.0f} {r['before_eval_mb']:15.0f} {r['peak_mb']:11.0f} "
              f"{r['peak_mb'] - r['before_eval_mb']:13.0f} {r['nll_sum']:12.4f} {r['kld_sum']:12.6f}")
    full, chunked = results["full"], results["chunked"]
    print(f"peak RSS chunked / full: {chunked['peak_mb'] / full['peak_mb']:.3f}; NLL sums differ by "
          f"{abs(full['nll_sum'] - chunked['nll_sum']) / abs(full['nll_sum']):.2e} relative, KLD sums by "
          f"{abs(full['kld_sum'] - chunked['kld_sum']) / abs(full['kld_sum']):.2e}")


if __name__ == "__main__":
    main()
