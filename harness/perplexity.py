"""Perplexity with the GPTQ/AWQ protocol: non-overlapping windows of `seqlen`, tail dropped,
ppl = exp(mean token NLL over all windows). Models that need BOS get it at the start of every window
(the window then holds seqlen - 1 text tokens)."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def make_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None, bos_id: int | None) -> torch.Tensor:
    """int64 [T] -> int64 [n_windows, seqlen]; with bos_id each row is [BOS] + seqlen-1 tokens."""
    body = seqlen - (bos_id is not None)
    n = tokens.numel() // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"only {tokens.numel()} eval tokens: fewer than one window of eval.seqlen={seqlen}")
    windows = tokens[: n * body].reshape(n, body)
    if bos_id is not None:
        windows = torch.cat([torch.full((n, 1), bos_id, dtype=windows.dtype), windows], dim=1)
    return windows


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, device: torch.device, desc: str = "ppl") -> dict:
    """Evaluate windows [n, seqlen]; returns {ppl, nll (mean), tokens (predicted), windows, wall_s}."""
    start = time.perf_counter()
    nll_sum, n_predicted = 0.0, 0
    for row in tqdm(windows, desc=desc, unit="window", leave=False):
        ids = row[None].to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        nll_sum += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        n_predicted += ids.shape[1] - 1
    mean_nll = nll_sum / n_predicted
    if not math.isfinite(mean_nll):
        raise FloatingPointError(f"{desc}: non-finite mean NLL ({mean_nll}); the model produced NaN/Inf logits")
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "tokens": n_predicted, "windows": int(windows.shape[0]),
            "wall_s": time.perf_counter() - start}
