"""Hydra's submitit launchers (hydra-submitit-launcher 1.2.0), with a sweep that sees every job to its end and says
which failed.

The plugin's `launch` submits the sweep as one job array and then waits for the jobs in order, raising at the first
that failed: the jobs after it are never waited for, nothing says which of them failed, and the sweep's summary is
never printed. These subclasses submit exactly as the plugin does (same executor, parameters, array and
`checkpoint()`, so submitit's requeue on preemption or time-out is unchanged) and differ after submission only:
- they write `sweep_manifest.json` in the sweep directory: every job's number, overrides, SLURM job id and submitit
  log, so that `python -m harness.status <sweep dir>` can say which jobs have not started yet;
- they wait for every job, whether the others failed or not;
- at the end they log the sweep's summary of the finished runs and one line per failed job: its configuration (the
  overrides that set it apart), the last line of its error, its logs; and then raise SweepFailed, so the command
  exits non-zero. Running the same command again runs only what is not done (finished runs are verified and
  skipped).

Hydra instantiates launchers from the `hydra_plugins` namespace only: the launchers themselves are
hydra_plugins/quant_harness_launcher/launcher.py (SlurmLauncher, LocalLauncher), this mixin over the plugin's classes.
Presets: conf/hydra/launcher/slurm.yaml (GPU jobs) and slurm_cpu.yaml.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from harness.journal import STATUS_FILE
from harness.sweep import SweepFailed, set_apart, shared_overrides, write_manifest

log = logging.getLogger(__name__)


class SeesEveryJob:
    """`launch` for the submitit launchers: the plugin's submission, then every job waited for and reported."""

    _EXECUTOR: str

    def _executor(self):
        """The submitit executor exactly as the plugin builds it from the launcher's parameters."""
        import submitit

        init_keys = {"max_num_timeout"}
        init = {"folder": self.params["submitit_folder"],
                **{f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k in init_keys}}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items()
                                      if k not in init_keys | {"submitit_folder"}})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None and len(job_overrides) > 0
        executor = self._executor()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        numbers = [initial_job_idx + i for i in range(len(job_overrides))]
        for number, overrides in zip(numbers, job_overrides):
            log.info(f"\t#{number} : {' '.join(filter_overrides(overrides))}")
        params = [(list(overrides), "hydra.sweep.dir", number, f"job_id_for_{number}", Singleton.get_state())
                  for number, overrides in zip(numbers, job_overrides)]
        jobs = executor.map_array(self, *zip(*params))
        write_manifest(sweep_dir, self._EXECUTOR, [
            {"num": number, "overrides": list(overrides), "job_id": job.job_id, "submitit_log": str(job.paths.stderr)}
            for number, overrides, job in zip(numbers, job_overrides, jobs)])
        returns = []
        for number, overrides, job in zip(numbers, job_overrides, jobs):
            try:
                returns.append(job.results()[0])
            except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as err:
                returns.append(_failed_return(list(overrides), err))  # killed, cancelled, or never wrote a result
        failed = [(n, o, j, r) for n, o, j, r in zip(numbers, job_overrides, jobs, returns)
                  if r.status is not JobStatus.COMPLETED]
        if failed:
            report = failure_report(sweep_dir, self._EXECUTOR, job_overrides, failed)
            log.error("%s", report)
            _log_summary(self.config)
            raise SweepFailed(f"{len(failed)} of {len(jobs)} sweep jobs failed, the others finished: "
                              + ", ".join(f"#{n}" for n, *_ in failed) + " (named above with their logs); "
                              "running the same command again runs only what is not done")
        return returns


def _failed_return(overrides: list[str], err: Exception) -> JobReturn:
    ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
    ret.return_value = err
    return ret


def _error_of(ret: JobReturn) -> BaseException | None:
    """The error a failed job's return holds (reading a failed JobReturn's value raises it)."""
    try:
        ret.return_value
    except BaseException as err:  # noqa: BLE001 -- whatever the job raised is what it failed with
        return err
    return None


def last_line(text) -> str:
    """The last non-empty line of an error's text (a traceback's last line is the error itself)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def failure_report(sweep_dir: Path, executor: str, all_overrides: Sequence[Sequence[str]], failed: list) -> str:
    """One entry per failed job: number, the overrides that set it apart, the error's last line, its logs."""
    shared = shared_overrides(all_overrides)
    lines = [f"sweep: {len(all_overrides) - len(failed)} of {len(all_overrides)} jobs finished, {len(failed)} failed:"]
    for number, overrides, job, ret in failed:
        status = _job_status(sweep_dir / str(number))
        error = status.get("error") or last_line(_error_of(ret))
        logs = [p for p in (status.get("log") or str(sweep_dir / str(number) / "__main__.log"),
                            str(job.paths.stderr)) if p and Path(p).exists()]
        lines.append(f"  #{number} {set_apart(overrides, shared)}: {error}")
        lines.append(f"      {executor} job {job.job_id}; logs: {', '.join(logs) or '(none written)'}")
    return "\n".join(lines)


def _job_status(job_dir: Path) -> dict:
    try:
        return json.loads((job_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _log_summary(config: Any) -> None:
    """The table of the sweep's finished runs, as the sweep summary callback prints it after a sweep that succeeded."""
    from analysis.summary import SweepSummary

    SweepSummary().on_multirun_end(config)
