"""The export stage (`export=gptq|awq_gemm|compressed-tensors`): a deployable checkpoint of the run, written with its results as
results/<run_id>/checkpoint-<format>/ (checksummed in DONE like every other file of the run).

The run evaluates the weights the checkpoint holds (kernels.export.as_stored: fp16 scales), so evaluating the
exported directory with `method=checkpoint` gives the run's numbers again. The checkpoint also holds PROVENANCE_FILE:
which run made it and from which calibration draw, so a `method=checkpoint` run of it records that draw too (its
comparisons are then "conditional on one calibration draw", as the run's own are). Other tools ignore the file.
A mixture's experts are written one by one, under the names GPTQModel and vLLM load them by (the architecture
table's `Experts.stored`, mapped by checkpoints.stored: kernels/ knows no model family).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from torch import nn

from checkpoints.stored import export_names
from core.spec import QuantSpec
from kernels.export import as_stored, save_quantized


def stored_artifacts(artifacts: dict, fmt: str | None) -> dict:
    """The artifacts as the export stores them (unchanged when nothing is exported)."""
    return artifacts if fmt is None else {name: as_stored(art, fmt) for name, art in artifacts.items()}


PROVENANCE_FILE = "quant_harness.json"
CALIBRATION_KEYS = ("calib_source", "calib_samples", "calib_seqlen", "calib_seed")


def export_files(model: nn.Module, artifacts: dict, fmt: str, spec: QuantSpec, tokenizer,
                 provenance: dict | None = None) -> dict[str, bytes]:
    """{path under the run directory: bytes} of the `fmt` checkpoint of `model` with `artifacts` (as stored), with
    `provenance` (the making run's id, configuration and calibration draw, see made_by) as PROVENANCE_FILE."""
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        out = save_quantized(model, artifacts, Path(tmp) / "checkpoint", fmt, spec, tokenizer,
                             **export_names(model, artifacts))
        files = {f"checkpoint-{fmt}/{path.relative_to(out)}": path.read_bytes()
                 for path in sorted(out.rglob("*")) if path.is_file()}
    if provenance is not None:
        text = json.dumps(provenance, indent=2, sort_keys=True) + "\n"
        files[f"checkpoint-{fmt}/{PROVENANCE_FILE}"] = text.encode()
    return files


def made_by(columns: dict) -> dict:
    """The provenance an export records, from the run's run-level columns: its id, configuration (replicate_of),
    method and calibration draw (None for a run that does not calibrate)."""
    calibration = {k: columns[k] for k in CALIBRATION_KEYS} if columns.get("calib_seed") is not None else None
    return {"made_by": "quant-harness", "run_id": columns["run_id"], "replicate_of": columns["replicate_of"],
            "method": columns["method"], "calibration": calibration}


def calibration_of(path: str | Path | None) -> dict | None:
    """The calibration draw ({calib_source, calib_samples, calib_seqlen, calib_seed}) a checkpoint directory of our
    own export was made from, read from its PROVENANCE_FILE; None for any other checkpoint or an uncalibrated run."""
    try:
        recorded = json.loads((Path(path).expanduser() / PROVENANCE_FILE).read_text())
    except (TypeError, OSError, ValueError):
        return None
    calibration = recorded.get("calibration") if isinstance(recorded, dict) else None
    if not isinstance(calibration, dict) or any(k not in calibration for k in CALIBRATION_KEYS):
        return None
    return {k: calibration[k] for k in CALIBRATION_KEYS}
