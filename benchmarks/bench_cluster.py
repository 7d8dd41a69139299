"""The cluster path, measured on the packaged model through the local SLURM cluster (scripts/slurm_local.sh).

    sudo bash scripts/slurm_local.sh                       # once: a one-node SLURM on this machine
    python benchmarks/bench_cluster.py sweep               # 2 x 3 sweep: SLURM, 2 one-thread jobs at a time,
                                                           # against the same sweep run sequentially with 2 threads
    python benchmarks/bench_cluster.py requeue             # a GPTQ job requeued at half its blocks: work redone
    python benchmarks/bench_cluster.py sweep --quick       # a short variant of either, to check that it runs

`sweep`: RTN and GPTQ at group sizes 32, 64 and 128 (eval=ppl on wiki). Both ways start from copies of one cache in
which a `method=fp` run converted the packaged model and computed its baseline, and write fresh results, so what is
timed is the six runs plus what each way costs to start its jobs. Prints both wall times, whether the two ways gave
identical numbers, and the machine with its load average before and after (a figure measured while other work ran
is labelled "under load").

`requeue`: a one-job GPTQ sweep through SLURM (one job, 2 CPUs), requeued with `scontrol requeue` as soon as half of
its blocks are kept, its requeue delay cut short (`scontrol update StartTime=now`); against the same job
uninterrupted on a copy of the same warm cache. Prints the blocks reused and recomputed, and from the jobs' journals
the seconds each attempt spent quantizing and in all.

A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SLURM = ["hydra/launcher=slurm_cpu", "hydra.launcher.mem_gb=6", "hydra.launcher.timeout_min=120"]


def machine() -> str:
    from harness.provenance import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} CPUs"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def harness(*args: str, threads: int, out: Path, check: bool = True) -> float:
    """Run `python -m harness ...`; its wall seconds (its output in `out`)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with out.open("w") as log:
        proc = subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    if check and proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): python -m harness {' '.join(args)}; see {out}")
    return time.perf_counter() - start


def run_args(args, work: Path, name: str) -> list[str]:
    windows, samples, seqlen = (1, 4, 128) if args.quick else (4, 32, 512)
    return ["eval=ppl", "eval.ppl_sets=[wiki]", f"eval.max_windows={windows}", f"calib.n_samples={samples}",
            f"calib.seqlen={seqlen}", f"cache_dir={work / ('cache_' + name)}", f"results_dir={work / ('results_' + name)}"]


def warm_cache(args, work: Path) -> Path:
    """A cache holding the converted packaged model and its baseline on the eval windows."""
    cache = work / "cache_warm"
    if not cache.exists():
        print(f"warming a cache in {cache} (the packaged model converted, its baseline computed)", flush=True)
        harness("method=fp", *run_args(args, work, "warm"), f"hydra.run.dir={work / 'warm'}", threads=2,
                out=work / "warm.out")
    return cache


def fresh_copy(warm: Path, work: Path, name: str) -> None:
    for kind in ("cache", "results"):
        shutil.rmtree(work / f"{kind}_{name}", ignore_errors=True)
    shutil.copytree(warm, work / f"cache_{name}")


def numbers(results_dir: Path) -> dict:
    """Every ppl-suite figure of every run, but its wall time (which is what differs between the two ways)."""
    from analysis.results import load_results

    frame = load_results(results_dir)
    frame = frame[(frame["suite"] == "ppl") & (frame["metric"] != "wall_s")]
    return {(r.method, r.group_size, r.task, r.metric): r.value for r in frame.itertuples()}


def sweep(args, work: Path) -> None:
    warm = warm_cache(args, work)
    grid = ["method=rtn,gptq", "group_size=32,64,128"]
    walls = {}
    for name, threads, launcher in (("slurm", 1, [*SLURM, "hydra.launcher.cpus_per_task=1",
                                                  "hydra.launcher.array_parallelism=2"]),
                                    ("sequential", 2, [])):
        fresh_copy(warm, work, name)
        before = load()
        walls[name] = harness("-m", *launcher, *grid, *run_args(args, work, name),
                              f"hydra.sweep.dir={work / ('sweep_' + name)}", threads=threads,
                              out=work / f"{name}.out")
        print(f"{name:>10}: {walls[name]:7.1f} s wall ({'2 jobs x 1 thread' if threads == 1 else '1 job x 2 threads'}"
              f"; load average before {before}, after {load()})", flush=True)
    same = numbers(work / "results_slurm") == numbers(work / "results_sequential")
    print(f"ratio slurm / sequential: {walls['slurm'] / walls['sequential']:.3f}; identical ppl and KLD: {same}")
    print(f"machine: {machine()}; {'quick variant' if args.quick else 'full variant'}; "
          f"runs in {work}/results_slurm and results_sequential")


