"""The timing evaluator: generation throughput (prefill and greedy KV-cache decode) of the packed model against the
unquantized baseline in one process, plus the W4A16 GEMM microbenchmark (kernels/microbench.py) on request.

Tidy rows (suite="timing"). Every measurement is warmed up, repeated, and reported as the median with p10/p90 (and
the device name) in `detail`; nothing here asserts speed.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from harness.config import TimingConfig
from harness.provenance import device_name
from kernels.cpu_int4 import native_bf16
from kernels.microbench import gemm_microbench, summarize, synchronize, timing_row


# ------------------------------------------------------------------------------------------ generation
@torch.no_grad()
def greedy_generate(model: nn.Module, prompt: torch.Tensor, decode_tokens: int,
                    device: torch.device | str) -> tuple[torch.Tensor, float, float]:
    """Greedy KV-cache decoding: prompt int64 [B, P] -> (new tokens int64 [B, 1 + decode_tokens], prefill_s, decode_s).

    The prefill forward yields the first new token; then `decode_tokens` one-token steps each yield one more,
    so decode throughput = B * decode_tokens / decode_s.
    """
    synchronize(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    synchronize(device)
    t1 = time.perf_counter()
    tokens, past = [token], out.past_key_values
    for _ in range(decode_tokens):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens.append(token)
    synchronize(device)
    t2 = time.perf_counter()
    return torch.cat(tokens, dim=1), t1 - t0, t2 - t1


def time_generation(model: nn.Module, vocab_size: int, prompt_len: int, decode_tokens: int, batch_sizes: Sequence[int],
                    device: torch.device | str, warmup: int = 1, repeats: int = 3, seed: int = 0) -> list[dict]:
    """Prefill and decode tokens/s per batch size on seeded random prompts -> rows (median value, p10/p90 in detail)."""
    for name, v, low in (("prompt_len", prompt_len, 1), ("decode_tokens", decode_tokens, 1), ("repeats", repeats, 1),
                         ("warmup", warmup, 0), ("vocab_size", vocab_size, 1)):
        if v < low:
            raise ValueError(f"time_generation: {name}={v} must be >= {low}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"time_generation: batch_sizes={list(batch_sizes)} must be non-empty positive ints")
    device = torch.device(device)
    name = device_name(device)
    rows = []
    for B in batch_sizes:
        gen = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, vocab_size, (B, prompt_len), generator=gen).to(device)
        for _ in range(warmup):
            greedy_generate(model, prompt, decode_tokens, device)
        prefill, decode = [], []
        for _ in range(repeats):
            _, t_prefill, t_decode = greedy_generate(model, prompt, decode_tokens, device)
            prefill.append(B * prompt_len / t_prefill)
            decode.append(B * decode_tokens / t_decode)
        task = f"generate_bs{B}_p{prompt_len}"
        common = {"batch_size": B, "prompt_len": prompt_len, "decode_tokens": decode_tokens, "device": name,
                  "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
        for metric, samples in (("prefill_tokens_per_s", prefill), ("decode_tokens_per_s", decode)):
            s = summarize(samples)
            rows.append(timing_row(task, metric, s["median"], repeats, {**common, "p10": s["p10"], "p90": s["p90"]}))
    return rows


def linear_shapes(model: nn.Module, names: Sequence[str]) -> list[tuple[int, int]]:
    """Distinct (in_features, out_features) of the named linears, in first-seen order (for gemm_microbench)."""
    shapes = {}
    for name in names:
        module = model.get_submodule(name)
        shapes[(module.in_features, module.out_features)] = None
    return list(shapes)


# ------------------------------------------------------------------------------------------- evaluator
def evaluate_timing(t: TimingConfig, model: nn.Module, baseline: nn.Module | None, device: torch.device, seed: int,
                    shapes: Sequence[tuple[int, int]], group_size: int | None, backend: str) -> list[dict]:
    """The timing evaluator: prefill/decode speed of `model` (the packed quantized model) and of the unquantized
    `baseline` (None for an unquantized run), measured in this process, with speedups. Where bf16 is native (every
    GPU, CPUs with AVX512-BF16 or AMX) a bf16 copy of the baseline is timed too: there it is the fair 16-bit
    baseline. `t.gemm` adds the GEMM microbenchmark of `backend` on the model's own linear shapes."""
    vocab = model.config.vocab_size

    def timed(m: nn.Module, label: str) -> list[dict]:
        rows = time_generation(m, vocab, t.prompt_len, t.decode_tokens, t.batch_sizes, device, t.warmup, t.repeats,
                               seed)
        return [{**r, "metric": f"{label}_{r['metric']}" if label else r["metric"]} for r in rows]

    rows = timed(model, "")
    if baseline is not None:
        labels = ["baseline"]
        if baseline.dtype != torch.bfloat16 and (torch.device(device).type == "cuda" or native_bf16()):
            labels.append("baseline_bf16")
        for label in labels:
            if label == "baseline_bf16":
                baseline = baseline.to(torch.bfloat16)  # after the full-precision baseline was timed
            base_rows = timed(baseline, label)
            by_key = {(r["task"], r["metric"].removeprefix(f"{label}_")): r["value"] for r in base_rows}
            rows += base_rows + [
                {**r, "metric": r["metric"].replace("tokens_per_s", f"speedup_vs_{label}"),
                 "value": r["value"] / by_key[(r["task"], r["metric"])], "stderr": None}
                for r in rows if not r["metric"].startswith("baseline") and (r["task"], r["metric"]) in by_key]
    if t.gemm:
        rows += gemm_microbench(shapes, [1, 16, 128], group_size, [backend], device, t.repeats,
                                device_label=device_name(device))
    return rows
