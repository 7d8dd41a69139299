"""Timing primitives and the W4A16 GEMM microbenchmark: a packed backend against dense baselines, timed
round-robin in one loop so that machine-load drift hits all contenders alike.

Every measurement is warmed up, repeated and reported as the median with p10/p90 in `detail`; nothing here asserts
speed. The harness's timing evaluator (harness/timing.py) runs it on a model's own shapes with `eval.timing.gemm`;
benchmarks/bench_gemm.py runs it on its own.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from core.spec import QuantizedWeights
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


def timing_row(task: str, metric: str, value: float, n: int | None, detail: dict | None) -> dict:
    """A tidy `suite=timing` row."""
    return {"suite": SUITE, "task": task, "metric": metric, "value": float(value), "stderr": None, "n": n,
            "detail": None if detail is None else json.dumps(detail, separators=(",", ":"))}


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
                    min_sample_s: float = 0.02, seed: int = 0, device_label: str | None = None) -> list[dict]:
    """Latency of x [M, in] @ W.T for each (in, out) shape, M and backend, next to dense baselines timed round-robin
    in the same loop -> rows: ms per backend and dense/backend speedups.

    `dense` is fp16 on GPU and fp32 on CPU; `dense_bf16` joins it where bf16 is native (every GPU, CPUs with
    AVX512-BF16 or AMX), since there bf16 is the fair 16-bit baseline. `device_label` names the device in the rows
    (the harness passes its provenance name: CPU model, kernel family, threads)."""
    device = torch.device(device)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"gemm_microbench: repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    for backend in backends:
        check_backend_device(backend, device)
    dense = {"dense": torch.float16 if device.type == "cuda" else torch.float32}
    if device.type == "cuda" or native_bf16():
        dense["dense_bf16"] = torch.bfloat16
    name = device_label or str(device)
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
                rows.append(timing_row(task, f"ms_{k}", s["median"], repeats, detail))
            for b in backends:
                for k in dense:
                    rows.append(timing_row(task, f"speedup_{b}_vs_{k}", stats[k]["median"] / stats[b]["median"], repeats,
                                     {**common, "definition": f"median {k} ms / median {b} ms"}))
    return rows
