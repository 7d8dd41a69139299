"""The pack stage: swap the fake-quantized linears for packed QuantLinear layers, and refuse a packed model whose
numbers disagree with the fake-quantized one (a packed number is never written unchecked)."""
from __future__ import annotations

import logging

import torch

from harness.perplexity import check_agreement, perplexity
from harness.results import quant_row
from kernels.quant_linear import pack_model
from structure.architectures import layout_for

log = logging.getLogger(__name__)


def probe_window(windows: dict[str, torch.Tensor], vocab_size: int, seqlen: int,
                 seed: int) -> tuple[str, torch.Tensor]:
    """(label, one window [1, seqlen]) on which the packed model is checked against the fake-quantized one: the
    first window of the first eval set, or seeded random tokens when no set is evaluated."""
    if windows:
        name = next(iter(windows))
        return f"eval set {name!r}, window 0", windows[name][:1]
    g = torch.Generator().manual_seed(seed)
    return "random tokens", torch.randint(0, vocab_size, (1, seqlen), generator=g)


def pack_stage(model, artifacts: dict, backend: str, probe: tuple[str, torch.Tensor],
               device: torch.device) -> list[dict]:
    """Pack every artifact's linear (one GEMM per shared-input group: q/k/v, gate/up), each layer checked against
    its artifact by pack_model; then the probe window's ppl through the packed model must match the fake-quantized
    model's within PACKED_PPL_RTOL (DisagreementError otherwise). Rows: which backend each layer got, and the
    measured ppl ratio packed / fake-quantized."""
    label, window = probe
    reference = perplexity(model, window, device, desc="probe: fake-quant")["nll"]
    used = pack_model(model, artifacts, backend, layout_for(model).shared_input_groups(model))
    packed = perplexity(model, window, device, desc="probe: packed")["nll"]
    check_agreement(f"kernel={backend}, {label}", packed, reference)
    fallbacks = sorted(name for name, b in used.items() if b != backend)
    if fallbacks:
        log.warning("kernel=%s: %d layers fell back to another backend: %s", backend, len(fallbacks), fallbacks[:5])
    detail = {"kernel": backend, "fallbacks": {n: used[n] for n in fallbacks}} if fallbacks else {"kernel": backend}
    if backend == "cpu_int4":
        from kernels.cpu_int4 import DENSE_FROM_M, dense_dtype

        detail["dense_from_m"], detail["dense_dtype"] = DENSE_FROM_M, str(dense_dtype()).removeprefix("torch.")
    return [quant_row("kernel_fallback_layers", len(fallbacks), detail),
            quant_row("packed_ppl_ratio", float(torch.tensor(packed - reference).exp()), {"probe": label})]
