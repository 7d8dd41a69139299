"""Write the harness's calibration draw as text, for tools that take text rather than token ids (llama.cpp's
llama-imatrix): the packaged model's tokenizer decodes each window, windows in draw order, one after another.
Re-tokenized by the tool, the text gives the same tokens up to merges across window boundaries.

    python scripts/produce/calib_text.py OUT.txt [--model DIR] [--source wiki] [--n-samples 128] [--seqlen 512]
        [--seed 0]      (--model: whose tokenizer draws the windows; default the packaged model)
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", type=Path, help="model directory whose tokenizer draws (default: the packaged one)")
    parser.add_argument("--source", default="wiki")
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from harness.config import TextSourceConfig
    from harness.data import calibration_tokens
    from harness.models import convert_packaged, default_cache_dir

    tokenizer = AutoTokenizer.from_pretrained(args.model or convert_packaged(default_cache_dir()))
    draw = calibration_tokens(args.source, TextSourceConfig(kind=args.source), tokenizer, default_cache_dir(),
                              args.n_samples, args.seqlen, args.seed)
    text = "".join(tokenizer.decode(window) for window in draw.tokens)
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"{args.out}: {draw.tokens.shape[0]} windows x {draw.tokens.shape[1]} tokens (fingerprint {draw.fingerprint})")


if __name__ == "__main__":
    main()
