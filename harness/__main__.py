"""Entry point: `python -m harness method=awq bits=4 group_size=128` (add -m for sweeps).

Hydra's DictConfig becomes a typed, validated RunConfig here (harness/preflight.py does the same for each job of a
sweep before any starts). Bad input ends the run with one `config error: ...` line and exit status 2, before any
expensive work and before anything is written.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.config import ConfigError, RunConfig, one_line, register_configs
from harness.preflight import check_keys_apply, compose_error, to_run_config
from harness.provenance import git_sha
from analysis.summary import RUN_FILE, summary_table, versus_baseline

log = logging.getLogger("harness")
register_configs()
git_sha()  # the commit of the code this process loads, recorded on every row it writes


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run_cfg: RunConfig = to_run_config(cfg)
        check_keys_apply(run_cfg, list(HydraConfig.get().overrides.task))
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


def cli() -> None:
    """Hydra's entry, with what goes wrong composing the config (a value of the wrong type, a key the schema lacks, an
    option a config group does not have, an override that does not parse) as one `config error` line and exit status
    2, like every other bad input. Hydra raises these before `main` runs, for a single run and a sweep (-m) alike, and
    would print a multi-line report and exit 1; its own switch HYDRA_FULL_ERROR=1 makes it raise them instead, and a
    user who sets it gets Hydra's full traceback as before."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        print(f"config error: {compose_error(err)}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    cli()
