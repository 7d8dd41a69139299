"""What the AWQ search finds (per-group scales and per-layer clips), kept apart from applying it, with its
serialization (awq_search.pt) and the check that a saved search fits a model."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from core.spec import QuantSpec
from structure.architectures import ModelLayout, get_submodule

SEARCH_FORMAT = "awq_search/v1"
SEARCH_FILE = "awq_search.pt"


@dataclass
class GroupScale:
    """A searched scale of one scaling group: prev op /= s, layers' input columns *= s. Names relative to a block."""

    prev: str
    layers: tuple[str, ...]
    s: torch.Tensor  # [in_features of layers], fp32 (fp64 for an fp64 model)
    alpha: Optional[float] = None
    loss: Optional[float] = None
    also_scaled: tuple[str, ...] = ()  # unquantized modules fed the same input (a router): their columns *= s too
    prev_rows: str = "all"  # "last": only prev's last s.numel() rows feed the layers (phi3's gate_up_proj)


@dataclass
class BlockSearch:
    """Everything searched for one decoder block."""

    scales: list[GroupScale] = field(default_factory=list)
    clips: dict[str, torch.Tensor] = field(default_factory=dict)  # linear name -> max_val [out, n_groups], as s


@dataclass
class AWQSearch:
    """The searched parameters of a whole model, keyed by block prefix; saved with torch.save(search.to_state())."""

    bits: int
    group_size: Optional[int]
    symmetric: bool
    blocks: dict[str, BlockSearch] = field(default_factory=dict)

    def to_state(self) -> dict:
        """Plain dict of tensors/str/numbers (loads with torch.load(weights_only=True))."""
        return {"format": SEARCH_FORMAT, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "blocks": {prefix: {"scales": [{"prev": g.prev, "layers": list(g.layers), "s": g.s.detach().cpu(),
                                                "alpha": g.alpha, "loss": g.loss, "also_scaled": list(g.also_scaled),
                                                "prev_rows": g.prev_rows} for g in b.scales],
                                    "clips": {n: v.detach().cpu() for n, v in b.clips.items()}}
                           for prefix, b in self.blocks.items()}}

    @classmethod
    def from_state(cls, state: dict) -> "AWQSearch":
        if not isinstance(state, dict) or state.get("format") != SEARCH_FORMAT:
            raise ValueError(f"not an AWQ search file: expected format {SEARCH_FORMAT!r}")
        blocks = {prefix: BlockSearch([GroupScale(g["prev"], tuple(g["layers"]), g["s"], g["alpha"], g["loss"],
                                                  tuple(g.get("also_scaled", ())), g.get("prev_rows", "all"))
                                       for g in b["scales"]], dict(b["clips"]))
                  for prefix, b in state["blocks"].items()}
        return cls(state["bits"], state["group_size"], state["symmetric"], blocks)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.to_state(), path)

    @classmethod
    def load(cls, path: str | Path) -> "AWQSearch":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"method.load_search={str(path)!r}: no such file "
                             f"(expected an {SEARCH_FILE} written by a previous awq run)")
        return cls.from_state(torch.load(path, map_location="cpu", weights_only=True))

    def check_matches(self, model: nn.Module, layout: ModelLayout, spec: QuantSpec) -> None:
        """Raise ValueError unless this search fits `model` (block names, layer names, shapes) and `spec`."""
        for key in ("bits", "group_size", "symmetric"):
            if getattr(self, key) != getattr(spec, key):
                raise ValueError(f"method.load_search: saved search has {key}={getattr(self, key)!r}, "
                                 f"the run has {key}={getattr(spec, key)!r}")
        prefixes = [layout.block_prefix(i) for i in range(len(layout.blocks(model)))]
        if sorted(self.blocks) != sorted(prefixes):
            raise ValueError(f"method.load_search: saved search covers {len(self.blocks)} blocks "
                             f"({sorted(self.blocks)[:2]}...), the model has {len(prefixes)} ({prefixes[:2]}...)")
        for prefix, b in self.blocks.items():
            block = model.get_submodule(prefix)
            matrices = layout.matrices(block)  # experts' slices of fused parameters too
            find = lambda name: matrices[name] if name in matrices else _find(block, prefix, name)  # noqa: E731
            for g in b.scales:
                layers = [find(n) for n in g.layers]
                prev = find(g.prev)
                expected = {lin.in_features for lin in layers}
                prev_width = prev.weight.shape[0] if g.prev_rows == "all" else g.s.numel()
                if expected != {g.s.numel()} or prev_width != g.s.numel():
                    raise ValueError(f"method.load_search: scale of {prefix}.{g.prev} -> {list(g.layers)} has "
                                     f"{g.s.numel()} channels; the model's layers have {sorted(expected)} inputs "
                                     f"and the prev op {prev_width} outputs")
            for name, max_val in b.clips.items():
                lin = find(name)
                want = (lin.out_features, spec.n_groups(lin.in_features))
                if tuple(max_val.shape) != want:
                    raise ValueError(f"method.load_search: clip of {prefix}.{name} has shape {tuple(max_val.shape)}, "
                                     f"the model needs {want}")


def _find(block: nn.Module, prefix: str, name: str) -> nn.Module:
    try:
        return get_submodule(block, name)
    except AttributeError:
        raise ValueError(f"method.load_search: module {prefix}.{name} does not exist in this model") from None
