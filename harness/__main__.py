"""Entry point: `python -m harness method=awq bits=4 group_size=128` (add -m for sweeps).

Hydra's DictConfig becomes a typed, validated RunConfig here (harness/preflight.py does the same for each job of a
sweep before any starts). Bad input ends the run with one `config error: ...` line and exit status 2, before any
expensive work and before anything is written.
"""
from __future__ import annotations

import os

# Large CPU tensors (a streamed block's weights and their quantization temporaries, logits chunks) on transparent
# huge pages where the kernel offers them on request (THP "madvise"): torch then faults in 2 MiB at a time instead of
# 4 KiB: ~99% fewer page faults when 280 MB tensors are allocated and freed (benchmarks/bench_huge_pages.py), 94% fewer
# and 14% less wall time on a streamed 13B run (docs/memory.md). torch reads this once, at its first allocation, so it
# is set before torch is imported; THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NoReturn  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.config import ConfigError, RunConfig, register_configs
from harness.preflight import to_run_config
from harness.provenance import git_sha
from analysis.summary import RUN_FILE, summary_table, versus_baseline

log = logging.getLogger("harness")
register_configs()
git_sha()  # the commit of the code this process loads, recorded on every row it writes


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run_cfg: RunConfig = to_run_config(cfg)
    except (ValueError, OmegaConfBaseException) as err:  # ConfigError, the methods' and evaluators' own checks
        _config_error(err)
    from harness.run import execute, run_dir  # heavy imports (torch, transformers) only after validation

    try:
        frame = execute(run_cfg, OmegaConf.to_yaml(cfg, resolve=True))
    except ConfigError as err:  # found by the preflight, before any model loads (or by a check on the model)
        _config_error(err)
    Path(HydraConfig.get().runtime.output_dir, RUN_FILE).write_text(str(run_dir(run_cfg).resolve()) + "\n")
    log.info("summary (%s):\n%s", run_dir(run_cfg), summary_table(frame))
    if comparison := versus_baseline(frame):
        log.info("%s", comparison)


def _config_error(err: Exception) -> NoReturn:
    log.error("config error: %s", " ".join(str(err).split()))  # one line, whatever the message
    sys.exit(2)


if __name__ == "__main__":
    main()
