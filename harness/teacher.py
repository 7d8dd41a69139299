"""The unquantized model on the eval windows (the "teacher" of the KL divergence), computed once per model and
eval tokens, and cached.

What is kept is the input of the output layer (lm_head) at every predicted position. Every method leaves lm_head,
the final norm and the embeddings untouched, so at evaluation the quantized model's own lm_head turns it back into
the baseline's exact logits: the KLD is exact, and `method=fp` gets KLD 0 exactly. It costs hidden_size x 4 bytes
per token (2.3 GB per million tokens for SmolLM2-135M, hidden 576).

For a plain linear output layer computed in fp32 or wider (no logit soft-capping), the baseline is also summarized
once per position, so that evaluating a quantized model needs no second lm_head product: its log-sum-exp, the
log-probability of the true next token, its argmax, and the expected output embedding e = sum_v p_v W_v under the
baseline's distribution p. Since every logit difference is linear in the lm_head inputs, logit_p - logit_q =
W (h_p - h_q), the exact KLD is
    KL(P || Q) = sum_v p_v (logit_p - logit_q)_v - (lse_p - lse_q) = e . (h_p - h_q) - (lse_p - lse_q)
(the bias cancels), 0 exactly where h_q = h_p. Against the KLD computed in fp64 on SmolLM2 w4 (benchmarks/
bench_kld_cost.py, docs/statistics.md) it is off by at most 1.2e-4 nats per token and 1.1e-6 relative on the mean;
the full-logit formula in fp32 by 1.4e-5 and 8e-8. That doubles the cache (hidden x 8 bytes per token) and moves
one lm_head product, and one more for e, into the baseline, which is computed once and reused by every run on the
same model and tokens. Other heads
(bf16 weights, Gemma's soft-capping) keep the lm_head inputs only and are evaluated through both logits.
Keeping top-k log-probs plus a tail bucket instead was measured and rejected: on SmolLM2 the bucketed KLD is 16%
below the exact one at k = 32 and still 1.9% below at k = 1024 (benchmarks/kld_topk_error.py, docs/statistics.md).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from harness.identity import stable_hash
from harness.locks import computed_once
from harness.sealed import load_sealed_for, save_sealed
from structure.head import at_least_fp32, head_logits, lm_head_input, position_chunks, stats_pieces
from structure.layerwise import layerwise_lm_head_inputs
from structure.pipeline import BlockPipeline

log = logging.getLogger(__name__)


def window_logprobs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """log-softmax of the full next-token logits of one window through the model's own forward: ids [1, L] ->
    [L - 1, vocab] (at least fp32). The reference the chunked evaluator is tested against."""
    logits = model(ids, use_cache=False).logits[0, :-1]
    return torch.log_softmax(at_least_fp32(logits), dim=-1)


@dataclass
class Baseline:
    """The unquantized model on eval windows [n, L]: its lm_head inputs, and (summarizable heads) per position the
    log-sum-exp of its logits, the log-probability of the true next token (the last position predicts none: 0),
    its argmax, and the expected output embedding (module docstring)."""

    hidden: torch.Tensor                      # [n, L, hidden]
    lse: torch.Tensor | None = None           # [n, L]
    target_logprob: torch.Tensor | None = None  # [n, L]
    top1: torch.Tensor | None = None          # [n, L] int64
    expected: torch.Tensor | None = None      # [n, L, hidden]

    @property
    def summarized(self) -> bool:
        return self.expected is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def summarizable(model: torch.nn.Module) -> bool:
    """A plain linear output layer with fp32 or wider weights and no logit soft-capping: logit differences are then
    W (h_p - h_q), computed as exactly as the logits themselves."""
    head = model.get_output_embeddings()
    return (isinstance(head, torch.nn.Linear) and head.weight.dtype in (torch.float32, torch.float64)
            and getattr(model.config, "final_logit_softcapping", None) is None)


@torch.no_grad()
def summarize(model: torch.nn.Module, hidden: torch.Tensor, windows: torch.Tensor) -> Baseline:
    """The Baseline of lm_head inputs [n, L, hidden] on windows [n, L], with the summary where the head allows it.
    Chunks and pieces of positions are those of the evaluator (perplexity.token_stats), so that the same lm_head
    input gives bit-identical log-sum-exps on both sides."""
    if not summarizable(model):
        return Baseline(hidden)
    n, length = windows.shape
    weight = model.get_output_embeddings().weight
    vocab = weight.shape[0]
    out = Baseline(hidden, lse=torch.zeros(n, length, dtype=hidden.dtype),
                   target_logprob=torch.zeros(n, length, dtype=hidden.dtype),
                   top1=torch.zeros(n, length, dtype=torch.long), expected=torch.zeros_like(hidden))
    for i in range(n):
        h = hidden[i].to(weight.device)
        for chunk in position_chunks(length, vocab):
            logits = head_logits(model, h[chunk])
            for piece in stats_pieces(logits.shape[0], vocab):
                at = slice(chunk.start + piece.start, chunk.start + piece.stop)
                part = logits[piece]
                lse = torch.logsumexp(part, dim=-1)
                out.lse[i, at] = lse.cpu()
                out.top1[i, at] = part.argmax(-1).cpu()
                scored = slice(at.start, min(at.stop, length - 1))
                if scored.start < scored.stop:
                    rows = slice(0, scored.stop - scored.start)
                    target = windows[i, scored.start + 1:scored.stop + 1].to(part.device)
                    out.target_logprob[i, scored] = (part[rows].gather(-1, target[:, None])[:, 0] - lse[rows]).cpu()
            # one product per chunk: products of a few rows over the whole vocabulary were measured 6x less
            # accurate (~1e-4 relative on SmolLM2)
            p = logits.sub_(out.lse[i, chunk].to(logits.device, logits.dtype)[:, None]).exp_()  # logits are done with
            out.expected[i, chunk] = (p @ weight.to(p.dtype)).to(hidden.dtype).cpu()
    return out


@torch.no_grad()
def compute_teacher(pipeline: BlockPipeline, windows: torch.Tensor, desc: str = "baseline") -> Baseline:
    """The Baseline of the unquantized model on windows [n, L] (lm_head inputs in fp32, fp64 for an fp64 model); a
    streamed model computes them layer by layer."""
    if pipeline.streamed:
        hidden = layerwise_lm_head_inputs(pipeline, windows, spill_dir=pipeline.residency.scratch,
                                          desc=desc).cpu().clone()
    else:
        hidden = torch.stack([lm_head_input(pipeline.model, row[None].to(pipeline.device)).cpu()
                              for row in tqdm(windows, desc=desc, unit="window", leave=False)])
    with pipeline.outside_blocks():
        return summarize(pipeline.model, hidden, windows)


def teachers(pipeline: BlockPipeline, windows: dict[str, torch.Tensor], prints: dict[str, str], model_print: str,
             cache: Path) -> dict[str, Baseline]:
    """{eval set: Baseline}, read from the cache or computed with the pipeline's model, which must
    still be unquantized."""
    found = {}
    for name, w in windows.items():
        key = {"model_fingerprint": model_print, "tokens": prints[f"eval:{name}"], "windows": list(w.shape),
               "first_ids": w[:, :2].tolist(), "kind": "lm_head_input and its summary, all window rows"}
        path = Path(cache) / "teacher" / f"{stable_hash(key, 20)}.pt"

        def compute(name=name, w=w, key=key, path=path) -> Baseline:
            log.info("computing the unquantized model on %s (once; cached in %s)", name, path.parent)
            baseline = compute_teacher(pipeline, w, desc=f"baseline {name}")
            save_sealed(path, {"key": key, **baseline.tensors()})
            return baseline

        # jobs starting together on a fresh cache: one computes it, the others wait and then read it (verified)
        found[name] = computed_once(path, "baseline", f"baseline {name}", lambda: _cached(path, key), compute)
    return found


def _cached(path: Path, key: dict) -> Baseline | None:
    """The cached baseline for exactly `key`, verified against its checksum; a damaged entry is moved aside."""
    if (entry := load_sealed_for(path, key)) is None:
        return None
    return Baseline(**{f.name: entry.get(f.name) for f in fields(Baseline)})
