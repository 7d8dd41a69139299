"""The pack stage: swap the fake-quantized linears for packed QuantLinear layers (`pack`), and refuse a packed model
whose numbers disagree with the fake-quantized one (a packed number is never written unchecked)."""
from __future__ import annotations

import logging

import torch

from harness.perplexity import check_agreement, perplexity
from analysis.results import quant_row
from kernels.quant_linear import pack_model
from structure.pipeline import BlockPipeline

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


def pack(pipeline: BlockPipeline, artifacts: dict, backend: str, probe: tuple[str, torch.Tensor],
         prepare_block=None) -> list[dict]:
    """The run's one packing step: a model in memory is packed in place (pack_in_memory), a streamed one is made
    whole with its linears packed block by block as they arrive (pack_streamed); either way checked on the probe
    window against the fake-quantized model before any number is written."""
    if pipeline.streamed:
        return pack_streamed(pipeline, artifacts, backend, probe, prepare_block)
    return pack_in_memory(pipeline, artifacts, backend, probe)


def pack_in_memory(pipeline: BlockPipeline, artifacts: dict, backend: str,
                   probe: tuple[str, torch.Tensor]) -> list[dict]:
    """Pack every artifact's linear (one GEMM per shared-input group: q/k/v, gate/up), each layer checked against
    its artifact by pack_model; then the probe window's ppl through the packed model must match the fake-quantized
    model's within PACKED_PPL_RTOL (DisagreementError otherwise). Rows: which backend each layer got, and the
    measured ppl ratio packed / fake-quantized."""
    label, window = probe
    model = pipeline.model
    reference = perplexity(pipeline, window, desc="probe: fake-quant")["nll"]
    experts = expert_matrices(pipeline, artifacts)
    dense = {n: artifacts[n] for n in artifacts if n not in experts}
    used = {**pack_model(model, dense, backend, pipeline.layout.shared_input_groups(model)), **experts}
    packed = perplexity(pipeline, window, desc="probe: packed")["nll"]
    check_agreement(f"kernel={backend}, {label}", packed, reference)
    return _pack_rows(used, backend, label, packed, reference)


FAKE_QUANT = "fake-quant"  # what a routed expert runs as: its dequantized weights inside the fused parameters


def expert_matrices(pipeline: BlockPipeline, names) -> dict[str, str]:
    """{expert matrix: "fake-quant"} among `names`: the packed layouts have no grouped-experts form, so a mixture's
    experts stay fake-quantized in their fused parameters (the weights fake-quant evaluation uses); the rows count
    them among the layers the kernel did not run."""
    return {n: FAKE_QUANT for n in names if pipeline.layout.is_expert_matrix(n)}


def _pack_rows(used: dict[str, str], backend: str, label: str, packed: float, reference: float,
               **detail) -> list[dict]:
    """The pack stage's rows: which layers fell back to another backend (or stayed fake-quantized: experts), and the
    probe's ppl ratio packed / fake-quantized."""
    fallbacks = sorted(name for name, b in used.items() if b not in (backend, FAKE_QUANT))
    if fallbacks:
        log.warning("kernel=%s: %d layers fell back to another backend: %s", backend, len(fallbacks), fallbacks[:5])
    experts = sorted(name for name, b in used.items() if b == FAKE_QUANT)
    if experts:
        log.warning("kernel=%s has no layout for fused experts: %d expert matrices stay fake-quantized (only the "
                    "attention and dense linears run packed)", backend, len(experts))
        detail["fake_quant_experts"] = len(experts)
    detail = {"kernel": backend, **detail, **({"fallbacks": {n: used[n] for n in fallbacks}} if fallbacks else {})}
    if backend == "cpu_int4":
        from kernels.cpu_int4 import DENSE_FROM_M, dense_dtype

        detail["dense_from_m"], detail["dense_dtype"] = DENSE_FROM_M, str(dense_dtype()).removeprefix("torch.")
    return [quant_row("kernel_fallback_layers", len(fallbacks) + len(experts), detail),
            quant_row("packed_ppl_ratio", float(torch.tensor(packed - reference).exp()), {"probe": label})]


def packed_size_estimate(model, layout, bits: int | None, group_size: int | None) -> int:
    """Bytes of `model` with its quantized linears packed (codes at `bits`, an fp32 scale and a zero per group) and
    everything else at its dtype (bits=None: an unquantized run, all of it); read from shapes only, so a meta-device
    skeleton answers before anything loads."""
    quantized = set() if bits is None else {id(lin.weight) for lin in layout.quantizable_linears(model).values()}
    total = 0
    for p in model.parameters():
        if id(p) in quantized:
            groups = p.shape[1] / (group_size or p.shape[1])
            total += int(p.numel() * bits / 8 + p.shape[0] * groups * 8)
        else:
            total += p.numel() * p.element_size()
    return total


def pack_streamed(pipeline: BlockPipeline, artifacts: dict, backend: str, probe: tuple[str, torch.Tensor],
                  prepare_block) -> list[dict]:
    """Make a streamed model whole in memory with every quantized linear packed as its block arrives (so the
    unquantized model never is), then check the probe window's ppl against the fake-quantized model computed layer
    by layer, as pack_in_memory does for a model in memory. Rows as pack_in_memory's."""
    model, layout = pipeline.model, pipeline.layout
    if not artifacts:  # an unquantized run: nothing to pack or check, the model is only made whole
        pipeline.materialize()
        return []
    label, window = probe
    reference = perplexity(pipeline, window, desc="probe: fake-quant", prepare_block=prepare_block)["nll"]
    groups = layout.shared_input_groups(model)
    used: dict[str, str] = {}

    def pack_block(i, block):
        prefix = f"{layout.block_prefix(i)}."
        if prepare_block is not None:  # the experts' fake-quantized weights, which stay in the fused parameters
            prepare_block(i, block)
        mine = [n for n in artifacts if n.startswith(prefix)]
        experts = expert_matrices(pipeline, mine)
        names = {n: artifacts[n] for n in mine if n not in experts}
        used.update(pack_model(model, names, backend, [g for g in groups if g[0].startswith(prefix)]))
        used.update(experts)

    pipeline.materialize(pack_block)
    packed = perplexity(pipeline, window, desc="probe: packed")["nll"]
    check_agreement(f"kernel={backend}, {label} (streamed model, packed block by block)", packed, reference)
    return _pack_rows(used, backend, label, packed, reference, packed_from="stream")
