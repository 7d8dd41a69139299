"""W4A16 GEMM microbenchmark: packed int4 backends next to a dense baseline, printed as a table.

    .venv/bin/python benchmarks/bench_gemm.py --device cpu --threads 2
    .venv/bin/python benchmarks/bench_gemm.py --device cuda --ms 1,16,128,2048 --csv results/bench_gemm.csv

Shapes are in_features x out_features (K x N); the defaults are Llama-7B's 4096x4096, 4096x11008, 11008x4096
and the packaged SmolLM2-135M's 576x576, 576x192, 576x1536, 1536x576. Dense is fp16 on GPU, fp32 on CPU;
speedup = dense ms / backend ms (> 1: the int4 kernel is faster).
"""
from __future__ import annotations

import argparse
import json

DEFAULT_SHAPES = "4096x4096,4096x11008,11008x4096,576x576,576x192,576x1536,1536x576"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:1")
    p.add_argument("--backends", default=None,
                   help="comma list from triton,cpu_int4,reference (default: the fast one for the device)")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list of INxOUT")
    p.add_argument("--ms", default="1,16,128,2048", help="comma list of batch rows M")
    p.add_argument("--group-size", type=int, default=128, help="quantization group size (0 = per-channel)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    return p.parse_args(argv)


def _shape(text: str) -> tuple[int, int]:
    try:
        k, n = text.lower().split("x")
        return int(k), int(n)
    except ValueError:
        raise ValueError(f"--shapes entry {text!r} must look like 4096x11008 (in x out)") from None


def table(rows: list[dict]):
    """Rows -> one line per (shape, M): ms of each contender and the speedups side by side."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    detail = frame["detail"].map(json.loads)
    frame["shape"] = detail.map(lambda d: f"{d['in']}x{d['out']}")
    frame["M"] = detail.map(lambda d: d["M"])
    wide = frame.pivot_table(index=["shape", "M"], columns="metric", values="value", sort=False)
    columns = [c for c in wide.columns if c.startswith("ms_")] + [c for c in wide.columns if c.startswith("speedup_")]
    return wide[columns]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from harness.provenance import device_name
    from kernels.microbench import gemm_microbench
    from kernels.backends import default_backend

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    backends = args.backends.split(",") if args.backends else [default_backend(args.device)]
    rows = gemm_microbench([_shape(s) for s in args.shapes.split(",")], [int(m) for m in args.ms.split(",")],
                           args.group_size or None, backends, args.device, repeats=args.repeats, warmup=args.warmup,
                           device_label=device_name(args.device))
    print(f"device: {device_name(args.device)}; torch {torch.__version__}; group_size={args.group_size or 'channel'}; "
          f"median of {args.repeats} samples, round-robin")
    with __import__("pandas").option_context("display.width", 200, "display.max_rows", 500):
        print(table(rows).round(4).to_string())
    if args.csv:
        import pandas as pd

        pd.DataFrame(rows).to_csv(args.csv, index=False)
        print(f"rows written to {args.csv}")


if __name__ == "__main__":
    main()
