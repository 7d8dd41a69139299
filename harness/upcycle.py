"""A mixture of experts that speaks, built offline from the packaged dense model by sparse upcycling.

No full-precision MoE checkpoint installs offline, and random MoE weights make every quality comparison meaningless.
So the MoE test bed is SmolLM2-135M (the packaged model, itself dequantized from a 4-bit GGUF) upcycled as
Komatsuzaki et al. (2022) do: every expert is a copy of the block's dense MLP with a small perturbation of its own
(relative Gaussian noise, `NOISE`), behind a router built so that routing is uneven, as real routers' is:

    router logit of expert e for token x = bias[e] + TAU * (r_e . (x - mean)) / std_e

with r_e a random direction, mean and std_e measured on calibration text at that block's MLP input, and the biases
drawn from N(0, BIAS_SD^2), so some experts are hot and some are rarely chosen. The bias is carried by the token
mean (a router has no bias term): weight_e = TAU r_e / std_e + (bias_e - TAU r_e . mean / std_e) mean / |mean|^2.

Layouts (`model.upcycle`): "mixtral" (8 experts, top-2, renormalised top-2 weights) and "qwen2_moe" (the same
experts plus the dense MLP as a shared expert: the routed experts' down projections carry half the output and the
shared expert, gated by sigmoid(0) = 1/2, the other half). Both attentions are Llama's, so attention, norms and
embeddings are copied exactly. There is no Qwen3-MoE layout: its attention normalises q and k per head (q_norm,
k_norm, sharing the model's one rms_norm_eps), which no choice of norm weights makes equal to SmolLM2's; the closest
(each norm scaled to its heads' typical RMS) measured wiki ppl 94.1 against the dense 12.75 (docs/moe.md), far from
a model that speaks. The builder is deterministic (SEED) and its output is keyed by the dense model's files and these
constants.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

LAYOUTS = ("mixtral", "qwen2_moe")
EXPERTS, TOP_K = 8, 2
NOISE = 0.02  # relative Gaussian perturbation of each expert's weights
BIAS_SD, TAU = 0.8, 1.0  # router: per-expert bias spread (uneven routing) and token-dependent part
SEED = 0
ROUTER_WINDOWS, ROUTER_SEQLEN = 8, 512  # wiki calibration text for the router's statistics (seed SEED)
VERSION = 1  # bump when the construction changes: the cache key changes with it


def recipe() -> dict:
    """Everything the construction depends on besides the dense model (it names the cached directory)."""
    return {"version": VERSION, "experts": EXPERTS, "top_k": TOP_K, "noise": NOISE, "bias_sd": BIAS_SD, "tau": TAU,
            "seed": SEED, "router_windows": ROUTER_WINDOWS, "router_seqlen": ROUTER_SEQLEN}


def moe_config(dense_config, layout: str):
    """The target MoE config: the dense model's shapes, EXPERTS experts of the dense MLP's width, top-TOP_K."""
    from transformers import AutoConfig

    if layout not in LAYOUTS:
        raise ValueError(f"model.upcycle={layout!r}; allowed values: {list(LAYOUTS)}")
    d = dense_config
    common = dict(vocab_size=d.vocab_size, hidden_size=d.hidden_size, num_hidden_layers=d.num_hidden_layers,
                  num_attention_heads=d.num_attention_heads, num_key_value_heads=d.num_key_value_heads,
                  head_dim=d.head_dim, max_position_embeddings=d.max_position_embeddings, rms_norm_eps=d.rms_norm_eps,
                  rope_parameters=dict(d.rope_parameters), hidden_act=d.hidden_act,
                  tie_word_embeddings=d.tie_word_embeddings, bos_token_id=d.bos_token_id,
                  eos_token_id=d.eos_token_id, pad_token_id=d.pad_token_id, num_experts_per_tok=TOP_K)
    if layout == "mixtral":
        return AutoConfig.for_model("mixtral", **common, intermediate_size=d.intermediate_size,
                                    num_local_experts=EXPERTS, sliding_window=None)
    return AutoConfig.for_model("qwen2_moe", **common, intermediate_size=d.intermediate_size,
                                moe_intermediate_size=d.intermediate_size,
                                shared_expert_intermediate_size=d.intermediate_size, num_experts=EXPERTS,
                                norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                                use_sliding_window=False, qkv_bias=False)


@torch.no_grad()
def router_statistics(dense, calib: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per block: the MLP input's token mean [H] and the tokens themselves ([T, H])."""
    inputs: dict[int, list[torch.Tensor]] = {}
    handles = [block.mlp.register_forward_pre_hook(
        lambda m, args, i=i: inputs.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for i, block in enumerate(dense.model.layers)]
    try:
        for row in calib:
            dense(row[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    tokens = [torch.cat(inputs[i]) for i in range(len(dense.model.layers))]
    return [t.mean(0) for t in tokens], tokens


def router_weight(mean: torch.Tensor, tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[EXPERTS, H]: logits bias_e + TAU * standardized random projection of (x - mean) (see the module docstring)."""
    hidden = mean.numel()
    directions = torch.randn(EXPERTS, hidden, generator=generator, dtype=torch.float64)
    centred = (tokens.double() - mean.double())
    std = (centred @ directions.T).std(0)  # [E]
    bias = BIAS_SD * torch.randn(EXPERTS, generator=generator, dtype=torch.float64)
    m = mean.double()
    weight = TAU * directions / std[:, None]
    weight += (bias - TAU * (directions @ m) / std)[:, None] * m[None, :] / m.dot(m)
    return weight.float()


def perturbed(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """w * (1 + NOISE * N(0, 1)), elementwise: an expert of its own, close to the dense MLP."""
    return w * (1 + NOISE * torch.randn(w.shape, generator=generator, dtype=torch.float32))


@torch.no_grad()
def upcycle(dense, layout: str, calib: torch.Tensor):
    """The MoE model of `layout` built from `dense` (a Llama-architecture model in memory); calib [n, L] is the
    text the routers' statistics come from."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    generator = torch.Generator().manual_seed(SEED)
    means, tokens = router_statistics(dense, calib)
    config = moe_config(dense.config, layout)
    with init_empty_weights(include_buffers=False):  # every parameter is set below: no random init to pay for
        moe = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {name: value.clone() for name, value in dense.state_dict().items()
             if ".mlp." not in name and name != "lm_head.weight"}  # embeddings, norms, attention: copied exactly
    half = layout == "qwen2_moe"  # routed experts carry half the output, the shared expert (gate 1/2) the rest
    for i in range(len(moe.model.layers)):
        dense_mlp, prefix = dense.model.layers[i].mlp, f"model.layers.{i}.mlp"
        gate_up, down = [], []
        for _ in range(EXPERTS):
            gate = perturbed(dense_mlp.gate_proj.weight, generator)
            up = perturbed(dense_mlp.up_proj.weight, generator)
            gate_up.append(torch.cat([gate, up]))
            down.append(perturbed(dense_mlp.down_proj.weight, generator) * (0.5 if half else 1.0))
        state[f"{prefix}.experts.gate_up_proj"] = torch.stack(gate_up)
        state[f"{prefix}.experts.down_proj"] = torch.stack(down)
        state[f"{prefix}.gate.weight"] = router_weight(means[i], tokens[i], generator)
        if half:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                state[f"{prefix}.shared_expert.{proj}.weight"] = getattr(dense_mlp, proj).weight.clone()
            state[f"{prefix}.shared_expert_gate.weight"] = torch.zeros(1, dense.config.hidden_size)  # sigmoid: 1/2
    missing, unexpected = moe.load_state_dict(state, strict=False, assign=True)
    missing = [n for n in missing if not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"upcycling to {layout}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if config.tie_word_embeddings:
        moe.tie_weights()
    left = [n for n, p in moe.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"upcycling to {layout}: parameters left unset: {left[:4]}")
    return moe


def upcycled_directory(cache_dir: Path, dense_dir: Path, layout: str) -> Path:
    """Where the upcycled model of `layout` lives: named by the dense model's directory (itself named by its GGUF's
    hash) and the recipe."""
    import hashlib

    key = hashlib.sha256(json.dumps({"dense": dense_dir.name, "layout": layout, **recipe()},
                                    sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir / "models" / f"smollm2_moe_{layout}-{key}"


def build_upcycled(cache_dir: Path, dense_dir: Path, layout: str) -> Path:
    """Build (once; verified on every reuse, rebuilt if damaged) and return the directory of the upcycled model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from analysis.integrity import read_or_quarantine, verify_manifest, write_manifest
    from harness.config import TextSourceConfig
    from harness.data import calibration_tokens

    target = upcycled_directory(cache_dir, dense_dir, layout)
    if target.exists() and read_or_quarantine(target, lambda: verify_manifest(target)):
        return target
    log.info("building the upcycled %s MoE from %s in %s (one time, about a minute)", layout, dense_dir.name, target)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    calib = calibration_tokens("wiki", TextSourceConfig(kind="wiki"), tokenizer, cache_dir, ROUTER_WINDOWS,
                               ROUTER_SEQLEN, SEED)
    moe = upcycle(dense, layout, calib.tokens)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".upcycle-"))
    try:
        moe.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "UPCYCLE.json").write_text(json.dumps({"dense": dense_dir.name, "layout": layout, **recipe(),
                                                      "router_calibration": f"wiki, {calib.fingerprint}"}, indent=2))
        write_manifest(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    """python -m harness.upcycle [--layout mixtral|qwen2_moe|all] [--cache-dir DIR]: build the upcycled MoE(s) into
    the cache now (a run of model=smollm2_moe otherwise builds it the first time it needs it)."""
    import argparse

    from harness.models import convert_packaged, default_cache_dir

    parser = argparse.ArgumentParser(prog="python -m harness.upcycle", description=main.__doc__.splitlines()[0])
    parser.add_argument("--layout", default="mixtral", choices=[*LAYOUTS, "all"])
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $QUANT_HARNESS_CACHE or "
                        "~/.cache/quant-harness")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache = args.cache_dir or default_cache_dir()
    dense = convert_packaged(cache)
    for layout in LAYOUTS if args.layout == "all" else (args.layout,):
        print(build_upcycled(cache, dense, layout))


if __name__ == "__main__":
    main()
