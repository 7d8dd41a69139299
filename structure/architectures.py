"""The one table of architecture differences.

Everything that depends on a model family (where the decoder blocks live, which linears GPTQ
quantizes in which order, which modules AWQ scales together, how a norm folds a scale) is declared
here, registered by `config.model_type`. Algorithms read this table; they never test `isinstance`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.registry import Registry


@dataclass(frozen=True)
class ScaleGroup:
    """One AWQ scaling group: the input columns of `layers` are multiplied by s and the output of `prev`
    divided by s; the loss is measured on the output of `inspect`. Names are relative to a block."""

    prev: str
    layers: tuple[str, ...]
    inspect: str


@dataclass(frozen=True)
class ArchSpec:
    """Where things are in one model family. Module names are dotted paths (blocks: from the model root;
    the rest: from one decoder block)."""

    blocks: str
    sequential: tuple[tuple[str, ...], ...]  # GPTQ true_sequential order; together these are every quantized linear
    scale_groups: tuple[ScaleGroup, ...]
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight): fold into (offset + weight)
    # AWQ's clip search skips q/k: their outputs only meet through q.k^T, which the per-layer loss cannot see.
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    needs_bos: bool = False  # prepend BOS to every perplexity window (models trained with one at every sequence start)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential for name in group)


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA = ArchSpec(
    blocks="model.layers",
    sequential=(("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"), ("self_attn.o_proj",),
                ("mlp.up_proj", "mlp.gate_proj"), ("mlp.down_proj",)),
    scale_groups=(
        ScaleGroup("input_layernorm", _ATTN, "self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),  # skipped under GQA (shapes differ)
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
)
# Gemma 2/3 put an extra norm after attention; the MLP's input norm is pre_feedforward_layernorm.
_GEMMA2 = ArchSpec(
    blocks="model.layers",
    sequential=_LLAMA.sequential,
    scale_groups=(
        ScaleGroup("input_layernorm", _ATTN, "self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
        ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
    norm_weight_offset=1.0,
    needs_bos=True,
)
_OPT = ArchSpec(
    blocks="model.decoder.layers",
    sequential=(("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
    scale_groups=(
        ScaleGroup("self_attn_layer_norm", _ATTN, "self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
        ScaleGroup("final_layer_norm", ("fc1",), "fc1"),
        ScaleGroup("fc1", ("fc2",), "fc2"),
    ),
)

ARCHITECTURES: Registry[ArchSpec] = Registry("architecture model_type")
for _model_type, _spec in (("llama", _LLAMA), ("mistral", _LLAMA), ("qwen2", _LLAMA), ("qwen3", _LLAMA),
                           ("gemma", ArchSpec(blocks=_LLAMA.blocks, sequential=_LLAMA.sequential,
                                              scale_groups=_LLAMA.scale_groups, norm_weight_offset=1.0, needs_bos=True)),
                           ("gemma2", _GEMMA2), ("gemma3_text", _GEMMA2), ("opt", _OPT)):
    ARCHITECTURES.add(_model_type, _spec)


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted) if dotted else root


@dataclass(frozen=True)
class ModelLayout:
    """An ArchSpec bound to a concrete model type; resolves names against a model instance."""

    model_type: str
    spec: ArchSpec

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return get_submodule(model, self.spec.blocks)

    def block_prefix(self, index: int) -> str:
        return f"{self.spec.blocks}.{index}"

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """{name relative to the block: linear} in true_sequential order."""
        found = {name: get_submodule(block, name) for name in self.spec.linears}
        wrong = [n for n, m in found.items() if not isinstance(m, nn.Linear)]
        if wrong:
            raise TypeError(f"{self.model_type}: expected nn.Linear at {wrong} (already replaced by a packed layer?)")
        return found

    def shared_input_groups(self, model: nn.Module) -> list[tuple[str, ...]]:
        """Full names of the linears fed one tensor (each multi-linear scaling group: q/k/v, gate/up), per block;
        packed kernels may run each group as one GEMM."""
        return [tuple(f"{self.block_prefix(i)}.{name}" for name in group.layers)
                for i in range(len(self.blocks(model))) for group in self.spec.scale_groups if len(group.layers) > 1]

    def quantizable_linears(self, model: nn.Module) -> dict[str, nn.Linear]:
        """{fully qualified name: linear} for every linear inside the decoder blocks (lm_head and embeddings stay)."""
        return {f"{self.block_prefix(i)}.{name}": lin
                for i, block in enumerate(self.blocks(model))
                for name, lin in self.block_linears(block).items()}


def layout_for(model_or_config) -> ModelLayout:
    """The layout of a model (or its config); a clear error names the supported families."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{ARCHITECTURES.unknown(model_type)}. Add an entry to structure/architectures.py.")
    return ModelLayout(model_type, ARCHITECTURES.get(model_type))


@torch.no_grad()
def apply_artifacts(model: nn.Module, artifacts: dict, dtype: torch.dtype | None = None,
                    device: torch.device | None = None) -> None:
    """Fake-quantize: replace each named linear's weight by its artifact's dequantized weight. A weight still on the
    meta device (a streamed block whose linears were not read, since the artifacts replace them) becomes a new
    parameter on `device`."""
    for name, art in artifacts.items():
        lin = model.get_submodule(name)
        weight = art.dequantize(dtype or lin.weight.dtype)
        if lin.weight.is_meta:
            if device is None:
                raise ValueError(f"{name}: its weight was never loaded (meta) and no device was given for it")
            lin.weight = nn.Parameter(weight.to(device), requires_grad=False)
        else:
            lin.weight.data = weight.to(lin.weight.device)


@torch.no_grad()
def apply_block_artifacts(block: nn.Module, prefix: str, layout: ModelLayout, artifacts, dtype=None,
                          device: torch.device | None = None) -> None:
    """apply_artifacts for one (materialized) block: `prefix` is its full name, e.g. "model.layers.3"."""
    apply_artifacts(block, {name: artifacts[f"{prefix}.{name}"] for name in layout.block_linears(block)}, dtype, device)


class BlockArtifacts:
    """A walk's `prepare_block` that writes each block's fake-quantized weights (the artifacts, dequantized) as the
    walk materializes it. `replaces(i)` names the weights it overwrites, so a streamed walk does not read them from
    the checkpoint: the linears are nearly all of a block's bytes."""

    def __init__(self, layout: ModelLayout, artifacts, device: torch.device | str) -> None:
        self.layout, self.artifacts, self.device = layout, artifacts, torch.device(device)

    def replaces(self, index: int) -> frozenset[str]:
        prefix = self.layout.block_prefix(index)
        return frozenset(f"{prefix}.{name}.weight" for name in self.layout.spec.linears)

    def __call__(self, index: int, block: nn.Module) -> None:
        apply_block_artifacts(block, self.layout.block_prefix(index), self.layout, self.artifacts, device=self.device)
