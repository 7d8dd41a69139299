"""The arena's speed column: each checkpoint's prefill and decode tokens/s in its own CPU runtime, beside the
unquantized baseline in that same runtime (one process, measured alternately, threads fixed, same prompt and decode
lengths), and the fraction of the machine's bandwidth bound that decode reaches.

    python benchmarks/bench_runtimes.py --base BASE_DIR [--base-gguf BASE-F32.gguf] [--threads 2] [--prompt 128]
        [--decode 32] [--repeats 3] [--csv OUT.csv] [LABEL=]CHECKPOINT ...

Runtimes, by the checkpoint's format (each library in its venv under $QUANT_HARNESS_VENVS, default /work/venvs,
running benchmarks/runtime_worker.py): GGUF -> llama.cpp through llama-cpp-python (`llamacpp`, baseline
--base-gguf, written from BASE by scripts/produce/gguf_write.py when not given: Llama only, and without the
merges llama.cpp's tokenizer needs, so give it for a real model: arena.sh gives the packaged file requantized to
F32); bitsandbytes and torchao -> transformers' own CPU paths (`bnb`, `torchao` venvs); optimum-quanto -> its QuantizedModelForCausalLM
(`quanto`); MLX -> mlx-lm on MLX's CPU build (`mlx`); GPTQ, AWQ, compressed-tensors, AutoRound and any other
checkpoint read as codes/scales/zeros -> ours, `kernel=cpu_int4`, in this process. HQQ and checkpoints carried
dequantized elsewhere: "no CPU runtime" (transformers 5.23 refuses to load HQQ, and HQQ's own loader reads only its
pickle format). A runtime whose venv is missing is one line saying so.

Bandwidth bound: bytes of weights read per decoded token (every stored tensor; the embedding table only when it is
also the output matrix, else one row) / the machine's read bandwidth, measured here (torch sum over 1 GiB with the
same thread count, best of 5). Decode tok/s / bound = the fraction of what the hardware allows.

A benchmark, never a test. Printed with the table: the commit, the machine, each runtime's library versions, and the
share of the CPUs other processes took during the benchmark (/proc/stat less this process and its workers): above 5 %
the figures are labelled "under load", not quiet-machine figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.labels import rate_text  # the project root is on the path from here
from harness.provenance import cpu_model, git_sha

VENVS = Path(os.environ.get("QUANT_HARNESS_VENVS", "/work/venvs"))
# reader name -> (worker runtime, venv); None: ours, in this process
RUNTIMES = {"gguf": ("llamacpp", "llamacpp"), "bitsandbytes": ("transformers", "bnb"),
            "torchao": ("transformers", "torchao"), "quanto": ("quanto", "quanto"), "mlx": ("mlx", "mlx")}
NO_RUNTIME = {"hqq": "no CPU runtime (transformers 5.23 cannot load HQQ; HQQ's loader reads only its pickle format)"}


class OtherWork:
    """How busy other processes keep the CPUs from construction until `fraction()`: all CPUs' busy time (/proc/stat)
    less this process's and its finished children's (the runtime workers). The load average is no test of quiet: it
    still remembers, for minutes, work that has ended."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
        except (OSError, ValueError):
            return None
        hz, own = os.sysconf("SC_CLK_TCK"), os.times()
        busy = (sum(fields) - fields[3] - fields[4]) / hz  # all but idle and iowait, seconds summed over CPUs
        return time.monotonic(), busy, own.user + own.system + own.children_user + own.children_system

    def fraction(self) -> float | None:
        now = self._sample()
        if self.start is None or now is None or now[0] - self.start[0] <= 0:
            return None
        others = (now[1] - self.start[1]) - (now[2] - self.start[2])
        return max(others, 0.0) / ((now[0] - self.start[0]) * (os.cpu_count() or 1))


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second the CPU reads with `threads` threads: best of `repeats` sums over a `gib` GiB buffer."""
    torch.set_num_threads(threads)
    buffer = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - t0)
    return buffer.numel() * 4 / best


def bytes_per_token(path: Path) -> int:
    """Weight bytes read per decoded token: every stored tensor, the embedding table in full only when it is also
    the output matrix (tied), else one row of it."""
    if path.is_file():  # GGUF
        from checkpoints.gguf import open_gguf

        tensors = {t.name: (int(t.n_bytes), [int(d) for d in t.shape]) for t in open_gguf(path).tensors}
        embed = "token_embd.weight"
        tied = "output.weight" not in tensors
    else:
        from safetensors import safe_open

        from checkpoints.hf import weight_files

        tensors = {}
        for file in weight_files(path):
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    shape = piece.get_shape()
                    size = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4}.get(piece.get_dtype(), 1)
                    tensors[name] = (size * max(1, int(torch.tensor(shape).prod())) if shape else size, shape)
        embed = "model.embed_tokens.weight"
        tied = "lm_head.weight" not in tensors
    total = sum(n for n, _ in tensors.values())
    if embed in tensors and not tied:
        n, shape = tensors[embed]
        total -= n - n // max(1, shape[0] if not path.is_file() else shape[-1])
    return total


def measure_ours(base: Path, path: Path, args) -> dict:
    """GPTQ/AWQ/compressed-tensors/...: our reader's artifacts packed for kernel=cpu_int4, against the fp32 base."""
    import copy
    import importlib.util

    from transformers import AutoModelForCausalLM

    from checkpoints.base import reader_for
    from kernels.quant_linear import pack_model

    spec = importlib.util.spec_from_file_location("runtime_worker", ROOT / "benchmarks" / "runtime_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    torch.set_num_threads(args.threads)
    baseline = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    contents = reader_for(path).read(path, baseline)
    quantized = copy.deepcopy(baseline)
    quantized.load_state_dict({k: t.float() for k, t in contents.tensors.items()}, strict=False)
    pack_model(quantized, contents.artifacts, "cpu_int4")
    runs = {"baseline": worker.torch_runner(baseline), "quantized": worker.torch_runner(quantized)}
    vocab = baseline.config.vocab_size
    prompt, steps = worker.tokens(vocab, args.prompt, args.seed), worker.tokens(vocab, args.decode, args.seed + 1)
    times = {name: [] for name in runs}
    for run in runs.values():
        run(prompt[:16], steps[:2])
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(run(prompt, steps))
    return {name: {"prefill_tps": args.prompt / statistics.median(t[0] for t in ts),
                   "decode_tps": args.decode / statistics.median(t[1] for t in ts),
                   "prefill_s": [t[0] for t in ts], "decode_s": [t[1] for t in ts]} for name, ts in times.items()}


def measure(label: str, path: Path, args, base_gguf: Path | None) -> dict:
    from checkpoints.base import reader_for

    reader = reader_for(path)
    row = {"label": label, "path": str(path), "format": reader.name}
    if reader.name in NO_RUNTIME or (reader.name not in RUNTIMES and not reader.describe(path).packable):
        row["runtime"] = NO_RUNTIME.get(reader.name, "no CPU runtime (carried dequantized: no packed kernel)")
        return row
    if reader.name not in RUNTIMES:
        row["runtime"] = f"ours cpu_int4 torch {torch.__version__}"
        row.update(measure_ours(args.base, path, args))
        return row
    runtime, venv = RUNTIMES[reader.name]
    python = VENVS / venv / "bin" / "python"
    row["runtime"] = f"{runtime} ({venv} venv)"
    if not python.is_file():
        row["runtime"] = f"skipped: {python} is missing (scripts/setup_*_reference.sh)"
        return row
    base = base_gguf if runtime == "llamacpp" else args.base
    command = [str(python), str(ROOT / "benchmarks" / "runtime_worker.py"), runtime, "--base", str(base),
               "--quantized", str(path), "--threads", str(args.threads), "--prompt", str(args.prompt), "--decode",
               str(args.decode), "--repeats", str(args.repeats), "--seed", str(args.seed)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        row["runtime"] += f": FAILED ({(done.stderr.strip().splitlines() or ['?'])[-1]})"
        return row
    row.update(json.loads(done.stdout.strip().splitlines()[-1]))
    row["runtime"] += " " + " ".join(f"{name} {v}" for name, v in row.pop("versions", {}).items())
    return row


QUIET = 0.05  # other work's share of the CPUs below which the machine counts as quiet


def _speedups(quantized: dict, baseline: dict) -> str:
    """Decode speedup over the baseline per repeat (the two alternate, so each repeat is a pair that shared the
    machine's state): median [min, max]."""
    ratios = [b / q for q, b in zip(quantized["decode_s"], baseline["decode_s"])]
    return f"{statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]"


def _share(fraction: float | None) -> str:
    return "unknown" if fraction is None else f"{fraction:.0%}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="[LABEL=]PATH of each checkpoint (a GGUF file or a directory)")
    p.add_argument("--base", type=Path, required=True, help="the unquantized model directory (the baseline)")
    p.add_argument("--base-gguf", type=Path, help="the baseline for llama.cpp (default: BASE written as F32 GGUF)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", type=Path, help="also write the rows here")
    args = p.parse_args()
    specs = [(c.split("=", 1) if "=" in c else (Path(c).name.removesuffix(".gguf"), c)) for c in args.checkpoints]
    base_gguf = args.base_gguf
    if base_gguf is None and any(Path(c).is_file() for _, c in specs):
        base_gguf = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-base-{args.base.name}-F32.gguf"
        if not base_gguf.exists():
            subprocess.run([sys.executable, str(ROOT / "scripts/produce/gguf_write.py"), "from-hf", str(args.base),
                            str(base_gguf), "--type", "F32"], check=True)
    other_work = OtherWork()
    time.sleep(2.0)
    before = other_work.fraction()
    bandwidth = read_bandwidth(args.threads)
    load = os.getloadavg()[0]
    commit = git_sha()
    print(f"commit {commit}; machine: {cpu_model()}, torch's CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{os.cpu_count()} cores, threads {args.threads}, CPUs busy with other work in the "
          f"2 s before: {_share(before)} (load average {load:.1f}, which remembers ended work); "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s; prompt {args.prompt}, decode {args.decode}, median of "
          f"{args.repeats}")
    rows = []
    for label, path in specs:
        row = measure(label, Path(path), args, base_gguf)
        row["bytes_per_token"] = bytes_per_token(Path(path))
        row["bound_tps"] = bandwidth / row["bytes_per_token"]
        rows.append(row)
    print("| checkpoint | runtime | prefill tok/s (ckpt / base) | decode tok/s (ckpt / base) | decode speedup, median "
          "[min, max] of the paired repeats | MB read / token | decode bound tok/s | fraction of bound |")
    print("|---|---|---|---|---|---:|---:|---:|")
    for row in rows:
        mb = row["bytes_per_token"] / 1e6
        if "quantized" not in row:  # no CPU runtime, a missing venv, or a failure: the runtime column says which
            cell = "no CPU runtime" if row["runtime"].startswith("no CPU runtime") else "–"
            print(f"| {row['label']} | {row['runtime']} | {cell} | {cell} | – | {mb:.1f} | {row['bound_tps']:.0f} | – |")
            continue
        q, b = row["quantized"], row["baseline"]
        print(f"| {row['label']} | {row['runtime']} | {rate_text(q['prefill_tps'])} / {rate_text(b['prefill_tps'])} | "
              f"{rate_text(q['decode_tps'])} / {rate_text(b['decode_tps'])} | {_speedups(q, b)} | {mb:.1f} | "
              f"{row['bound_tps']:.0f} | "
              f"{rate_text(q['decode_tps'] / row['bound_tps'])} |")
    busy = other_work.fraction()
    print(f"CPUs busy with other work during the benchmark: {_share(busy)}"
          f"{'' if busy is not None and busy < QUIET else ' (UNDER LOAD: figures are not quiet-machine figures)'}")
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["label", "format", "runtime", "prefill_tps", "decode_tps", "base_prefill_tps",
                             "base_decode_tps", "bytes_per_token", "bound_tps", "read_bandwidth", "threads",
                             "prompt", "decode", "load_average", "other_work", "commit", "cpu", "decode_s",
                             "base_decode_s"])
            for row in rows:
                q, b = row.get("quantized", {}), row.get("baseline", {})
                writer.writerow([row["label"], row["format"], row["runtime"], q.get("prefill_tps"),
                                 q.get("decode_tps"), b.get("prefill_tps"), b.get("decode_tps"),
                                 row["bytes_per_token"], row["bound_tps"], bandwidth, args.threads, args.prompt,
                                 args.decode, load, busy, commit, cpu_model(), json.dumps(q.get("decode_s")),
                                 json.dumps(b.get("decode_s"))])


if __name__ == "__main__":
    main()
