"""The CI regression sweep: a tiny deterministic model and corpus, a few methods, a committed baseline.

`python tests/regression_suite.py` regenerates tests/baselines/tiny after an intended change of
numbers (commit the result with a message saying why). tests/test_regression_gate.py re-runs the
sweep and checks it against the baseline with analysis.regress.
"""
from __future__ import annotations

import shutil
from pathlib import Path

TESTS = Path(__file__).resolve().parent
BASELINE = TESTS / "baselines" / "tiny"
# (method, bits, group size) of the sweep; calibration methods are included when registered.
SWEEP = [("fp", 4, 32), ("rtn", 4, 32), ("rtn", 3, 32), ("rtn", 2, None), ("gptq", 4, 32), ("gptq", 3, 32),
         ("awq", 4, 32), ("awq", 3, 32)]


def build_assets(directory: Path) -> tuple[Path, Path]:
    """A tiny llama with peaked outputs (so quantization moves perplexity) and a text corpus; deterministic."""
    from conftest import random_text, save_with_tokenizer, tiny_model

    model_dir, text = directory / "tiny-llama", directory / "corpus.txt"
    model = tiny_model("llama", seed=0, initializer_range=0.3)
    portable_init(model, std=0.3, seed=0)
    save_with_tokenizer(model, model_dir)
    text.write_text(random_text(8000, seed=0))
    return model_dir, text


def portable_init(model, std: float, seed: int) -> None:
    """Redraw every weight matrix from numpy's generator: torch's CPU normal_ takes a different code path per CPU
    kernel family (ATEN_CPU_CAPABILITY), so the same seed gives weights that differ in their last bits."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.dim() >= 2:  # norms keep their ones (and biases their zeros)
                param.copy_(torch.from_numpy(rng.normal(0.0, std, tuple(param.shape))))


def run_sweep(assets: Path, results_dir: Path, cache_dir: Path) -> None:
    """Run the sweep in float64. Float reductions differ in their last bits between thread counts and CPU kernel
    families (ATEN_CPU_CAPABILITY); in fp32 that flips discrete choices (AWQ's grid argmin, a rounding at a
    boundary, GPTQ's error propagation) on this tiny model, in float64 it does not, so the committed baseline
    reproduces on every machine while a real change of the maths still moves the numbers."""
    from methods import METHODS
    from harness.run import execute
    from test_config import make_config

    model_dir, text = build_assets(assets)
    for method, bits, group_size in SWEEP:
        if method not in METHODS:
            continue
        execute(make_config(
            "model=hf", f"model.path={model_dir}", "model.name=tiny", "model.dtype=float64", "device=cpu",
            f"method={method}",
            f"bits={bits}", f"group_size={'null' if group_size is None else group_size}",
            f"data.sources.textfile.path={text}", "calib.source=textfile", "calib.n_samples=8", "calib.seqlen=64",
            "eval.ppl_sets=[textfile]", "eval.seqlen=64", "eval.max_windows=6", "eval.lm_eval=null",
            f"results_dir={results_dir}", f"cache_dir={cache_dir}"))


def main(argv: list[str] | None = None) -> None:
    """Regenerate the committed baseline: the sweep runs in a temporary directory, and only a finished sweep replaces
    tests/baselines/tiny (a failed one leaves the committed baseline as it was)."""
    import argparse
    import sys
    import tempfile

    argparse.ArgumentParser(prog="python tests/regression_suite.py", description=__doc__.split("\n\n")[0]
                            + f" Regenerates {BASELINE.relative_to(TESTS.parent)}.").parse_args(argv)
    sys.path.insert(0, str(TESTS))  # conftest and test_config, as pytest sees them
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "baseline"
        run_sweep(Path(tmp), fresh, Path(tmp) / "cache")
        if BASELINE.exists():
            shutil.rmtree(BASELINE)
        shutil.copytree(fresh, BASELINE)
    print(f"wrote {BASELINE}")


if __name__ == "__main__":
    main()
