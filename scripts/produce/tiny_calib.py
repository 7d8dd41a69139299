"""Write the calibration tokens every golden checkpoint under tests/golden/checkpoints/ is quantized with.

8 windows x 32 token ids, drawn uniformly from [3, 256) with torch.Generator seed 0 (ids 0-2 are the tiny
tokenizer's <unk>/<s>/</s>; the tiny Llama's vocabulary is 256). An int64 tensor [8, 32], saved with torch.save.
Usage: python scripts/produce/tiny_calib.py [OUT_FILE]   (default tests/golden/checkpoints/tiny-calib.pt)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", type=Path, default=ROOT / "tests/golden/checkpoints/tiny-calib.pt",
                    help="where to write it (default tests/golden/checkpoints/tiny-calib.pt)")
    out = ap.parse_args().out
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 256, (8, 32), generator=gen, dtype=torch.int64)
    torch.save(tokens, out)
    print(out)


if __name__ == "__main__":
    main()
