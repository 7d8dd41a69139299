"""QuantLinear: a drop-in nn.Linear replacement that stores packed weights and runs them on one backend
(kernels.backends: reference, cpu_int4, triton).

`pack_model` swaps named nn.Linear modules for QuantLinear and falls back to "reference" for any layer the
requested backend cannot take, reporting which backend each layer actually got. Linears fed the very same
tensor (q/k/v after a norm, gate/up) can run as one GEMM over their concatenated weights: each member
becomes a slice of a SharedInputLinear. The math per output column is unchanged; a decode step makes
fewer, larger kernel calls, and per-call overhead is what dominates small models' decode on CPU.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from core.spec import QuantizedWeights
from kernels.backends import BACKENDS, LayerMeta

log = logging.getLogger(__name__)


class PackCheckError(RuntimeError):
    """A packed layer disagrees with its artifact: raised at pack time, before any evaluation uses it."""


def unsupported_reason(backend: str, art: QuantizedWeights) -> str | None:
    """Why `backend` cannot run this artifact (a short phrase), or None when it can."""
    return BACKENDS.get(backend).unsupported_reason(art)


def check_backend_device(backend: str, device: torch.device) -> None:
    """Raise ValueError when `backend` cannot run on `device` at all (not a per-layer fallback case)."""
    BACKENDS.get(backend).check_device(torch.device(device))


class QuantLinear(nn.Module):
    """y = x @ dequant(W).T + b from packed weights; input [..., in] in any float dtype, output in the same dtype."""

    def __init__(self, art: QuantizedWeights, bias: torch.Tensor | None = None, backend: str = "reference") -> None:
        super().__init__()
        reason = unsupported_reason(backend, art)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run this layer: {reason}; use backend='reference'")
        self.in_features, self.out_features = art.in_features, art.out_features
        self.bits, self.group_size, self.backend = art.bits, art.group_size, backend
        packed = BACKENDS.get(backend).pack(art)
        for name, tensor in packed.items():
            self.register_buffer(name, tensor)
        self.packed_names = tuple(packed)
        self.meta = LayerMeta(self.in_features, self.out_features, self.bits, self.group_size)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = {name: getattr(self, name) for name in self.packed_names}
        return BACKENDS.get(self.backend).run(x, packed, self.meta, self.bias)

    def extra_repr(self) -> str:
        g = "channel" if self.group_size is None else self.group_size
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={g}, backend={self.backend}"


@torch.no_grad()
def verify_packed(name: str, layer: QuantLinear, art: QuantizedWeights, seed: int = 0) -> float:
    """Check `layer` once against x @ dequantize(art).T (+ bias) at each of its backend's check_sizes (one M per
    regime: decode, prefill); return the largest relative (Frobenius) error. Raises PackCheckError naming the
    layer, the backend and the error when it exceeds the backend's tolerance (or is not finite)."""
    backend = BACKENDS.get(layer.backend)
    device = layer.scales.device
    w = art.dequantize(torch.float32).to(device)
    bias = None if layer.bias is None else layer.bias.float()
    tol, worst = backend.tolerance, 0.0
    for m in backend.check_sizes:
        x = torch.randn(m, art.in_features, generator=torch.Generator().manual_seed(seed)).to(device)
        ref = torch.nn.functional.linear(x, w, bias)
        err = ((layer(x).float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        if not err <= tol:  # also catches NaN
            raise PackCheckError(
                f"pack check failed: layer {name!r} on backend {layer.backend!r} at M={m}: relative error {err:.3g} "
                f"against its dequantized artifact exceeds {tol:g}. The packed path computes wrong numbers on this "
                f"machine (torch {torch.__version__}, CPU kernel family "
                f"{torch.backends.cpu.get_cpu_capability()}); no result is computed through it.")
        worst = max(worst, err)
    return worst


def concat_artifacts(arts: Sequence[QuantizedWeights]) -> QuantizedWeights:
    """Stack artifacts that read the same input along the output dimension (one GEMM computes them all)."""
    first = arts[0]
    for art in arts[1:]:
        if (art.in_features, art.bits, art.group_size, art.symmetric) != (first.in_features, first.bits,
                                                                           first.group_size, first.symmetric):
            raise ValueError("concat_artifacts: members differ in in_features, bits, group_size or symmetry")
        if art.g_idx is not None or first.g_idx is not None:
            raise ValueError("concat_artifacts: act-order g_idx differs per layer; cannot share one GEMM")
    return QuantizedWeights(torch.cat([a.codes for a in arts]), torch.cat([a.scales for a in arts]),
                            torch.cat([a.zeros for a in arts]), first.bits, first.group_size, first.symmetric)


class SharedInputLinear(nn.Module):
    """One QuantLinear over several members' concatenated weights, called once per input tensor.

    The first member called with a tensor computes every member's output; the others slice that result while
    they are handed the very same, unmodified tensor. A member called twice, or with another tensor, triggers a
    fresh computation, so any call pattern gives the right answer. The result is dropped as soon as every
    member has taken its slice, so no activation outlives the block's forward."""

    def __init__(self, linear: QuantLinear, n_members: int) -> None:
        super().__init__()
        self.linear, self.n_members = linear, n_members
        self._input, self._version, self._output, self._served = None, None, None, set()

    def output_for(self, x: torch.Tensor, member: int) -> torch.Tensor:
        if self._output is None or x is not self._input or x._version != self._version or member in self._served:
            self._input, self._version, self._output, self._served = x, x._version, self.linear(x), set()
        output = self._output
        self._served.add(member)
        if len(self._served) == self.n_members:
            self._input = self._output = None
        return output


class SharedInputSlice(nn.Module):
    """Stands in for one member linear: columns [start, stop) of its SharedInputLinear's output."""

    def __init__(self, shared: SharedInputLinear, member: int, start: int, stop: int) -> None:
        super().__init__()
        self.shared, self.member, self.start, self.stop = shared, member, start, stop
        self.in_features, self.out_features = shared.linear.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output_for(x, self.member)[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return f"columns [{self.start}, {self.stop}) of a shared {self.shared.linear.extra_repr()}"


def _shared_artifact(names: Sequence[str], artifacts: dict[str, QuantizedWeights], linears: dict,
                     backend: str) -> QuantizedWeights | None:
    """The members' concatenated artifact when `backend` can run the group as one GEMM, else None."""
    arts = [artifacts.get(n) for n in names]
    if len(names) < 2 or any(a is None for a in arts) or not all(n in linears for n in names):
        return None
    try:
        shared = concat_artifacts(arts)
    except ValueError:
        return None
    return shared if unsupported_reason(backend, shared) is None else None


@torch.no_grad()
def pack_model(model: nn.Module, artifacts: dict[str, QuantizedWeights], backend: str,
               shared_inputs: Sequence[Sequence[str]] = ()) -> dict[str, str]:
    """Replace each named nn.Linear by a QuantLinear in place; return {layer name: backend actually used}.

    Every packed layer is checked against its artifact (verify_packed) before it replaces anything: a backend that
    computes wrong numbers on this machine raises PackCheckError before its layer is used.

    shared_inputs: groups of layer names fed the very same tensor; each group the backend can run as one GEMM
    becomes a SharedInputLinear with a SharedInputSlice per member (others are packed one by one)."""
    BACKENDS.get(backend)  # an unknown name fails here, before anything is replaced
    linears = {}
    for name, art in artifacts.items():
        if not isinstance(art, QuantizedWeights):
            raise ValueError(f"pack_model: {name} is stored as {art.format}, which has no codes/scales/zeros form; "
                             "packed kernels cannot run it: evaluate it fake-quantized (kernel=null, no timing)")
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"pack_model: {name!r} is a {type(module).__name__}, expected nn.Linear")
        if tuple(module.weight.shape) != (art.out_features, art.in_features):
            raise ValueError(f"pack_model: {name!r} has weight {tuple(module.weight.shape)}, artifact is "
                             f"{(art.out_features, art.in_features)}")
        linears[name] = module
    for device in {m.weight.device for m in linears.values()}:  # fail before replacing anything
        check_backend_device(backend, device)

    used, reasons = {}, Counter()
    for names in shared_inputs:
        art = _shared_artifact(names, artifacts, linears, backend)
        if art is None:
            continue
        members = [linears.pop(n) for n in names]
        device = members[0].weight.device
        bias = None
        if any(m.bias is not None for m in members):
            bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in members])
        shared = SharedInputLinear(QuantLinear(art.to(device), bias, backend).to(device), len(names))
        verify_packed("+".join(names), shared.linear, art)
        start = 0
        for index, (name, module) in enumerate(zip(names, members)):
            _replace(model, name, SharedInputSlice(shared, index, start, start + module.out_features))
            start += module.out_features
            used[name] = backend
    for name, module in linears.items():
        art = artifacts[name]
        reason = unsupported_reason(backend, art)
        used[name] = backend if reason is None else "reference"
        if reason is not None:
            reasons[reason] += 1
        device = module.weight.device
        layer = QuantLinear(art.to(device), module.bias, used[name]).to(device)
        verify_packed(name, layer, art)
        _replace(model, name, layer)
    if reasons:
        log.warning("pack_model: %d of %d layers fell back from %s to reference: %s", sum(reasons.values()), len(used),
                    backend, dict(reasons))
    return used


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
