"""Entry point: `python -m harness method=awq bits=4 group_size=128` (add -m for sweeps).

The only module that sees Hydra's DictConfig: it becomes a typed, validated RunConfig here.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from harness.config import ConfigError, RunConfig, register_configs
from harness.summary import RUN_FILE, summary_table, versus_baseline

log = logging.getLogger("harness")
register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run_cfg: RunConfig = OmegaConf.to_object(cfg)
    except ValueError as err:  # ConfigError and the methods' and evaluators' own config checks
        log.error("config error: %s", err)
        sys.exit(2)
    from harness.run import execute, run_dir  # heavy imports (torch, transformers) only after validation

    try:
        frame = execute(run_cfg, OmegaConf.to_yaml(cfg, resolve=True))
    except ConfigError as err:  # found by the preflight, before any model loads (or by a check on the model)
        log.error("config error: %s", err)
        sys.exit(2)
    Path(HydraConfig.get().runtime.output_dir, RUN_FILE).write_text(str(run_dir(run_cfg).resolve()) + "\n")
    log.info("summary (%s):\n%s", run_dir(run_cfg), summary_table(frame))
    if comparison := versus_baseline(frame):
        log.info("%s", comparison)


if __name__ == "__main__":
    main()
