"""Write the tiny random models every golden checkpoint under tests/golden/checkpoints/ is made from.

llama (default): two blocks, hidden 64, GQA 4/2 heads, intermediate 160, a 256-token word-level tokenizer, tied
embeddings: the shapes every producer accepts at group size 32. The mixtures (issue 31) are tests/conftest.py's
tiny_moe_model with narrower experts (the goldens stay small): two blocks of 4 experts, top-2, hidden 64, each
expert 32 wide (group size 16 divides every input), qwen2_moe's beside a 64-wide shared expert with its sigmoid
gate. Deterministic (seed 0); written with save_pretrained, experts one by one as transformers 5 saves them.
Usage: python scripts/produce/tiny_base.py [OUT_DIR] [--family llama|mixtral|qwen2_moe]
       (default OUT_DIR tests/golden/checkpoints/tiny-<family>)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
# family -> (tests.conftest builder, its overrides)
FAMILIES = {"llama": ("tiny_model", {}), "mixtral": ("tiny_moe_model", {"intermediate_size": 32}),
            "qwen2_moe": ("tiny_moe_model", {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 64})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path,
                        help="where to write it (default tests/golden/checkpoints/tiny-<family without '_'>)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    args = parser.parse_args()
    import tests.conftest as conftest

    out = args.out or ROOT / f"tests/golden/checkpoints/tiny-{args.family.replace('_', '')}"
    builder, overrides = FAMILIES[args.family]
    model = getattr(conftest, builder)(args.family, seed=0, **overrides)
    conftest.save_with_tokenizer(model, out)
    import transformers

    (out / "PRODUCER.json").write_text(json.dumps({
        "tool": "scripts/produce/tiny_base.py", "family": args.family, "builder": f"tests.conftest.{builder}",
        "overrides": overrides, "torch": torch.__version__, "transformers": transformers.__version__, "seed": 0},
        indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
