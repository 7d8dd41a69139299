"""The launcher presets (hydra/launcher=slurm, slurm_cpu) and the end-of-sweep report: every job is waited for, the
failed ones are named with their logs, the command exits non-zero (harness/launcher.py). The report is checked here
on submitit's local executor; tests/test_slurm.py does it through SLURM."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from harness.config import register_configs
from harness.status import sweep_status
from harness.sweep import MANIFEST
from test_run import tiny_run_overrides

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("preset, gres", [("slurm", "gpu:1"), ("slurm_cpu", None)])
def test_the_presets_expose_what_a_cluster_needs(preset, gres):
    from hydra.utils import get_class

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        launcher = compose("config", overrides=[f"hydra/launcher={preset}"], return_hydra_config=True).hydra.launcher
    assert launcher.gres == gres
    for key in ("partition", "cpus_per_task", "mem_gb", "timeout_min", "array_parallelism", "max_num_timeout",
                "signal_delay_s"):
        assert key in launcher
    assert launcher.max_num_timeout > 0  # a job that reaches its time limit is requeued (and resumes)
    assert launcher.additional_parameters["open-mode"] == "append"  # a requeued job keeps its first log
    assert "OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK" in " ".join(launcher.setup)
    # the plugin's submission, unchanged (by name: Hydra's plugin scan re-executes plugin modules, new class objects)
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in \
        [f"{c.__module__}.{c.__qualname__}" for c in get_class(launcher._target_).__mro__]


def test_a_failing_job_is_named_with_its_log_while_the_others_finish(tiny_model_dir, text_file, tmp_path):
    """group_size=48 divides no layer of the tiny model and strict_groups=true: that job fails at run time (fp
    quantizes nothing, so its two jobs are one run)."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "-m", "hydra/launcher=submitit_local",
         "hydra.launcher._target_=hydra_plugins.quant_harness_launcher.launcher.LocalLauncher",
         *tiny_run_overrides(tiny_model_dir, text_file, tmp_path), "method=fp,rtn", "group_size=32,48",
         "strict_groups=true", f"hydra.sweep.dir={sweep}"], cwd=ROOT, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "3 of 4 jobs finished, 1 failed:" in out
    assert "#3 method=rtn group_size=48: ConfigError: group_size=48 does not divide" in out
    assert f"logs: {sweep / '3' / '__main__.log'}" in out  # the log that holds the error
    assert "sweep summary (2 runs" in out  # the finished runs are summarized all the same
    assert "Traceback" not in out  # one message, not a stack
    manifest = json.loads((sweep / MANIFEST).read_text())
    assert [job["num"] for job in manifest["jobs"]] == [0, 1, 2, 3] and all(j["job_id"] for j in manifest["jobs"])
    assert [r["state"] for r in sweep_status(sweep)] == ["done", "done", "done", "failed"]
