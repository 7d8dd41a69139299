"""The CI regression sweep: a tiny deterministic model and corpus, a few methods, a committed baseline.

`python tests/regression_suite.py` regenerates tests/baselines/tiny after an intended change of
numbers (commit the result with a message saying why). tests/test_regression_gate.py re-runs the
sweep and checks it against the baseline with harness.regress.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
BASELINE = TESTS / "baselines" / "tiny"
# (method, bits, group size) of the sweep; calibration methods are included when registered.
SWEEP = [("fp", 4, 32), ("rtn", 4, 32), ("rtn", 3, 32), ("rtn", 2, None), ("gptq", 4, 32), ("gptq", 3, 32),
         ("awq", 4, 32), ("awq", 3, 32)]


def build_assets(directory: Path) -> tuple[Path, Path]:
    """A tiny llama with peaked outputs (so quantization moves perplexity) and a text corpus; deterministic."""
    from conftest import random_text, tiny_model, tiny_tokenizer

    model_dir, text = directory / "tiny-llama", directory / "corpus.txt"
    tiny_model("llama", seed=0, initializer_range=0.3).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    text.write_text(random_text(8000, seed=0))
    return model_dir, text


def run_sweep(assets: Path, results_dir: Path, cache_dir: Path) -> None:
    """Run the sweep single-threaded: float reductions split over threads differ in their last bits, and
    GPTQ's error propagation carries such differences into the numbers."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_sweep(assets, results_dir, cache_dir)
    finally:
        torch.set_num_threads(threads)


def _run_sweep(assets: Path, results_dir: Path, cache_dir: Path) -> None:
    from methods import METHODS
    from harness.run import execute
    from test_config import make_config

    model_dir, text = build_assets(assets)
    for method, bits, group_size in SWEEP:
        if method not in METHODS:
            continue
        execute(make_config(
            "model=hf", f"model.path={model_dir}", "model.name=tiny", "device=cpu", f"method={method}",
            f"bits={bits}", f"group_size={'null' if group_size is None else group_size}",
            f"data.sources.textfile.path={text}", "calib.source=textfile", "calib.n_samples=8", "calib.seqlen=64",
            "eval.ppl_sets=[textfile]", "eval.seqlen=64", "eval.max_windows=6", "eval.lm_eval=null",
            f"results_dir={results_dir}", f"cache_dir={cache_dir}"))


if __name__ == "__main__":
    import tempfile

    sys.path[:0] = [str(TESTS), str(ROOT)]
    with tempfile.TemporaryDirectory() as tmp:
        if BASELINE.exists():
            shutil.rmtree(BASELINE)
        run_sweep(Path(tmp), BASELINE, Path(tmp) / "cache")
    print(f"wrote {BASELINE}")
