"""Routed experts as ordinary matrices: one expert's slice of a fused 3-D parameter, and a block's experts turned into
plain `nn.Linear`s while a method works on the block.

transformers 5 stores a mixture's experts fused (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]; gpt-oss stores
them transposed, [E, H, 2I], with gate and up interleaved and biases). The architecture table
(structure/architectures.py) says which layout a family has. Two views of the same numbers come from here:

- `ExpertMatrix`: expert e's gate, up or down as an (out, in) matrix, read as a view of the fused parameter and
  written back into it. It answers like an `nn.Linear` (`in_features`, `out_features`, `weight`), so shapes,
  fake-quant and checkpoint readers treat an expert like any other linear.
- `LinearizedExperts`: the whole experts module rebuilt from `nn.Linear`s whose weights are views of the fused
  parameters, with the model's own routing and activation. While a method works on a block (`linearized`), forward
  hooks, GPTQ's Hessians and AWQ's searches see every expert as an ordinary linear fed exactly the tokens the router
  sent it (or, for statistics, every token: `route_all`); when the block is handed back, what the method wrote into
  the linears goes into the fused parameters. No method needs an `if moe:`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from structure.architectures import Experts

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def expert_count(module: nn.Module, experts: Experts) -> int:
    """E, the number of experts in a fused experts module (its parameters' first dimension), or a linearized one."""
    if isinstance(module, LinearizedExperts):
        return module.num_experts
    return getattr(module, experts.gate_up).shape[0]


def check_fused_layout(module: nn.Module, experts: Experts, name: str) -> None:
    """Refuse an experts module whose fused layout is not the one the table declares (transformers' experts decorator
    records it on the module): reading a transposed or interleaved parameter the other way would be silently
    wrong."""
    declared = {"is_transposed": experts.transposed, "is_concatenated": not experts.interleaved,
                "has_bias": experts.bias}
    found = {k: getattr(module, k) for k in declared if hasattr(module, k)}
    wrong = {k: (declared[k], v) for k, v in found.items() if bool(v) != declared[k]}
    if wrong:
        raise ValueError(f"{name}: the experts' fused layout differs from the architecture table's "
                         f"({', '.join(f'{k}: table {t}, module {m}' for k, (t, m) in wrong.items())})")
    for param in (experts.gate_up, experts.down):
        if getattr(module, param, None) is None or getattr(module, param).dim() != 3:
            raise ValueError(f"{name}: expected a fused 3-D parameter {param!r} [experts, out, in]")


def _rows(experts: Experts, projection: str, intermediate: int) -> slice:
    """Which rows of an expert's [2I, H] gate_up matrix (in the (out, in) orientation) hold `projection`."""
    if experts.interleaved:
        return slice(0, None, 2) if projection == "gate_proj" else slice(1, None, 2)
    return slice(0, intermediate) if projection == "gate_proj" else slice(intermediate, 2 * intermediate)


class ExpertMatrix:
    """Expert `index`'s `projection` (gate_proj, up_proj or down_proj) inside a fused experts module, as an (out, in)
    matrix. `weight` is a view of the fused parameter (strided for transposed or interleaved layouts); `write`
    copies a new [out, in] weight into it."""

    def __init__(self, module: nn.Module, experts: Experts, index: int, projection: str) -> None:
        if projection not in PROJECTIONS:
            raise ValueError(f"expert projection {projection!r}; allowed values: {list(PROJECTIONS)}")
        self.module, self.experts, self.index, self.projection = module, experts, index, projection
        self.param_name = experts.down if projection == "down_proj" else experts.gate_up

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    def _view(self, tensor: torch.Tensor) -> torch.Tensor:
        w = tensor[self.index]
        if self.experts.transposed:
            w = w.T  # stored [in, out]
        if self.projection != "down_proj":
            w = w[_rows(self.experts, self.projection, w.shape[0] // 2)]
        return w

    @property
    def weight(self) -> torch.Tensor:
        """[out, in], a view of the fused parameter."""
        return self._view(self.param.data)

    def slice_of(self, fused: torch.Tensor) -> torch.Tensor:
        """This expert's [out, in] view of another tensor laid out like the fused parameter (the base model's value
        of it read from disk, a fused tensor being assembled from a checkpoint's experts)."""
        if tuple(fused.shape) != tuple(self.param.shape):
            raise ValueError(f"expert {self.index} {self.projection}: a fused tensor of shape {tuple(fused.shape)}, "
                             f"the parameter's is {tuple(self.param.shape)}")
        return self._view(fused)

    @property
    def bias(self) -> torch.Tensor | None:
        if not self.experts.bias:
            return None
        b = getattr(self.module, f"{self.param_name}_bias").data[self.index]
        return b if self.projection == "down_proj" else b[_rows(self.experts, self.projection, b.shape[0] // 2)]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def write(self, weight: torch.Tensor) -> None:
        """Copy weight [out, in] into the fused parameter (cast to its dtype, on its device)."""
        view = self.weight
        if tuple(weight.shape) != tuple(view.shape):
            raise ValueError(f"expert {self.index} {self.projection}: weight {tuple(weight.shape)} does not fit "
                             f"{tuple(view.shape)}")
        view.copy_(weight.to(device=view.device, dtype=view.dtype))


class _ExpertMLP(nn.Module):
    """One expert as three linears (names as GPTQModel and vLLM write per-expert checkpoints)."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj


def _linear_view(matrix: ExpertMatrix) -> nn.Linear:
    """An nn.Linear whose weight (and bias) are views of the expert's slice of the fused parameters: no copy."""
    weight = matrix.weight
    lin = nn.Linear(matrix.in_features, matrix.out_features, bias=matrix.experts.bias, device="meta",
                    dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if matrix.experts.bias:
        lin.bias = nn.Parameter(matrix.bias, requires_grad=False)
    return lin


class LinearizedExperts(nn.Module):
    """A fused experts module rebuilt from per-expert nn.Linears (views of its parameters): children "0", "1", ...
    each with gate_proj, up_proj and down_proj. Called like the original (hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]; the gating is the original module's own `_apply_gate`, so every family's
    activation (SiLU-GLU, gpt-oss's clamped GLU) is computed by the model's code.

    route_all: for statistics, every expert runs on every token (llm-compressor's moe_calibrate_all_experts); the
    output still adds only what the router chose. routed_calls: per forward, (tokens, tokens routed to each expert
    [E])."""

    def __init__(self, fused: nn.Module, experts: Experts, route_all: bool = False) -> None:
        super().__init__()
        self.fused, self.spec, self.route_all = [fused], experts, route_all  # a list: not a registered child
        self.num_experts = expert_count(fused, experts)
        for e in range(self.num_experts):
            self.add_module(str(e), _ExpertMLP(*(_linear_view(ExpertMatrix(fused, experts, e, p))
                                                 for p in PROJECTIONS)))
        self.routed_calls: list[tuple[int, torch.Tensor]] = []

    def expert(self, index: int) -> _ExpertMLP:
        return getattr(self, str(index))

    def _gate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The original module's activation on its own fused layout of (gate, up)."""
        joined = torch.stack((gate, up), dim=-1).flatten(-2) if self.spec.interleaved else torch.cat((gate, up), -1)
        return self.fused[0]._apply_gate(joined)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        counts = torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts)[:self.num_experts]
        self.routed_calls.append((hidden_states.shape[0], counts.cpu()))
        for e in range(self.num_experts):
            token_idx, slot = torch.where(top_k_index == e)
            if not self.route_all and token_idx.numel() == 0:
                continue
            mlp = self.expert(e)
            x = hidden_states if self.route_all else hidden_states[token_idx]
            y = mlp.down_proj(self._gate(mlp.gate_proj(x), mlp.up_proj(x)))
            if self.route_all:
                y = y[token_idx]
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out

    def write_back(self) -> None:
        """Copy each linear's current weight into the fused parameter where a method replaced it (a method may
        rebind `weight.data` rather than write into the view)."""
        fused = self.fused[0]
        for e in range(self.num_experts):
            mlp = self.expert(e)
            for p in PROJECTIONS:
                matrix = ExpertMatrix(fused, self.spec, e, p)
                lin = getattr(mlp, p)
                if not _same_view(lin.weight.data, matrix.weight):
                    matrix.write(lin.weight.data)
                if self.spec.bias and not _same_view(lin.bias.data, matrix.bias):
                    matrix.bias.copy_(lin.bias.data)


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.shape == b.shape


@contextmanager
def linearized(block: nn.Module, experts: Experts, route_all: bool = False):
    """While active, the block's fused experts module (if it has one) is a LinearizedExperts; afterwards, what was
    written into its linears is in the fused parameters and the original module is back. Yields the
    LinearizedExperts, or None for a block without experts."""
    parent_name, _, child = experts.path.rpartition(".")
    try:
        parent = block.get_submodule(parent_name) if parent_name else block
        fused = getattr(parent, child)
    except AttributeError:
        yield None
        return
    if fused is None or isinstance(fused, LinearizedExperts) or not hasattr(fused, experts.gate_up):
        yield None
        return
    check_fused_layout(fused, experts, experts.path)
    linear = LinearizedExperts(fused, experts, route_all)
    setattr(parent, child, linear)
    try:
        yield linear
    finally:
        setattr(parent, child, fused)
        linear.write_back()


def routing_histogram(calls: list[tuple[int, torch.Tensor]], tokens: int) -> torch.Tensor | None:
    """The routed-token counts [E] of the first complete pass over `tokens` calibration tokens, from a
    LinearizedExperts' per-forward (tokens, counts) (a method may run the block several times; the first pass that
    reached the experts with every token is the one its statistics started from). None when no pass was complete."""
    total, seen = None, 0
    for n, counts in calls:
        total = counts.clone() if total is None else total + counts
        seen += n
        if seen >= tokens:
            return total
    return None
