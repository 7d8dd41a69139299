"""hydra-submitit-launcher 1.2.0's launchers, seeing every job of a sweep to its end and naming the failed ones
(harness/launcher.py). Used by conf/hydra/launcher/slurm.yaml and slurm_cpu.yaml."""
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin

from harness.launcher import SeesEveryJob


class SlurmLauncher(SeesEveryJob, plugin.SlurmLauncher):
    """hydra/launcher=slurm, slurm_cpu: submitit_slurm's submission; every job waited for, failures named."""


class LocalLauncher(SeesEveryJob, plugin.LocalLauncher):
    """submitit_local's submission (each job its own process on this machine); every job waited for, failures
    named."""
