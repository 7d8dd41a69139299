"""The export stage (`export=gptq|awq_gemm|compressed-tensors`): a deployable checkpoint of the run, written with its results as
results/<run_id>/checkpoint-<format>/ (checksummed in DONE like every other file of the run).

The run evaluates the weights the checkpoint holds (kernels.export.as_stored: fp16 scales), so evaluating the
exported directory with `method=checkpoint` gives the run's numbers again.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from torch import nn

from core.spec import QuantSpec
from kernels.export import as_stored, save_quantized


def stored_artifacts(artifacts: dict, fmt: str | None) -> dict:
    """The artifacts as the export stores them (unchanged when nothing is exported)."""
    return artifacts if fmt is None else {name: as_stored(art, fmt) for name, art in artifacts.items()}


def export_files(model: nn.Module, artifacts: dict, fmt: str, spec: QuantSpec, tokenizer) -> dict[str, bytes]:
    """{path under the run directory: bytes} of the `fmt` checkpoint of `model` with `artifacts` (as stored)."""
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        out = save_quantized(model, artifacts, Path(tmp) / "checkpoint", fmt, spec, tokenizer)
        return {f"checkpoint-{fmt}/{path.relative_to(out)}": path.read_bytes()
                for path in sorted(out.rglob("*")) if path.is_file()}
