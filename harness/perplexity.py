"""Perplexity with the GPTQ/AWQ protocol: non-overlapping windows of `seqlen`, tail dropped,
ppl = exp(mean token NLL over all windows). Models that need BOS get it at the start of every window
(the window then holds seqlen - 1 text tokens)."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from analysis import stats
from analysis.summary import interval_text
from harness.config import RunConfig
from harness.data import eval_tokens
from harness.teacher import Baseline
from structure.head import head_logits, lm_head_input, position_chunks, stats_pieces
from structure.layerwise import layerwise_lm_head_inputs
from structure.pipeline import BlockPipeline

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


def _piece_stats(out: dict[str, torch.Tensor], window: int, at: slice, logits_q: torch.Tensor, target: torch.Tensor,
                 baseline: Baseline | None, logits_p: torch.Tensor | None, hidden_q: torch.Tensor) -> None:
    """Fill out[...][window, at] from the logits of the evaluated model (q) at those positions and the baseline (p):
    its logits there, or its summary (harness/teacher.py) with the lm_head inputs hidden_q. With lse = logsumexp:
    nll = lse_q - logit_q[target], and the exact KL(P || Q) = sum_v p_v (logit_p - logit_q)_v - (lse_p - lse_q),
    which is 0 exactly when the logits agree."""
    lse_q = torch.logsumexp(logits_q, dim=-1)
    lq_target = logits_q.gather(-1, target)[:, 0] - lse_q
    out["nll"][window, at] = -lq_target.double().cpu()
    if baseline is None:
        return
    if logits_p is not None:
        lse_p = torch.logsumexp(logits_p, dim=-1)
        lp_target = logits_p.gather(-1, target)[:, 0] - lse_p
        p = torch.exp(logits_p - lse_p[:, None])
        kld = torch.linalg.vecdot(p, logits_p - logits_q) - (lse_p - lse_q)
        top1_p = logits_p.argmax(-1)
    else:  # sum_v p_v (logit_p - logit_q)_v = e . (h_p - h_q); identical inputs give identical distributions
        hidden_p = baseline.hidden[window, at].to(hidden_q.device)
        lse_p = baseline.lse[window, at].to(lse_q.device)
        lp_target = baseline.target_logprob[window, at].to(lse_q.device)
        top1_p = baseline.top1[window, at].to(lse_q.device)
        moved = (hidden_p.double() - hidden_q.double())
        kld = torch.linalg.vecdot(baseline.expected[window, at].to(moved.device).double(), moved) \
            - (lse_p.double() - lse_q.double())
        kld = kld.masked_fill((moved == 0).all(-1), 0.0)
    out["base_nll"][window, at] = -lp_target.double().cpu()
    out["kld"][window, at] = kld.double().cpu()
    out["same_top1"][window, at] = (logits_q.argmax(-1) == top1_p).double().cpu()
    out["dp"][window, at] = (lq_target.exp() - lp_target.exp()).double().cpu()


@torch.no_grad()
def token_stats(model: torch.nn.Module, windows: torch.Tensor, device: torch.device,
                teacher: Baseline | None = None, desc: str = "ppl",
                hidden_of=None) -> dict[str, np.ndarray]:
    """Per predicted token of every window ([n_windows, seqlen - 1] each): nll; and against the baseline (teacher:
    the unquantized model on the same windows, harness/teacher.py), base_nll, kld = KL(P_baseline || Q) exactly
    over the vocabulary, same_top1 (1 where the argmax tokens agree) and dp (change in p of the true next token).

    The logits are computed a chunk of positions at a time from the lm_head input, so memory does not grow with
    vocabulary x window; the baseline's logits only when it is not summarized. `hidden_of(i, ids)` gives window i's
    lm_head input (default: the model's own forward; the layer-wise evaluator passes the inputs it computed block by
    block)."""
    if teacher is not None and tuple(teacher.hidden.shape[:2]) != tuple(windows.shape):
        raise ValueError(f"{desc}: the baseline holds {tuple(teacher.hidden.shape[:2])} window positions, the eval "
                         f"has {tuple(windows.shape)}; the baseline cache does not belong to these windows")
    hidden_of = hidden_of or (lambda i, ids: lm_head_input(model, ids))
    keys = ("nll",) if teacher is None else ("nll", "base_nll", "kld", "same_top1", "dp")
    n, length = windows.shape
    out = {k: torch.zeros(n, length - 1, dtype=torch.float64) for k in keys}
    vocab = model.get_output_embeddings().weight.shape[0]
    both_logits = teacher is not None and not teacher.summarized
    for i, row in enumerate(tqdm(windows, desc=desc, unit="window", leave=False)):
        ids = row[None].to(device)
        hidden = hidden_of(i, ids)
        for chunk in position_chunks(length, vocab):
            # every row of the chunk is multiplied (the last position predicts nothing and is dropped after), so a
            # window that is one chunk is the very product of the model's own forward
            logits_q = head_logits(model, hidden[chunk])
            logits_p = head_logits(model, teacher.hidden[i][chunk]) if both_logits else None
            # the statistics run over smaller pieces of the chunk, which stay in the CPU's cache
            for piece in stats_pieces(logits_q.shape[0], vocab):
                at = slice(chunk.start + piece.start, min(chunk.start + piece.stop, length - 1))
                if at.start >= at.stop:
                    break
                used = slice(piece.start, piece.start + at.stop - at.start)
                _piece_stats(out, i, at, logits_q[used], ids[0, at.start + 1:at.stop + 1, None], teacher,
                             None if logits_p is None else logits_p[used], hidden[at])
    stats_ = {k: v.numpy() for k, v in out.items()}
    if not np.isfinite(stats_["nll"]).all():
        raise FloatingPointError(f"{desc}: non-finite NLL; the model produced NaN/Inf logits")
    return stats_


def model_token_stats(pipeline: BlockPipeline, windows: torch.Tensor, teacher: Baseline | None = None,
                      desc: str = "ppl", prepare_block=None) -> dict[str, np.ndarray]:
    """token_stats of any model: a streamed one is run layer by layer (structure/layerwise.py), with
    `prepare_block(i, block)` writing each block's quantized weights as it is loaded; the numbers are those of the
    ordinary forward."""
    model, device = pipeline.model, pipeline.device
    if not pipeline.streamed:
        return token_stats(model, windows, device, teacher, desc=desc)
    inputs = layerwise_lm_head_inputs(pipeline, windows, prepare_block, pipeline.residency.scratch,
                                      desc=f"{desc}: blocks")
    with pipeline.outside_blocks():
        return token_stats(model, windows, device, teacher, desc=desc, hidden_of=lambda i, ids: inputs[i].to(device))


def perplexity(pipeline: BlockPipeline, windows: torch.Tensor, desc: str = "ppl", prepare_block=None) -> dict:
    """Evaluate windows [n, seqlen]; returns {ppl, nll (mean), tokens (predicted), windows, wall_s,
    window_nll (mean NLL of each window)} (model_token_stats without a baseline, aggregated)."""
    start = time.perf_counter()
    nll = model_token_stats(pipeline, windows, desc=desc, prepare_block=prepare_block)["nll"]
    mean_nll = float(nll.sum() / nll.size)
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "tokens": int(nll.size), "windows": int(windows.shape[0]),
            "wall_s": time.perf_counter() - start, "window_nll": nll.mean(axis=1).tolist()}


def block_records(name: str, per_token: dict[str, np.ndarray], block: int) -> pd.DataFrame:
    """Sums over consecutive blocks of `block` tokens of each window (the resampling units of every interval)."""
    n, length = per_token["nll"].shape
    starts = np.arange(0, length, block)
    frame = {"task": name, "window": np.repeat(np.arange(n), len(starts)), "block": np.tile(np.arange(len(starts)), n),
             "tokens": np.tile(np.diff(np.append(starts, length)), n)}
    for key, values in per_token.items():
        frame[f"{key}_sum"] = np.add.reduceat(values, starts, axis=1).reshape(-1)
    if "dp" in per_token:
        frame["dp_sq_sum"] = np.add.reduceat(per_token["dp"] ** 2, starts, axis=1).reshape(-1)
    return pd.DataFrame(frame)


def _row(name: str, metric: str, est: stats.Estimate | float, n: int | None = None, detail: dict | None = None) -> dict:
    if not isinstance(est, stats.Estimate):
        return {"suite": "ppl", "task": name, "metric": metric, "value": float(est), "n": n,
                "detail": json.dumps(detail) if detail else None}
    detail = {**(detail or {}), "blocks": est.n, **({"ci": est.note} if est.note else {})}
    return {"suite": "ppl", "task": name, "metric": metric, **est.columns(), "n": n, "detail": json.dumps(detail)}


def set_rows(name: str, records: pd.DataFrame, kld_tokens: np.ndarray | None, windows: int,
             wall_s: float) -> list[dict]:
    """The rows of one eval set: ppl with its interval over blocks; with a baseline, the ratio to the baseline's
    ppl (paired interval), mean KLD and top-1 agreement and Δp with intervals, KLD percentiles."""
    tokens = records.tokens.to_numpy()
    n = int(tokens.sum())
    rows = [_row(name, "ppl", stats.perplexity(records.nll_sum, tokens), n),
            _row(name, "tokens", n), _row(name, "windows", windows), _row(name, "wall_s", wall_s)]
    if kld_tokens is None:
        return rows
    rows += [_row(name, "base_ppl", stats.perplexity(records.base_nll_sum, tokens), n),
             _row(name, "ppl_ratio_vs_base", stats.paired_ratio(records.nll_sum, records.base_nll_sum, tokens), n),
             _row(name, "kld", stats.ratio_of_sums(records.kld_sum, tokens), n),
             _row(name, "top1_agree", stats.proportion_over_blocks(records.same_top1_sum, tokens), n),
             _row(name, "dp_mean", stats.ratio_of_sums(records.dp_sum, tokens), n),
             _row(name, "dp_rms", stats.ratio_of_sums(records.dp_sq_sum, tokens, transform=np.sqrt), n)]
    flat = kld_tokens.reshape(-1)
    for label, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9), ("max", 100)):
        rows.append(_row(name, f"kld_{label}", float(np.percentile(flat, q)), n))
    return rows


def evaluate_perplexity(pipeline: BlockPipeline, windows: dict[str, torch.Tensor],
                        teachers: dict[str, Baseline] | None = None, block: int = 256,
                        prepare_block=None) -> tuple[list[dict], pd.DataFrame]:
    """The ppl evaluator: (rows per eval set, per-block records of every set). With `teachers` (the unquantized
    model's distributions on the same windows) it adds the KLD, top-1 agreement and Δp rows. A streamed model is
    evaluated layer by layer (model_token_stats)."""
    rows, records = [], []
    for name, w in windows.items():
        start = time.perf_counter()
        teacher = None if teachers is None else teachers[name]
        per_token = model_token_stats(pipeline, w, teacher, desc=f"ppl {name}", prepare_block=prepare_block)
        blocks = block_records(name, per_token, block)
        rows += set_rows(name, blocks, per_token.get("kld"), int(w.shape[0]), time.perf_counter() - start)
        records.append(blocks)
        ppl = next(r for r in rows if r["task"] == name and r["metric"] == "ppl")
        log.info("ppl %-8s %s (%d windows, %d tokens)", name,
                 interval_text(ppl["value"], ppl.get("ci_low"), ppl.get("ci_high")), w.shape[0], ppl["n"])
    return rows, pd.concat(records, ignore_index=True) if records else pd.DataFrame()


def check_agreement(what: str, packed_nll: float, reference_nll: float, rtol: float = PACKED_PPL_RTOL) -> None:
    """Raise DisagreementError when exp(packed_nll) and exp(reference_nll), the ppl of one window through packed
    layers and through the fake-quantized weights, differ by more than `rtol` relative."""
    ratio = math.exp(packed_nll - reference_nll) if math.isfinite(packed_nll) else math.inf
    if not abs(ratio - 1) <= rtol:
        raise DisagreementError(
            f"{what}: ppl through the packed layers is {math.exp(min(packed_nll, 700)):.6g}, the fake-quantized "
            f"model gives {math.exp(reference_nll):.6g} on the same tokens (ratio {ratio:.4g}, allowed 1 +- {rtol:g}); "
            "the packed path is wrong on this machine, so no result is written")
