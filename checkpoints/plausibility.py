"""How far the weights a checkpoint stores are from the base model's: a damaged or foreign tensor of the right shape
(a flipped exponent in one scale, a layer of another model) is caught here, before anything is evaluated.

The figure per tensor is a relative Frobenius error, ||W_hat - W|| / ||W||: 0 for the base model's own weights, about
0.1-0.4 for 3- and 4-bit quantization, 1.0 for a tensor of zeros, about 1.4 for an unrelated tensor of the same size.
It is measured on the weights as the model computes with them, so that the function-preserving rescaling AWQ folds
into a checkpoint (structure.architectures.ScaleGroup: input columns times s, the previous op's output divided by s)
is not counted as error:

- a linear fed by a norm is compared with the norm's weight folded into its columns, the checkpoint's norm on the
  checkpoint's side and the base model's on the base side: W_hat diag(n_hat) against W diag(n);
- a linear fed by another linear (o_proj after v_proj, down_proj after up_proj) is compared as the pair, channel by
  channel through the product they compute: the scale on a shared channel cancels there exactly. Both linears of a
  pair get the pair's figure (and the larger one when a linear belongs to two pairs);
- every other quantized linear, and every other tensor of two or more dimensions the checkpoint stores (embeddings,
  lm_head, fused experts stored whole), is compared as it is;
- a module fed the norm's output that AWQ scales without quantizing it (a mixture's router: ScaleGroup.also_scaled)
  is compared both with the norm folded in, as our AWQ leaves it, and as it is, as AutoAWQ's Mixtral leaves it (it
  does not scale the router): the smaller figure counts.

Mixtures of experts are resolved block by block (layout.parts): an expert's matrix is its slice of the fused
parameter on both sides, its gate/up share the norm's fold with every other expert and the shared expert, and each
expert's up -> down is a pair like a dense MLP's.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from structure.architectures import ModelLayout


def relative_errors(artifacts: Mapping, tensors: Mapping[str, torch.Tensor], layout: ModelLayout, model: nn.Module,
                    read: Callable[[str], torch.Tensor]) -> dict[str, float]:
    """{tensor name: relative error} of every quantized matrix (artifacts, by matrix name: linears and experts) and
    every other tensor of two or more dimensions (`tensors`, by state-dict name) against the base model's weights,
    read one at a time with `read(state-dict name)` (a streamed model's from disk; an expert's matrix is its slice of
    the fused parameter); `model` may be a weightless skeleton. Each block is resolved against its own table
    (layout.parts: its experts, its optional modules). A non-finite value in any tensor gives inf."""
    def stored(name: str) -> torch.Tensor:  # the checkpoint's tensor, or the base model's where it stores none
        return tensors[name] if name in tensors else read(name)

    errors: dict[str, float] = {}
    folded_tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # also_scaled weight -> (its norms)
    offset = layout.spec.norm_weight_offset
    for index, block in enumerate(layout.blocks(model)):
        prefix = layout.block_prefix(index)
        matrices = layout.matrices(block)
        fused: dict[tuple[str, int], torch.Tensor] = {}  # (fused parameter, side): read once per block

        def weight(name: str, side: int) -> torch.Tensor:
            """A matrix's weight [out, in] as the checkpoint (side 0) or the base model (side 1) has it."""
            full, matrix = f"{prefix}.{name}", matrices[name]
            if side == 0 and full in artifacts:
                return artifacts[full].dequantize().float()
            source = stored if side == 0 else read
            if isinstance(matrix, nn.Linear):
                return source(f"{full}.weight").float()
            param = f"{prefix}.{layout.spec.moe.experts.path}.{matrix.param_name}"
            if (param, side) not in fused:
                fused[param, side] = source(param).float()
            return matrix.slice_of(fused[param, side])

        norms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # matrix -> (checkpoint's norm, base model's norm)
        pairs: list[tuple[str, str]] = []  # (a matrix, the matrix it feeds through a shared channel)
        for group in layout.scale_groups(block):
            if group.prev in matrices:
                out = matrices[group.prev].out_features
                pairs += [(group.prev, layer) for layer in group.layers if matrices[layer].in_features == out]
            else:
                norm = f"{prefix}.{group.prev}.weight"
                folds = (stored(norm).float() + offset, read(norm).float() + offset)
                norms.update({layer: folds for layer in group.layers})
                # modules fed the same input that AWQ scales too (a router): compared with the fold, or without
                folded_tensors.update({f"{prefix}.{name}.weight": folds for name in group.also_scaled})

        def folded(name: str, w: torch.Tensor, side: int) -> torch.Tensor:
            return w * norms[name][side] if name in norms else w

        paired = {name for pair in pairs for name in pair}
        for name in matrices:
            if f"{prefix}.{name}" in artifacts and name not in paired:
                errors[f"{prefix}.{name}"] = _relative(folded(name, weight(name, 0), 0),
                                                       folded(name, weight(name, 1), 1))
        for first, second in pairs:
            if f"{prefix}.{first}" not in artifacts and f"{prefix}.{second}" not in artifacts:
                continue
            error = _pair_relative(folded(first, weight(first, 0), 0), weight(second, 0),
                                   folded(first, weight(first, 1), 1), weight(second, 1))
            for name in (first, second):
                full = f"{prefix}.{name}"
                if full in artifacts:
                    errors[full] = max(errors.get(full, 0.0), error)
    state = set(model.state_dict())
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            errors[name] = float("inf")
        elif tensor.dim() >= 2 and name in state:
            base = read(name).float()
            errors[name] = _relative(tensor.float(), base)
            if name in folded_tensors:  # AWQ folded the norm's scale into it (ours), or left it alone (AutoAWQ's)
                theirs, mine = folded_tensors[name]
                errors[name] = min(errors[name], _relative(tensor.float() * theirs, base * mine))
    return errors


def _relative(ours: torch.Tensor, base: torch.Tensor) -> float:
    """||ours - base|| / ||base|| (inf when `ours` is not finite)."""
    if not torch.isfinite(ours).all():
        return float("inf")
    return float((ours.double() - base.double()).norm() / base.double().norm().clamp_min(1e-30))


def _pair_relative(first_hat: torch.Tensor, second_hat: torch.Tensor, first: torch.Tensor,
                   second: torch.Tensor) -> float:
    """The relative error of two chained linears, first [m, n] feeding second [o, m], channel by channel: the error of
    the tensor T[o, i, j] = second[o, i] * first[i, j] (what channel i contributes), so a scale s_i on channel i's
    row of `first` and 1 / s_i on its column of `second` cancel. Computed without building T: per channel,
    ||a b^T - c d^T||^2 = |a|^2 |b|^2 + |c|^2 |d|^2 - 2 (a.c)(b.d)."""
    if not (torch.isfinite(first_hat).all() and torch.isfinite(second_hat).all()):
        return float("inf")
    a, b = second_hat.double().t(), first_hat.double()  # [m, o], [m, n]: channel i's column and row
    c, d = second.double().t(), first.double()
    aa, bb, cc, dd = (x.pow(2).sum(1) for x in (a, b, c, d))
    ac, bd = (a * c).sum(1), (b * d).sum(1)
    error = (aa * bb + cc * dd - 2 * ac * bd).sum().clamp_min(0)
    return float(error.sqrt() / (cc * dd).sum().sqrt().clamp_min(1e-30))
