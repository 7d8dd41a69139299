"""Write the tiny random Llama that every golden checkpoint under tests/golden/checkpoints/ is made from.

Two blocks, hidden 64, GQA 4/2 heads, intermediate 160, a 256-token word-level tokenizer, tied embeddings: the
shapes every producer accepts at group size 32. Deterministic (seed 0); written with save_pretrained.
Usage: python scripts/produce/tiny_base.py [OUT_DIR]   (default tests/golden/checkpoints/tiny-llama)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from tests.conftest import tiny_model, tiny_tokenizer

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/golden/checkpoints/tiny-llama"
    model = tiny_model("llama", seed=0)
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    import transformers

    (out / "PRODUCER.json").write_text(json.dumps({
        "tool": "scripts/produce/tiny_base.py", "torch": torch.__version__,
        "transformers": transformers.__version__, "seed": 0}, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
