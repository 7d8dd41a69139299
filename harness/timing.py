"""Timing evaluators: generation throughput (prefill and greedy KV-cache decode) and a W4A16 GEMM microbenchmark.

Both return tidy rows (suite="timing"). Every measurement is warmed up, repeated, and reported as the
median with p10/p90 (and the device name) in `detail`; nothing here asserts speed.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from core.spec import QuantizedWeights
from harness.config import TimingConfig
from harness.provenance import device_name
from kernels.cpu_int4 import DENSE_FROM_M, dense_dtype, native_bf16
from kernels.quant_linear import QuantLinear, check_backend_device, unsupported_reason

SUITE = "timing"


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on `device` (a no-op on CPU), so wall-clock timings cover the kernels."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (q in [0, 100]) of a non-empty sequence."""
    if not samples:
        raise ValueError("percentile of no samples")
    s = sorted(samples)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """{median, p10, p90} of the samples."""
    return {"median": percentile(samples, 50), "p10": percentile(samples, 10), "p90": percentile(samples, 90)}


def _row(task: str, metric: str, value: float, n: int | None, detail: dict | None) -> dict:
    return {"suite": SUITE, "task": task, "metric": metric, "value": float(value), "stderr": None, "n": n,
            "detail": None if detail is None else json.dumps(detail, separators=(",", ":"))}


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
            rows.append(_row(task, metric, s["median"], repeats, {**common, "p10": s["p10"], "p90": s["p90"]}))
    return rows


def linear_shapes(model: nn.Module, names: Sequence[str]) -> list[tuple[int, int]]:
    """Distinct (in_features, out_features) of the named linears, in first-seen order (for gemm_microbench)."""
    shapes = {}
    for name in names:
        module = model.get_submodule(name)
        shapes[(module.in_features, module.out_features)] = None
    return list(shapes)


# ------------------------------------------------------------------------------------------------ GEMM
def random_artifact(in_features: int, out_features: int, group_size: int | None, seed: int = 0) -> QuantizedWeights:
    """A seeded random 4-bit artifact [out, in] with weight-like scales (~0.01), for timing (values do not matter)."""
    gen = torch.Generator().manual_seed(seed)
    n_groups = 1 if group_size is None else -(-in_features // group_size)
    codes = torch.randint(0, 16, (out_features, in_features), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (out_features, n_groups), generator=gen, dtype=torch.uint8)
    scales = 0.005 + 0.01 * torch.rand(out_features, n_groups, generator=gen)
    return QuantizedWeights(codes=codes, scales=scales, zeros=zeros, bits=4, group_size=group_size)


def _calibrate_inner(fn: Callable[[], object], device: torch.device, min_sample_s: float) -> int:
    """Calls per timed sample so one sample lasts about min_sample_s (timer resolution and launch jitter)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    once = max(time.perf_counter() - t0, 1e-7)
    return max(1, math.ceil(min_sample_s / once))


def _time_sample(fn: Callable[[], object], device: torch.device, inner: int) -> float:
    """Seconds per call, averaged over `inner` back-to-back calls."""
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / inner


@torch.no_grad()
def gemm_microbench(shapes: Sequence[tuple[int, int]], ms: Sequence[int], group_size: int | None,
                    backends: Sequence[str], device: torch.device | str, repeats: int = 5, warmup: int = 2,
                    min_sample_s: float = 0.02, seed: int = 0) -> list[dict]:
    """Latency of x [M, in] @ W.T for each (in, out) shape, M and backend, next to dense baselines timed round-robin
    in the same loop -> rows: ms per backend and dense/backend speedups.

    `dense` is fp16 on GPU and fp32 on CPU; `dense_bf16` joins it where bf16 is native (every GPU, CPUs with
    AVX512-BF16 or AMX), since there bf16 is the fair 16-bit baseline."""
    device = torch.device(device)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"gemm_microbench: repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    for backend in backends:
        check_backend_device(backend, device)
    dense = {"dense": torch.float16 if device.type == "cuda" else torch.float32}
    if device.type == "cuda" or native_bf16():
        dense["dense_bf16"] = torch.bfloat16
    name = device_name(device)
    rows = []
    for in_features, out_features in shapes:
        art = random_artifact(in_features, out_features, group_size, seed)
        for backend in backends:
            reason = unsupported_reason(backend, art)
            if reason is not None:
                raise ValueError(f"gemm_microbench: backend={backend!r} cannot run {in_features}x{out_features}: "
                                 f"{reason}")
        layers = {b: QuantLinear(art, None, b).to(device) for b in backends}
        w_dense = {k: art.dequantize(dtype).to(device) for k, dtype in dense.items()}
        for M in ms:
            x32 = torch.randn(M, in_features, generator=torch.Generator().manual_seed(seed)).to(device)
            xs = {k: x32.to(dtype) for k, dtype in dense.items()}
            calls = {k: (lambda k=k: nn.functional.linear(xs[k], w_dense[k])) for k in dense}
            calls.update({b: (lambda layer=layer: layer(xs["dense"])) for b, layer in layers.items()})
            for fn in calls.values():
                for _ in range(warmup):
                    fn()
            inner = {k: _calibrate_inner(fn, device, min_sample_s) for k, fn in calls.items()}
            samples = {k: [] for k in calls}
            for _ in range(repeats):  # round-robin: machine-load drift hits all contenders alike
                for k, fn in calls.items():
                    samples[k].append(_time_sample(fn, device, inner[k]) * 1e3)
            task = f"gemm_{in_features}x{out_features}_m{M}"
            common = {"M": M, "in": in_features, "out": out_features, "group_size": group_size, "device": name}
            stats = {k: summarize(v) for k, v in samples.items()}
            for k, s in stats.items():
                detail = {**common, "p10": s["p10"], "p90": s["p90"], "inner": inner[k],
                          "weights": str(dense[k]).removeprefix("torch.") if k in dense else "w4"}
                if k == "cpu_int4":  # which of its two paths ran (kernels.cpu_int4.cpu_int4_linear)
                    detail["path"] = (f"dequant_{str(dense_dtype()).removeprefix('torch.')}_gemm" if M >= DENSE_FROM_M
                                      else "int4_kernel")
                rows.append(_row(task, f"ms_{k}", s["median"], repeats, detail))
            for b in backends:
                for k in dense:
                    rows.append(_row(task, f"speedup_{b}_vs_{k}", stats[k]["median"] / stats[b]["median"], repeats,
                                     {**common, "definition": f"median {k} ms / median {b} ms"}))
    return rows


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
        rows += gemm_microbench(shapes, [1, 16, 128], group_size, [backend], device, t.repeats)
    return rows
