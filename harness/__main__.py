"""Entry point: `python -m harness method=awq bits=4 group_size=128` (add -m for sweeps).

Hydra's DictConfig becomes a typed, validated RunConfig here (harness/preflight.py does the same for each job of a
sweep before any starts). Bad input ends the run with one `config error: ...` line and exit status 2, before any
expensive work and before anything is written.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.config import ConfigError, RunConfig, one_line, register_configs
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
    log.error("config error: %s", one_line(err))
    sys.exit(2)


if __name__ == "__main__":
    main()