def _events(job_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines()]


def _quantize_seconds(events: list[dict]) -> list[float]:
    """Seconds from each attempt's quantize stage to the end of its quantization (finished or stopped)."""
    spans, start = [], None
    for e in events:
        if e["event"] == "stage" and e["stage"] == "quantize":
            start = e["time"]
        elif e["event"] in ("blocks", "stopped") and start is not None:
            spans.append(e["time"] - start)
            start = None
    return spans


def requeue(args, work: Path) -> None:
    from harness.status import sweep_events, timeline

    warm = warm_cache(args, work)
    job = ["-m", *SLURM, "hydra.launcher.cpus_per_task=2", "method=gptq"]
    fresh_copy(warm, work, "uninterrupted")
    wall = harness(*job, *run_args(args, work, "uninterrupted"), f"hydra.sweep.dir={work / 'sweep_uninterrupted'}",
                   threads=2, out=work / "uninterrupted.out")
    reference = _quantize_seconds(_events(work / "sweep_uninterrupted" / "0"))
    print(f"uninterrupted: {wall:.1f} s wall, quantizing {reference[0]:.1f} s (load average {load()})", flush=True)

    fresh_copy(warm, work, "requeued")
    sweep_dir = work / "sweep_requeued"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    start = time.perf_counter()
    driver = subprocess.Popen([sys.executable, "-m", "harness", *job, *run_args(args, work, "requeued"),
                               f"hydra.sweep.dir={sweep_dir}"], cwd=ROOT, env=env, stdout=(work / "requeued.out").open(
                               "w"), stderr=subprocess.STDOUT)
    requeued = released = None
    while driver.poll() is None:
        try:
            status = json.loads((sweep_dir / "0" / "job_status.json").read_text())
        except (OSError, ValueError):
            status = {}
        progress = status.get("progress") or {}
        kept = len(list(Path(progress["path"]).glob("block-*.pt"))) if progress.get("path") else 0
        if requeued is None and progress.get("blocks") and kept >= progress["blocks"] // 2:
            subprocess.run(["scontrol", "requeue", status["slurm_job"]], check=True)
            requeued = status["slurm_job"]
            print(f"requeued SLURM job {requeued} with {kept} of {progress['blocks']} blocks kept", flush=True)
        if requeued and not released and status.get("state") == "stopped":
            state = subprocess.run(["squeue", "-h", "-j", requeued, "-o", "%T %r"], capture_output=True,
                                   text=True).stdout.strip()
            if state == "PENDING BeginTime":
                subprocess.run(["scontrol", "update", f"JobId={requeued}", "StartTime=now"], check=True)
                released = True
        time.sleep(0.2)
    wall = time.perf_counter() - start
    events = _events(sweep_dir / "0")
    spans = _quantize_seconds(events)
    blocks = [e for e in events if e["event"] == "blocks"][-1]["passes"]
    print(timeline(sweep_events(sweep_dir)))
    print(f"requeued: {wall:.1f} s wall in all (SLURM's requeue delay cut short), quantizing "
          f"{' + '.join(f'{s:.1f}' for s in spans)} s over {len(spans)} attempts; blocks {json.dumps(blocks)}")
    same = numbers(work / "results_requeued") == numbers(work / "results_uninterrupted")
    print(f"uninterrupted quantizing: {reference[0]:.1f} s; identical ppl and KLD to the uninterrupted job: {same}; "
          f"machine: {machine()}; load average now {load()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["sweep", "requeue"])
    parser.add_argument("--quick", action="store_true", help="1 eval window, 4 x 128 calibration: checks it runs")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_cluster"))
    args = parser.parse_args()
    work = args.workdir / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    {"sweep": sweep, "requeue": requeue}[args.what](args, work)


if __name__ == "__main__":
    main()
