"""What transparent huge pages for torch's large CPU tensors (THP_MEM_ALLOC_ENABLE, which `python -m harness` sets
for streamed runs) do to allocating and filling a large tensor again and again, as a streamed block's temporaries
are: minor page faults and wall time, with the setting off and on, each in its own process (torch reads it once,
at its first allocation).

    python benchmarks/bench_huge_pages.py --elements 70000000 --cycles 20 --repeats 2

Prints the kernel's THP mode (only `madvise` and `always` grant them; `never` makes both rows alike).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, resource, sys, time, torch
elements, cycles = int(sys.argv[1]), int(sys.argv[2])
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f0, t0 = faults(), time.perf_counter()
for _ in range(cycles):
    x = torch.empty(elements)
    x.fill_(1.0)
    del x
print(json.dumps({"faults": faults() - f0, "seconds": time.perf_counter() - t0}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elements", type=int, default=70_000_000, help="fp32 elements per tensor (280 MB)")
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    print(f"# THP: {mode.read_text().strip() if mode.exists() else 'unknown'}; {args.cycles} cycles of "
          f"{args.elements * 4 / 1e6:.0f} MB; each setting in its own process, alternated, {args.repeats} repeats")
    print("| THP_MEM_ALLOC_ENABLE | minor page faults | wall s |")
    print("|---|---:|---:|")
    for _ in range(args.repeats):
        for setting in ("0", "1"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.elements), str(args.cycles)], check=True,
                                 capture_output=True, text=True, env={**os.environ, "THP_MEM_ALLOC_ENABLE": setting})
            got = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {setting} | {got['faults']:,} | {got['seconds']:.2f} |")


if __name__ == "__main__":
    main()
