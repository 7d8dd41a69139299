"""The GPU check's dry run: scripts/gpu_check.sh --dry runs every section of benchmarks/gpu_check.py on CPU
(Triton's interpreter, tiny shapes), so the one command a device session runs cannot rot."""
import os
import subprocess
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_writes_every_table(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "gpu_check: PASS" in proc.stdout
    for name in ("env.json", "kernels.csv", "speed.csv", "bandwidth.csv", "e2e.csv", "agreement.csv", "gpu_check.md"):
        assert (tmp_path / name).is_file(), name
    kernels = pd.read_csv(tmp_path / "kernels.csv")
    assert kernels.ok.all() and set(kernels.M) == {1, 16, 33}
    e2e = pd.read_csv(tmp_path / "e2e.csv")
    assert set(e2e.method) == {"rtn", "gptq", "awq"}
    assert {"quant_wall_s", "packed_ppl_ratio", "decode_speedup_vs_baseline"} <= set(e2e.metric)
    assert pd.read_csv(tmp_path / "agreement.csv").ok.all()
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "Speedup" in summary and "Bandwidth at M=1" in summary and "dry" in summary


def test_the_harness_imports_without_what_the_device_lacks():
    """The device has no lm-eval, datasets or gguf: importing a run must not need them (they load lazily)."""
    import sys

    code = ("import sys, harness.run, harness.__main__, harness.timing; "
            "sys.exit(sorted(m for m in ('lm_eval', 'datasets', 'gguf') if m in sys.modules) != [])")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
