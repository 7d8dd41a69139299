"""Entry point: `python -m harness method=awq bits=4 group_size=128` (add -m for sweeps).

Hydra's DictConfig becomes a typed, validated RunConfig here (harness/preflight.py does the same for each job of a
sweep before any starts). Bad input ends the run with one `config error: ...` line and exit status 2, before any
expensive work and before anything is written.

Each job keeps a journal in its output directory (harness/journal.py: what it computed, reused, waited for, where it
stands), which `python -m harness.status` reads. A signal asking the job to stop (SLURM's time-limit warning,
preemption, requeue, scancel) ends it at the next safe point with everything computed so far in the cache, and a
submitit job asks to be requeued (harness/preemption.py); its next run resumes from the cache.
"""
from __future__ import annotations

import json
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
from harness.journal import JobJournal, note, slurm_ids
from harness.preemption import Preempted, StopRequest, leave
from harness.preflight import check_keys_apply, compose_error, to_run_config
from harness.provenance import git_sha
from harness.sweep import SweepFailed
from analysis.integrity import atomic_write_text
from analysis.results import FAILED_FILE
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

    job = job_description(run_dir(run_cfg))
    with StopRequest() as stop, JobJournal(Path(job["job_dir"]), job).attached():
        try:
            frame = execute(run_cfg, OmegaConf.to_yaml(cfg, resolve=True), stop)
        except Preempted as err:  # a signal asked for a stop: what was computed is in the cache
            leave(err, stop)
        except ConfigError as err:  # found by the preflight, before any model loads (or by a check on the model)
            _failed(err, job)
            _config_error(err)
        except Exception as err:
            log.exception("the run failed")  # the traceback in the job's log
            _failed(err, job)
            raise
        Path(job["job_dir"], RUN_FILE).write_text(job["run_dir"] + "\n")
        note(log, "done", None, run_dir=job["run_dir"])
    log.info("summary (%s):\n%s", run_dir(run_cfg), summary_table(frame))
    if comparison := versus_baseline(frame):
        log.info("%s", comparison)


def job_description(out_dir: Path) -> dict:
    """What the journal and `python -m harness.status` say of this job: its number in a sweep, its overrides, its
    output directory and log, the run directory it computes, and (a submitit job) submitit's log."""
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    job = {"job": OmegaConf.select(hydra_cfg, "job.num"), "overrides": list(hydra_cfg.overrides.task),
           "job_dir": str(job_dir), "run_dir": str(out_dir.resolve()), "log": str(job_dir / f"{hydra_cfg.job.name}.log")}
    if os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        job["submitit_log"] = str(submitit.JobEnvironment().paths.stderr)
    return job


def _failed(err: Exception, job: dict) -> None:
    """Record a failure in the journal, and in the run directory (when the run got that far) for readers of
    results/ alone."""
    error = f"{type(err).__name__}: {' '.join(str(err).split())}"[:500]
    where = {"error": error, "log": job["log"], "submitit_log": job.get("submitit_log")}
    note(log, "failed", None, **where)
    if Path(job["run_dir"]).is_dir():
        atomic_write_text(Path(job["run_dir"]) / FAILED_FILE, json.dumps({
            **where, "job_dir": job["job_dir"], "overrides": job["overrides"], "host": os.uname().nodename,
            "pid": os.getpid(), **slurm_ids()}, indent=1) + "\n")


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
    except SweepFailed as err:  # the sweep ran: some jobs failed (named with their logs above), not bad input
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except (HydraException, OmegaConfBaseException) as err:
        print(f"config error: {compose_error(err)}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    cli()
