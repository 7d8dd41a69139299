"""The unquantized model on the eval windows (the "teacher" of the KL divergence), computed once per model and
eval tokens, and cached.

What is kept is the input of the output layer (lm_head) at every predicted position. Every method leaves lm_head,
the final norm and the embeddings untouched, so at evaluation the quantized model's own lm_head turns it back into
the baseline's exact logits: the KLD is exact, and `method=fp` gets KLD 0 exactly. It costs hidden_size x 4 bytes
per token (2.3 GB per million tokens for SmolLM2-135M, hidden 576) and one extra lm_head product per window,
computed a chunk of positions at a time (structure/head.py).
Keeping top-k log-probs plus a tail bucket instead was measured and rejected: on SmolLM2 the bucketed KLD is 16%
below the exact one at k = 32 and still 1.9% below at k = 1024 (benchmarks/kld_topk_error.py, docs/statistics.md).
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from harness.identity import stable_hash
from analysis.integrity import read_or_quarantine, read_sealed, write_sealed
from structure.head import at_least_fp32, lm_head_input
from structure.layerwise import layerwise_lm_head_inputs
from structure.pipeline import BlockPipeline

log = logging.getLogger(__name__)


def window_logprobs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """log-softmax of the full next-token logits of one window through the model's own forward: ids [1, L] ->
    [L - 1, vocab] (at least fp32). The reference the chunked evaluator is tested against."""
    logits = model(ids, use_cache=False).logits[0, :-1]
    return torch.log_softmax(at_least_fp32(logits), dim=-1)


@torch.no_grad()
def compute_teacher(pipeline: BlockPipeline, windows: torch.Tensor, desc: str = "baseline") -> torch.Tensor:
    """lm_head inputs of the unquantized model on windows [n, L] -> [n, L, hidden] (fp32, fp64 for an fp64
    model); a streamed model computes them layer by layer."""
    if pipeline.streamed:
        return layerwise_lm_head_inputs(pipeline, windows, spill_dir=pipeline.residency.scratch,
                                        desc=desc).cpu().clone()
    return torch.stack([lm_head_input(pipeline.model, row[None].to(pipeline.device)).cpu()
                        for row in tqdm(windows, desc=desc, unit="window", leave=False)])


def teachers(pipeline: BlockPipeline, windows: dict[str, torch.Tensor], prints: dict[str, str], model_print: str,
             cache: Path) -> dict[str, torch.Tensor]:
    """{eval set: baseline lm_head inputs}, read from the cache or computed with the pipeline's model, which must
    still be unquantized."""
    found = {}
    for name, w in windows.items():
        key = {"model_fingerprint": model_print, "tokens": prints[f"eval:{name}"], "windows": list(w.shape),
               "first_ids": w[:, :2].tolist(), "kind": "lm_head_input, all window rows"}
        path = Path(cache) / "teacher" / f"{stable_hash(key, 20)}.pt"
        if (hidden := _cached(path, key)) is not None:
            found[name] = hidden
            continue
        log.info("computing the unquantized model on %s (once; cached in %s)", name, path.parent)
        found[name] = compute_teacher(pipeline, w, desc=f"baseline {name}")
        buffer = io.BytesIO()
        torch.save({"key": key, "hidden": found[name]}, buffer)
        write_sealed(path, buffer.getvalue())
    return found


def _cached(path: Path, key: dict) -> torch.Tensor | None:
    """The cached baseline for exactly `key`, verified against its checksum; a damaged entry is moved aside."""
    if not path.exists():
        return None
    entry = read_or_quarantine(path, lambda: torch.load(io.BytesIO(read_sealed(path)), map_location="cpu",
                                                        weights_only=True))
    if entry is None or stable_hash(entry.get("key"), 64) != stable_hash(key, 64):
        return None
    return entry["hidden"]
