"""How close the upcycled MoE test bed is to the dense model it came from, and how uneven its routing is: fp
perplexity of the dense packaged SmolLM2 and of each upcycled layout on the same wiki eval windows, and per block the
share of routed tokens each expert gets on them.

    python benchmarks/upcycle_quality.py                    # 2 x 2048 wiki eval tokens, both layouts
    python benchmarks/upcycle_quality.py --qwen3-attempt    # also the Qwen3-MoE layout that harness/upcycle.py
                                                            # does not offer (why: its per-head q/k norms)
    python benchmarks/upcycle_quality.py --calib-samples 8,32,128   # also: how many experts would fall back

--calib-samples: for calibration draws of N x 512 wiki tokens (seed 0, as a run draws them), the share of the
tokens the Mixtral-layout model's routers send each expert, and how many experts get fewer than 0.5% of them
(method.moe_min_tokens' default: these are rounded to nearest). It routes the full-precision model, which is
exactly the routing AWQ's statistics see (AWQ feeds each block the full-precision output); GPTQ feeds each block
the quantized output, so its routing after block 0 differs a little (its runs record theirs: experts_fallback).

The packaged model's weights came from a 4-bit GGUF (Q4_1): "dense" here is that dequantized model. A benchmark, not
a test: prints the machine and commit beside the figures.
"""
from __future__ import annotations

import argparse
import math

import torch


@torch.no_grad()
def perplexity_and_routing(model, windows: torch.Tensor) -> tuple[float, torch.Tensor | None]:
    """(ppl over the windows, per block the share of tokens routed to each expert [blocks, E], None for dense)."""
    counts: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.model.layers):
        router = getattr(block.mlp, "gate", None)
        if router is not None and hasattr(router, "top_k"):
            handles.append(router.register_forward_hook(lambda m, a, out, i=i: counts.__setitem__(
                i, counts.get(i, 0) + torch.bincount(out[2].flatten(), minlength=out[0].shape[-1]))))
    nll, n = 0.0, 0
    try:
        for w in windows:
            logits = model(w[None]).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits.float(), w[1:], reduction="sum").item()
            n += w.numel() - 1
    finally:
        for h in handles:
            h.remove()
    shares = None
    if counts:
        stacked = torch.stack([counts[i] for i in sorted(counts)]).double()
        shares = stacked / (windows.numel())
    return math.exp(nll / n), shares


def qwen3_attempt(dense, calib: torch.Tensor):
    """The Qwen3-MoE layout built as harness/upcycle.py builds Mixtral, its per-head q/k RMS norms scaled to the
    heads' typical RMS on the calibration text (the closest we found to SmolLM2's unnormalised attention)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from harness import upcycle

    mixtral = upcycle.upcycle(dense, "mixtral", calib)
    d = dense.config
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=d.vocab_size, hidden_size=d.hidden_size, num_hidden_layers=d.num_hidden_layers,
        num_attention_heads=d.num_attention_heads, num_key_value_heads=d.num_key_value_heads, head_dim=d.head_dim,
        max_position_embeddings=d.max_position_embeddings, rms_norm_eps=d.rms_norm_eps,
        rope_parameters=dict(d.rope_parameters), tie_word_embeddings=d.tie_word_embeddings,
        intermediate_size=d.intermediate_size, moe_intermediate_size=d.intermediate_size,
        num_experts=upcycle.EXPERTS, num_experts_per_tok=upcycle.TOP_K, norm_topk_prob=True, mlp_only_layers=[],
        attention_bias=False)
    rms = {}
    handles = [proj.register_forward_hook(lambda m, a, out, key=(i, which): rms.setdefault(key, []).append(
        out.reshape(-1, d.head_dim).pow(2).mean(-1).sqrt().mean()))
        for i, block in enumerate(dense.model.layers)
        for which, proj in (("q", block.self_attn.q_proj), ("k", block.self_attn.k_proj))]
    with torch.no_grad():
        for row in calib:
            dense(row[None])
    for h in handles:
        h.remove()
    state = dict(mixtral.state_dict())
    state.pop("lm_head.weight", None)
    for i in range(d.num_hidden_layers):
        for which in ("q", "k"):
            state[f"model.layers.{i}.self_attn.{which}_norm.weight"] = torch.full(
                (d.head_dim,), float(torch.stack(rms[(i, which)]).mean()))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--qwen3-attempt", action="store_true")
    parser.add_argument("--calib-samples", default="", help="comma-separated calibration sizes, e.g. 8,32,128")
    parser.add_argument("--calib-seqlen", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness import upcycle
    from harness.config import TextSourceConfig
    from harness.data import calibration_tokens, eval_tokens
    from harness.models import convert_packaged, default_cache_dir
    from harness.provenance import device_name, git_sha

    cache = default_cache_dir()
    dense_dir = convert_packaged(cache)
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    tokens = eval_tokens("wiki", TextSourceConfig(kind="wiki"), tokenizer, cache, args.windows * args.seqlen).tokens
    windows = tokens[:args.windows * args.seqlen].reshape(args.windows, args.seqlen)
    print(f"# {device_name(torch.device('cpu'))}, {args.threads} threads, commit {git_sha()}; wiki eval, "
          f"{args.windows} x {args.seqlen} tokens; recipe {upcycle.recipe()}")
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    ppl, _ = perplexity_and_routing(dense, windows)
    print(f"{'dense SmolLM2-135M':<28} ppl {ppl:8.3f}")
    models = {layout: lambda layout=layout: AutoModelForCausalLM.from_pretrained(
        upcycle.build_upcycled(cache, dense_dir, layout), dtype=torch.float32).eval() for layout in upcycle.LAYOUTS}
    if args.qwen3_attempt:
        calib = calibration_tokens("wiki", TextSourceConfig(kind="wiki"), tokenizer, cache, upcycle.ROUTER_WINDOWS,
                                   upcycle.ROUTER_SEQLEN, upcycle.SEED).tokens
        models["qwen3_moe (attempt)"] = lambda: qwen3_attempt(dense, calib)
    for label, make in models.items():
        model = make()
        moe_ppl, shares = perplexity_and_routing(model, windows)
        print(f"{'upcycled ' + label:<28} ppl {moe_ppl:8.3f} ({moe_ppl / ppl - 1:+.1%} vs dense); experts with a "
              f"routed share < 0.5%: {int((shares < 0.005).sum())} of {shares.numel()}, < 2%: "
              f"{int((shares < 0.02).sum())}; hottest {float(shares.max()):.2f}, median max per block "
              f"{float(shares.max(1).values.median()):.2f}")
        del model
    if args.calib_samples:
        model = models["mixtral"]()
        print(f"\nrouting of calibration draws (wiki, seed 0, x {args.calib_seqlen} tokens), upcycled mixtral, full "
              "precision: experts under 0.5% of the calibration tokens (rounded to nearest by default)")
        for n in (int(x) for x in args.calib_samples.split(",")):
            calib = calibration_tokens("wiki", TextSourceConfig(kind="wiki"), tokenizer, cache, n, args.calib_seqlen,
                                       0).tokens
            _, shares = perplexity_and_routing(model, calib)
            print(f"  {n:>4} x {args.calib_seqlen}: {int((shares < 0.005).sum())} of {shares.numel()} experts under "
                  f"0.5% ({int((shares == 0).sum())} never chosen); smallest share {float(shares.min()):.4f}, "
                  f"median {float(shares.median()):.4f}, largest {float(shares.max()):.4f}")


if __name__ == "__main__":
    main()
