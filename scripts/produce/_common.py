"""Helpers shared by the producers in scripts/produce/ (calibration tokens, atomic output, PRODUCER.json).

Only the standard library, torch and (for the harness's own calibration draw) the project's `harness` package;
nothing from benchmarks/. The producers put this directory on sys.path, so they run as plain scripts.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Calibration:
    tokens: torch.Tensor  # int64 [n_samples, seqlen]
    info: dict = field(default_factory=dict)  # what PRODUCER.json records about it


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration (either --calib-tokens, or the harness's own draw)")
    g.add_argument("--calib-tokens", type=Path, default=None,
                   help="a torch.save'd int64 tensor [n, seqlen] of token ids (then --n-samples/--seqlen/--seed "
                        "/--calib-source must not be given)")
    g.add_argument("--calib-source", default=None,
                   help="harness data source of the calibration draw (default wiki)")
    g.add_argument("--n-samples", type=int, default=None, help="calibration windows (default 128)")
    g.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 512)")
    g.add_argument("--seed", type=int, default=None, help="calibration draw seed (default 0)")


def _fingerprint16(t: torch.Tensor) -> str:
    """The harness's TokenSet.fingerprint: sha256 of the int64 ids' bytes, first 16 hex digits."""
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def resolve_calibration(args, tokenizer, vocab_size: int) -> Calibration:
    """--calib-tokens FILE, or harness.data.calibration_tokens(source, TextSourceConfig(kind=source), ...) exactly
    as a harness run (calib.source/n_samples/seqlen/seed) draws it."""
    draw_args = {"--calib-source": args.calib_source, "--n-samples": args.n_samples, "--seqlen": args.seqlen,
                 "--seed": args.seed}
    if args.calib_tokens is not None:
        given = [k for k, v in draw_args.items() if v is not None]
        if given:
            sys.exit(f"error: {', '.join(given)} cannot be combined with --calib-tokens (the file fixes the windows)")
        tokens = torch.load(args.calib_tokens, map_location="cpu", weights_only=True)
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tokens.dim() != 2:
            sys.exit(f"error: --calib-tokens {args.calib_tokens}: expected an int64 tensor [n, seqlen], got "
                     f"{type(tokens).__name__} {getattr(tokens, 'dtype', '')} {tuple(getattr(tokens, 'shape', ()))}")
        tokens = tokens.contiguous()
        info = {"kind": "file", "path": str(args.calib_tokens),
                "file_sha256": hashlib.sha256(Path(args.calib_tokens).read_bytes()).hexdigest()}
    else:
        from harness.config import TextSourceConfig
        from harness.data import calibration_tokens
        from harness.models import default_cache_dir

        source = args.calib_source or "wiki"
        n, seqlen, seed = args.n_samples or 128, args.seqlen or 512, 0 if args.seed is None else args.seed
        ts = calibration_tokens(source, TextSourceConfig(kind=source), tokenizer, default_cache_dir(), n, seqlen, seed)
        tokens = ts.tokens.contiguous()
        info = {"kind": "harness", "source": source, "n_samples": n, "seqlen": seqlen, "seed": seed,
                "harness_fingerprint": ts.fingerprint}
    if tokens.numel() == 0 or int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size:
        sys.exit(f"error: calibration token ids must lie in [0, {vocab_size}) (the model's vocab_size)")
    info.update({"shape": list(tokens.shape), "dtype": str(tokens.dtype).replace("torch.", ""),
                 "fingerprint": _fingerprint16(tokens),  # same definition as harness TokenSet.fingerprint
                 "tokens_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest()})
    return Calibration(tokens, info)


class AtomicOutput:
    """Build the checkpoint in a sibling temp dir; on success write PRODUCER.json and rename it onto --out.

    An existing --out is refused before any work unless force=True; it is replaced only after the new one is
    complete. On failure the temp dir is removed and --out is untouched."""

    def __init__(self, out: Path, force: bool):
        self.out = Path(out).resolve()
        if self.out.exists() and not force:
            sys.exit(f"error: {self.out} exists (use --force to replace it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old)
        return False


def base_model_info(model_dir: Path) -> dict:
    """The base model as given, with sha256 of its config.json and of each *.safetensors file."""
    model_dir = Path(model_dir)
    sha = lambda f: hashlib.sha256(f.read_bytes()).hexdigest()  # noqa: E731
    info = {"path": str(model_dir)}
    if (model_dir / "config.json").is_file():
        info["config_sha256"] = sha(model_dir / "config.json")
    info["safetensors_sha256"] = {f.name: sha(f) for f in sorted(model_dir.glob("*.safetensors"))}
    return info


def write_producer_json(directory: Path, *, tool: str, tool_version: str, script: str, args, calib: Calibration,
                        library_config: dict, extra: dict | None = None) -> None:
    import transformers

    record = {
        "tool": tool,
        "tool_version": tool_version,
        "producer": script,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "argv": sys.argv[1:],
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "base_model": base_model_info(args.model),
        "calibration": calib.info,
        "library_config": library_config,
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "GPTQMODEL_CPU_WORKERS") if k in os.environ},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        record.update(extra)
    (directory / "PRODUCER.json").write_text(json.dumps(record, indent=2, default=str) + "\n")

