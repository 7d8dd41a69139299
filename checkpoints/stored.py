"""How checkpoints name a model's tensors where they differ from the model's own names, from the architecture table.

transformers 5 fuses a mixture's experts into 3-D parameters (`mlp.experts.gate_up_proj` [E, 2I, H]), but checkpoints
store them one expert at a time, under the names the families had before (the table's `Experts.stored`): Mixtral's
`block_sparse_moe.experts.{e}.w1` (gate), `w3` (up), `w2` (down), the Qwen-likes' `mlp.experts.{e}.gate_proj`; a
quantized checkpoint's per-expert `<stored>.qweight` / `.weight_packed` too (GPTQModel, llm-compressor, vLLM). Other
tensors of a mixture may be renamed as well (`Experts.renamed`: Mixtral's router `block_sparse_moe.gate`).

`StoredNames` holds both directions for one model: readers turn what a checkpoint stores into our names (an expert's
matrix `model.layers.3.mlp.experts.5.up_proj`, the router's state-dict name), the export turns our names into what
other tools load. A name the table does not rename is its own stored name. Tools on transformers 5 do not all write
the table's names: GPTQModel 7.6 (through its defuser) writes our own expert names (`mlp.experts.{e}.gate_proj`, for
Mixtral too), llm-compressor 0.14 writes them with the block's renamed prefixes (Mixtral's
`block_sparse_moe.experts.{e}.gate_proj`). A reader takes all three spellings; the export writes the table's. Nothing
here names a family: every name comes from the table.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from structure.architectures import ModelLayout, layout_for
from structure.experts import PROJECTIONS


@dataclass(frozen=True)
class StoredNames:
    """Our names <-> a checkpoint's names for one model.

    matrices: {our expert matrix name: the linear name checkpoints store it under (the table's `Experts.stored`)}
        (where they differ).
    tensors: {state-dict name: stored name} of renamed tensors (where they differ).
    fused: {our expert matrix name: the state-dict name of the fused parameter it is a slice of}.
    replaced: state-dict names of the fused expert parameters (every expert's slice of one is a matrix).
    aliases: {another spelling of an expert matrix's name that tools write: our name} (our name under the block's
        renamed prefixes).
    """

    matrices: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, str] = field(default_factory=dict)
    fused: dict[str, str] = field(default_factory=dict)
    replaced: frozenset[str] = frozenset()
    aliases: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        matrix_of = {**self.aliases, **{stored: ours for ours, stored in self.matrices.items()}}
        object.__setattr__(self, "_matrix_of", matrix_of)
        object.__setattr__(self, "_tensor_of", {stored: ours for ours, stored in self.tensors.items()})
        experts_of: dict[str, list[str]] = {}
        for matrix, param in self.fused.items():
            experts_of.setdefault(param, []).append(matrix)
        object.__setattr__(self, "experts_of", experts_of)  # {fused parameter: its expert matrices, in order}

    def whole(self, artifacts) -> set[str]:
        """The fused parameters every expert matrix of which has an artifact (written whole by the artifacts)."""
        return {param for param, matrices in self.experts_of.items() if all(m in artifacts for m in matrices)}

    def matrix(self, stored: str) -> str:
        """Our matrix name of a stored linear name (a name the table does not rename is ours already)."""
        return self._matrix_of.get(stored, stored)

    def tensor(self, stored: str) -> str:
        """The state-dict name of a stored tensor name."""
        return self._tensor_of.get(stored, stored)

    def stored_matrix(self, ours: str) -> str:
        return self.matrices.get(ours, ours)

    def stored_tensor(self, ours: str) -> str:
        return self.tensors.get(ours, ours)

    def stored_weight(self, stored: str) -> str | None:
        """Our expert matrix name of a stored per-expert weight tensor (`<stored linear>.weight`), else None."""
        if not stored.endswith(".weight"):
            return None
        name = self.matrix(stored.removesuffix(".weight"))
        return name if name in self.fused else None


def stored_names(model: nn.Module, layout: ModelLayout | None = None) -> StoredNames:
    """The StoredNames of `model` (a weightless skeleton is enough), from its family's table."""
    layout = layout or layout_for(model)
    matrices, tensors, fused, replaced, aliases = {}, {}, {}, set(), {}
    for index, block in enumerate(layout.blocks(model)):
        prefix = layout.block_prefix(index)
        parts = layout.parts(block)
        if parts.moe is None:
            continue
        experts = parts.moe.experts
        _, renamed = layout.stored_sources(block, prefix)
        tensors.update(renamed)
        for e in range(parts.n_experts):
            for i, projection in enumerate(PROJECTIONS):
                ours = f"{prefix}.{experts.path}.{e}.{projection}"
                param = experts.down if projection == "down_proj" else experts.gate_up
                fused[ours] = f"{prefix}.{experts.path}.{param}"
                if experts.stored is not None:
                    matrices[ours] = f"{prefix}.{experts.stored[i].format(e=e)}"
                relative = ours[len(prefix) + 1:]
                for model_prefix, stored_prefix in experts.renamed:
                    if relative.startswith(model_prefix):
                        aliases[f"{prefix}.{stored_prefix}{relative[len(model_prefix):]}"] = ours
        replaced |= {f"{prefix}.{experts.path}.{experts.gate_up}", f"{prefix}.{experts.path}.{experts.down}"}
    return StoredNames({k: v for k, v in matrices.items() if k != v}, {k: v for k, v in tensors.items() if k != v},
                       fused, frozenset(replaced), aliases)


@torch.no_grad()
def assemble_fused(model: nn.Module, weights: dict[str, torch.Tensor], layout: ModelLayout | None = None,
                   names: StoredNames | None = None) -> dict[str, torch.Tensor]:
    """{fused parameter's state-dict name: tensor} built from every expert's full-precision matrix in `weights`
    ({our expert matrix name: [out, in]}), in the model's fused layout (transposed, interleaved: whatever the table
    says). Every expert matrix of a fused parameter must be there: a parameter half made of its experts would hold
    garbage in the others' slices (ValueError naming the first one missing)."""
    layout = layout or layout_for(model)
    names = names or stored_names(model, layout)
    for matrix in weights:
        if matrix not in names.fused:
            raise ValueError(f"{matrix} is not an expert matrix of this model")
    out = {}
    for param in dict.fromkeys(names.fused[matrix] for matrix in weights):  # in the order of `weights`
        matrices = names.experts_of[param]
        missing = [m for m in matrices if m not in weights]
        if missing:
            raise ValueError(f"{param}: the checkpoint stores {len(matrices) - len(missing)} of its {len(matrices)} "
                             f"expert matrices in full precision and not {missing[0]} (quantized or absent): a fused "
                             "parameter is read whole")
        first = layout.matrix(model, matrices[0])
        fused = torch.empty(tuple(first.param.shape), dtype=torch.float32)
        for matrix in matrices:
            layout.matrix(model, matrix).slice_of(fused).copy_(weights[matrix])
        out[param] = fused
    return out


def export_refusal(model: nn.Module, layout: ModelLayout | None = None) -> str | None:
    """Why a per-matrix checkpoint of this model (GPTQ, AWQ, compressed-tensors) would hold its experts in a layout
    no other tool loads (None: it would not): checkpoints of the family store its experts fused, with no per-expert
    names (the table's `Experts.stored` is None, gpt-oss), or with a bias per expert that these formats do not
    hold."""
    layout = layout or layout_for(model)
    moe = layout.spec.moe
    if moe is None or not any(layout.parts(block).moe for block in layout.blocks(model)):
        return None
    experts = moe.experts
    if experts.stored is None or experts.bias:
        return (f"{layout.model_type} checkpoints store the experts fused ({experts.path}.{experts.gate_up}"
                f"{' with biases' if experts.bias else ''}), with no per-expert names that GPTQModel or vLLM load "
                "one expert's packed tensors by; set export=null")
    return None


def export_names(model: nn.Module, artifacts, layout: ModelLayout | None = None) -> dict:
    """The keyword arguments of kernels.export.save_quantized that name `model`'s matrices as checkpoints do:
    `matrices` (every artifact's matrix, experts included), `replaced` (the fused expert parameters, each written as
    its experts' packed tensors), `stored_as` (our names -> other tools' names) and `unquantized` (the routers and
    other full-precision linears of a mixture, by their stored module names). ValueError for a model
    export_refusal refuses, or a fused parameter some of whose experts have no artifact."""
    layout = layout or layout_for(model)
    why = export_refusal(model, layout)
    if why is not None:
        raise ValueError(why)
    names = stored_names(model, layout)
    whole = names.whole(artifacts)
    partial = [param for param, matrices in names.experts_of.items() if param not in whole
               and any(m in artifacts for m in matrices)]
    if partial:
        raise ValueError(f"{partial[0]}: some of its experts have no artifact; a fused parameter is exported whole")
    matrices = layout.quantizable_linears(model)
    kept = set()  # routers (and a mixture's other full-precision linears), as the checkpoint names the modules
    for index, block in enumerate(layout.blocks(model)):
        parts = layout.parts(block)
        if parts.moe is not None:
            prefix = layout.block_prefix(index)
            for module in (parts.moe.experts.router, *parts.moe.experts.keep):
                kept.add(names.stored_tensor(f"{prefix}.{module}.weight").removesuffix(".weight"))
    return {"matrices": {name: matrices[name] for name in artifacts if name in matrices},
            "replaced": whole,
            "stored_as": {**names.matrices, **names.tensors}, "unquantized": kept}
