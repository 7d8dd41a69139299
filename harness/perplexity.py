"""Perplexity with the GPTQ/AWQ protocol: non-overlapping windows of `seqlen`, tail dropped,
ppl = exp(mean token NLL over all windows). Models that need BOS get it at the start of every window
(the window then holds seqlen - 1 text tokens)."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness.config import RunConfig
from harness.data import eval_tokens

log = logging.getLogger(__name__)


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


# A packed model's ppl must agree with the fake-quantized model's on the same window within this relative bound
# (the packed kernels run bf16/fp16 activations: measured differences are ~0.1%; a wrong layout is off by orders).
PACKED_PPL_RTOL = 0.01


class DisagreementError(RuntimeError):
    """A number computed through packed layers disagrees with the fake-quantized reference path."""


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, device: torch.device, desc: str = "ppl") -> dict:
    """Evaluate windows [n, seqlen]; returns {ppl, nll (mean), tokens (predicted), windows, wall_s,
    window_nll (mean NLL of each window)}."""
    start = time.perf_counter()
    nll_sum, n_predicted, window_nll = 0.0, 0, []
    for row in tqdm(windows, desc=desc, unit="window", leave=False):
        ids = row[None].to(device)
        logits = model(ids, use_cache=False).logits[0, :-1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least fp32; float64 stays
        window_sum = F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        nll_sum += window_sum
        n_predicted += ids.shape[1] - 1
        window_nll.append(window_sum / (ids.shape[1] - 1))
    mean_nll = nll_sum / n_predicted
    if not math.isfinite(mean_nll):
        raise FloatingPointError(f"{desc}: non-finite mean NLL ({mean_nll}); the model produced NaN/Inf logits")
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "tokens": n_predicted, "windows": int(windows.shape[0]),
            "wall_s": time.perf_counter() - start, "window_nll": window_nll}


def eval_windows(cfg: RunConfig, tokenizer, needs_bos: bool, cache: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """({eval set: windows [n, seqlen]}, {"eval:<set>": token fingerprint}) for every set in eval.ppl_sets,
    tokenized once per run."""
    bos_id = tokenizer.bos_token_id if needs_bos else None
    body = cfg.eval.seqlen - (bos_id is not None)
    windows, prints = {}, {}
    for name in cfg.eval.ppl_sets:
        n_tokens = None if cfg.eval.max_windows is None else cfg.eval.max_windows * body
        tokens = eval_tokens(name, cfg.data.sources[name], tokenizer, cache, n_tokens)
        prints[f"eval:{name}"] = tokens.fingerprint
        windows[name] = make_windows(tokens.tokens, cfg.eval.seqlen, cfg.eval.max_windows, bos_id)
    return windows, prints


def evaluate_perplexity(model: torch.nn.Module, windows: dict[str, torch.Tensor], device: torch.device) -> list[dict]:
    """The ppl evaluator: rows ppl (n = predicted tokens), tokens, windows and wall_s per eval set."""
    rows = []
    for name, w in windows.items():
        result = perplexity(model, w, device, desc=f"ppl {name}")
        log.info("ppl %-8s %.3f (%d windows, %d tokens, %.1fs)", name, result["ppl"], result["windows"],
                 result["tokens"], result["wall_s"])
        rows.append({"suite": "ppl", "task": name, "metric": "ppl", "value": result["ppl"], "n": result["tokens"]})
        rows += [{"suite": "ppl", "task": name, "metric": m, "value": result[m]} for m in ("tokens", "windows", "wall_s")]
    return rows


def check_agreement(what: str, packed_nll: float, reference_nll: float, rtol: float = PACKED_PPL_RTOL) -> None:
    """Raise DisagreementError when exp(packed_nll) and exp(reference_nll), the ppl of one window through packed
    layers and through the fake-quantized weights, differ by more than `rtol` relative."""
    ratio = math.exp(packed_nll - reference_nll) if math.isfinite(packed_nll) else math.inf
    if not abs(ratio - 1) <= rtol:
        raise DisagreementError(
            f"{what}: ppl through the packed layers is {math.exp(min(packed_nll, 700)):.6g}, the fake-quantized "
            f"model gives {math.exp(reference_nll):.6g} on the same tokens (ratio {ratio:.4g}, allowed 1 +- {rtol:g}); "
            "the packed path is wrong on this machine, so no result is written")
