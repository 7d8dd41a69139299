"""Where a number came from: commit, package versions, device, memory."""
from __future__ import annotations

import functools
import importlib.metadata
import json
import platform
import resource
import subprocess
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "lm_eval", "datasets", "hydra-core", "pandas", "triton", "numpy")
REPO = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    """HEAD's commit, with '-dirty' when tracked files differ from it; 'unknown' outside a git checkout. Read once per
    process (harness/__main__.py asks at start-up): a sweep's later jobs run the code loaded at its start, whatever
    is committed meanwhile."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> str:
    """JSON of python and key package versions."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return json.dumps(found, sort_keys=True)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU model, torch's CPU kernel family (ATEN_CPU_CAPABILITY picks it; results can differ
    between families), whether bf16 is native, and the thread count (the device column of every row)."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    cpu = cpu_model()
    from kernels.cpu_int4 import native_bf16

    family = torch.backends.cpu.get_cpu_capability().lower()
    bf16 = "native bf16" if native_bf16() else "no native bf16"
    return f"cpu:{cpu} [{family}, {bf16}] x{torch.get_num_threads()} threads"


def reset_peak_rss() -> None:
    """Restart this process's resident-set high-water mark (Linux VmHWM), so peak_rss_mb covers what follows.

    Needed in benchmark workers: ru_maxrss survives fork and exec, so a child would report its parent's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or no permission: peak_rss_mb then covers the whole process life
        pass


def _proc_status_mb(field: str) -> float | None:
    """A kB field of /proc/self/status (VmRSS, VmHWM) in MiB, or None where there is no such file or field."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux)."""
    value = _proc_status_mb("VmRSS")
    if value is None:
        raise RuntimeError("no VmRSS in /proc/self/status: current RSS is only read on Linux")
    return value


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB since reset_peak_rss (VmHWM), else ru_maxrss."""
    value = _proc_status_mb("VmHWM")
    if value is not None:
        return value
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): less sensitive to other load than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU allocation on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
