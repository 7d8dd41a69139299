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
    """One AWQ scaling group: the input columns of `layers` are multiplied by s and the output of `prev` divided by s;
    the loss is measured on the output of `inspect`. Names are relative to a block; `{e}` stands for every expert.

    input: the module whose input is the group's input (default: the first layer's; a mixture's gate/up group reads
        the whole MoE block's input, since each expert sees only its routed tokens).
    also_scaled: modules fed the same input that are not quantized (a router): their input columns take s too, so
        folding the scale leaves them, and the routing, unchanged.
    prev_rows: "all", or "last": only prev's last s.numel() output rows feed the layers (phi3's fused gate_up_proj,
        whose second half is up).
    """

    prev: str
    layers: tuple[str, ...]
    inspect: str
    input: str | None = None
    also_scaled: tuple[str, ...] = ()
    prev_rows: str = "all"

    @property
    def input_module(self) -> str:
        return self.input or self.layers[0]


@dataclass(frozen=True)
class Part:
    """The quantized linears of one part of a block (attention, a dense MLP, a mixture of experts): GPTQ's
    true-sequential groups, which together name every quantized linear of the part, and AWQ's scaling groups. A
    name ending in "?" may be absent from a block (DeepSeek's q_proj exists only without q_lora_rank)."""

    sequential: tuple[tuple[str, ...], ...]
    scale_groups: tuple[ScaleGroup, ...] = ()


@dataclass(frozen=True)
class Experts:
    """Routed experts fused into 3-D parameters, as transformers 5 stores them: `gate_up` [E, 2I, H] (gate rows then
    up rows; `interleaved`: alternating, gpt-oss) and `down` [E, H, I]; `transposed`: stored [E, in, out] (gpt-oss);
    `bias`: `<param>_bias` [E, out] beside each. A method sees expert e as three linears, `<path>.<e>.gate_proj`,
    `.up_proj` and `.down_proj` (structure/experts.py), the names per-expert checkpoints use.

    router: the module that routes tokens (never quantized, as in every reference).
    keep: other linears of the mixture left in full precision (Qwen2-MoE's shared_expert_gate, [1, H], as GPTQModel
        does).
    stored: how checkpoints name expert e's gate, up and down weights (transformers 5 saves experts one by one, as
        they are on the Hub; None: stored fused, as in the model); `renamed`: (model prefix, stored prefix) of the
        block's other tensors that checkpoints name differently (Mixtral's block_sparse_moe).
    """

    path: str = "mlp.experts"
    router: str = "mlp.gate"
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    interleaved: bool = False
    transposed: bool = False
    bias: bool = False
    keep: tuple[str, ...] = ()
    stored: tuple[str, str, str] | None = ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj",
                                           "mlp.experts.{e}.down_proj")
    renamed: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class MoE(Part):
    """A mixture-of-experts MLP: its parts named with `{e}` for every expert, and where the experts live. A block of
    a MoE family uses this part where it has `experts.path`, and the family's dense `mlp` part elsewhere (DeepSeek's
    first dense layers, Qwen-MoE's mlp_only_layers)."""

    experts: Experts = Experts()


@dataclass(frozen=True)
class ArchSpec:
    """Where things are in one model family. Module names are dotted paths (blocks: from the model root; the rest:
    from one decoder block)."""

    blocks: str
    attention: Part
    mlp: Part
    moe: MoE | None = None
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight): fold into (offset + weight)
    # AWQ's clip search skips q/k: their outputs only meet through q.k^T, which the per-layer loss cannot see.
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    needs_bos: bool = False  # prepend BOS to every perplexity window (models trained with one at every sequence start)

    @property
    def sequential(self) -> tuple[tuple[str, ...], ...]:
        """The dense template (attention, then the dense MLP); per block: ModelLayout.sequential."""
        return self.attention.sequential + self.mlp.sequential

    @property
    def scale_groups(self) -> tuple[ScaleGroup, ...]:
        return self.attention.scale_groups + self.mlp.scale_groups

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential for name in group)


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_ATTENTION = Part(
    sequential=(("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"), ("self_attn.o_proj",)),
    scale_groups=(ScaleGroup("input_layernorm", _ATTN, "self_attn"),
                  ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj")),  # skipped under GQA
)


def _glu_mlp(norm: str, path: str = "mlp") -> Part:
    """A gated MLP (gate_proj, up_proj -> down_proj) under `path`, fed by `norm`."""
    return Part(sequential=((f"{path}.up_proj", f"{path}.gate_proj"), (f"{path}.down_proj",)),
                scale_groups=(ScaleGroup(norm, (f"{path}.gate_proj", f"{path}.up_proj"), path),
                              ScaleGroup(f"{path}.up_proj", (f"{path}.down_proj",), f"{path}.down_proj")))


def _moe(norm: str = "post_attention_layernorm", shared: str | None = None, experts: Experts = Experts(),
         up_down_scale: bool = True) -> MoE:
    """A mixture: every expert's gate/up (and a shared expert's) share one AWQ scale, searched on the whole MoE
    block's output with the router in the loop (AutoAWQ's Mixtral); each expert's up -> down scale uses only its
    routed tokens. `up_down_scale=False` where the activation does not commute with a scale of up (gpt-oss)."""
    e = f"{experts.path}.{{e}}"
    block = experts.path.rpartition(".")[0]
    gate_up = (f"{e}.up_proj", f"{e}.gate_proj") + ((f"{shared}.up_proj", f"{shared}.gate_proj") if shared else ())
    down = (f"{e}.down_proj",) + ((f"{shared}.down_proj",) if shared else ())
    groups = [ScaleGroup(norm, (f"{e}.gate_proj", f"{e}.up_proj") + gate_up[2:], block, input=block,
                         also_scaled=(experts.router, *experts.keep))]
    if up_down_scale:
        groups.append(ScaleGroup(f"{e}.up_proj", (f"{e}.down_proj",), f"{e}.down_proj"))
        if shared:
            groups.append(ScaleGroup(f"{shared}.up_proj", (f"{shared}.down_proj",), f"{shared}.down_proj"))
    return MoE(sequential=(gate_up, down), scale_groups=tuple(groups), experts=experts)


_LLAMA_MLP = _glu_mlp("post_attention_layernorm")
_LLAMA = ArchSpec(blocks="model.layers", attention=_LLAMA_ATTENTION, mlp=_LLAMA_MLP)
# Gemma 2/3 put an extra norm after attention; the MLP's input norm is pre_feedforward_layernorm.
_GEMMA2 = ArchSpec(blocks="model.layers", attention=_LLAMA_ATTENTION, mlp=_glu_mlp("pre_feedforward_layernorm"),
                   norm_weight_offset=1.0, needs_bos=True)
_OPT = ArchSpec(
    blocks="model.decoder.layers",
    attention=Part(sequential=(("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"), ("self_attn.out_proj",)),
                   scale_groups=(ScaleGroup("self_attn_layer_norm", _ATTN, "self_attn"),
                                 ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"))),
    mlp=Part(sequential=(("fc1",), ("fc2",)),
             scale_groups=(ScaleGroup("final_layer_norm", ("fc1",), "fc1"), ScaleGroup("fc1", ("fc2",), "fc2"))),
)
# Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj (gate rows first, then up): v -> o cannot fold (v is
# a slice of qkv's rows), up -> down folds into gate_up_proj's last rows (AutoAWQ's phi3).
_PHI3 = ArchSpec(
    blocks="model.layers",
    attention=Part(sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",)),
                   scale_groups=(ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),)),
    mlp=Part(sequential=(("mlp.gate_up_proj",), ("mlp.down_proj",)),
             scale_groups=(ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
                           ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", prev_rows="last"))),
    no_clip=("self_attn.qkv_proj",),
)
# DeepSeek-V3: multi-head latent attention (q and kv pass through low-rank projections with their own norms),
# dense MLPs in the first blocks, then experts beside a shared expert; the router's routing bias is a buffer.
_MLA = Part(
    sequential=(("self_attn.q_a_proj?", "self_attn.q_proj?", "self_attn.kv_a_proj_with_mqa"),
                ("self_attn.q_b_proj?", "self_attn.kv_b_proj"), ("self_attn.o_proj",)),
    scale_groups=(ScaleGroup("input_layernorm", ("self_attn.q_a_proj?", "self_attn.q_proj?",
                                                 "self_attn.kv_a_proj_with_mqa"), "self_attn"),
                  ScaleGroup("self_attn.q_a_layernorm?", ("self_attn.q_b_proj?",), "self_attn.q_b_proj?"),
                  ScaleGroup("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",), "self_attn.kv_b_proj")),
)
_DEEPSEEK_V3 = ArchSpec(blocks="model.layers", attention=_MLA, mlp=_LLAMA_MLP,
                        moe=_moe(shared="mlp.shared_experts"),
                        no_clip=("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.q_proj"))
_GPT_OSS = ArchSpec(blocks="model.layers", attention=_LLAMA_ATTENTION, mlp=_LLAMA_MLP,
                    moe=_moe(experts=Experts(router="mlp.router", interleaved=True, transposed=True, bias=True,
                                             stored=None),
                             up_down_scale=False))
# Mixtral's checkpoints keep the names of transformers 4: block_sparse_moe, and w1 (gate), w3 (up), w2 (down).
_MIXTRAL_EXPERTS = Experts(stored=("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
                                   "block_sparse_moe.experts.{e}.w2"), renamed=(("mlp.", "block_sparse_moe."),))

ARCHITECTURES: Registry[ArchSpec] = Registry("architecture model_type")
for _model_type, _spec in (
        ("llama", _LLAMA), ("mistral", _LLAMA), ("qwen2", _LLAMA), ("qwen3", _LLAMA),
        ("gemma", ArchSpec(blocks="model.layers", attention=_LLAMA_ATTENTION, mlp=_LLAMA_MLP, norm_weight_offset=1.0,
                           needs_bos=True)),
        ("gemma2", _GEMMA2), ("gemma3_text", _GEMMA2), ("opt", _OPT), ("phi3", _PHI3),
        ("mixtral", ArchSpec(blocks="model.layers", attention=_LLAMA_ATTENTION, mlp=_LLAMA_MLP,
                             moe=_moe(experts=_MIXTRAL_EXPERTS))),
        ("qwen2_moe", ArchSpec(blocks="model.layers", attention=_LLAMA_ATTENTION, mlp=_LLAMA_MLP,
                               moe=_moe(shared="mlp.shared_expert",
                                        experts=Experts(keep=("mlp.shared_expert_gate",))))),
        ("qwen3_moe", ArchSpec(blocks="model.layers", attention=_LLAMA_ATTENTION, mlp=_LLAMA_MLP, moe=_moe())),
        ("olmoe", ArchSpec(blocks="model.layers", attention=_LLAMA_ATTENTION, mlp=_LLAMA_MLP, moe=_moe())),
        ("deepseek_v3", _DEEPSEEK_V3), ("gpt_oss", _GPT_OSS)):
    ARCHITECTURES.add(_model_type, _spec)


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted) if dotted else root


class BlockParts:
    """A family's table resolved against one block: names with `{e}` expanded to every expert, optional names ("?")
    that the block lacks dropped. Everything a method or an evaluator needs to know about the block's matrices."""

    def __init__(self, spec: ArchSpec, block: nn.Module) -> None:
        self.moe = spec.moe if spec.moe is not None and _has(block, spec.moe.experts.path) else None
        parts = (spec.attention, self.moe or spec.mlp)
        self.n_experts = 0
        if self.moe is not None:
            from structure.experts import expert_count

            self.n_experts = expert_count(get_submodule(block, self.moe.experts.path), self.moe.experts)
        present = lambda name: not name.endswith("?") or _has(block, name[:-1])  # noqa: E731
        strip = lambda name: name.rstrip("?")  # noqa: E731
        self.sequential = tuple(group for group in (tuple(strip(n) for raw in g for n in self._expand(raw)
                                                          if present(raw)) for part in parts for g in part.sequential)
                                if group)
        groups = []
        for part in parts:
            for g in part.scale_groups:
                if not present(g.prev) or not present(g.inspect):
                    continue
                for e in (range(self.n_experts) if "{e}" in g.prev else (None,)):
                    one = lambda name: strip(name.replace("{e}", str(e)) if e is not None else name)  # noqa: E731
                    layers = tuple(strip(n) for raw in g.layers if present(raw)
                                   for n in ((one(raw),) if e is not None else self._expand(raw)))
                    if layers:
                        groups.append(ScaleGroup(one(g.prev), layers, one(g.inspect),
                                                 None if g.input is None else one(g.input), g.also_scaled, g.prev_rows))
        self.scale_groups = tuple(groups)
        self.names = tuple(n for group in self.sequential for n in group)

    def _expand(self, name: str) -> tuple[str, ...]:
        return tuple(name.replace("{e}", str(e)) for e in range(self.n_experts)) if "{e}" in name else (name,)

    def is_expert(self, name: str) -> bool:
        """Whether `name` (relative to the block) is one routed expert's matrix."""
        return self.moe is not None and name.startswith(self.moe.experts.path + ".")


def _has(root: nn.Module, dotted: str) -> bool:
    try:
        return get_submodule(root, dotted) is not None
    except AttributeError:
        return False


@dataclass(frozen=True)
class ModelLayout:
    """An ArchSpec bound to a concrete model type; resolves names against a model instance."""

    model_type: str
    spec: ArchSpec

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return get_submodule(model, self.spec.blocks)

    def block_prefix(self, index: int) -> str:
        return f"{self.spec.blocks}.{index}"

    def parts(self, block: nn.Module) -> BlockParts:
        """The table resolved against this block (its experts counted, its optional names settled)."""
        return BlockParts(self.spec, block)

    def sequential(self, block: nn.Module) -> tuple[tuple[str, ...], ...]:
        """GPTQ's true-sequential groups of this block, every expert named."""
        return self.parts(block).sequential

    def scale_groups(self, block: nn.Module) -> tuple[ScaleGroup, ...]:
        """AWQ's scaling groups of this block, per expert where the table says so."""
        return self.parts(block).scale_groups

    def matrices(self, block: nn.Module) -> dict:
        """{name relative to the block: matrix} in true-sequential order: the nn.Linear itself, or an
        structure.experts.ExpertMatrix (an expert's slice of a fused parameter, answering like a linear), so shapes and
        weights read the same for both. Checks that the table covers every linear of the block: a linear it does not
        name would silently stay unquantized."""
        from structure.experts import ExpertMatrix, LinearizedExperts

        parts = self.parts(block)
        found = {}
        for name in parts.names:
            module = _find_module(block, name)
            if module is None and parts.is_expert(name):
                index, projection = name[len(parts.moe.experts.path) + 1:].split(".")
                module = ExpertMatrix(get_submodule(block, parts.moe.experts.path), parts.moe.experts, int(index),
                                      projection)
            if module is None:
                raise ValueError(f"{self.model_type}: the architecture table names {name!r}, which this block lacks")
            if not isinstance(module, (nn.Linear, ExpertMatrix)):
                raise TypeError(f"{self.model_type}: expected nn.Linear at {name} (already replaced by a packed "
                                f"layer?), found {type(module).__name__}")
            found[name] = module
        kept = set()
        if parts.moe is not None:
            kept = {parts.moe.experts.router, *parts.moe.experts.keep}
        unknown = [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and n not in found
                   and n not in kept and not any(n.startswith(k + ".") for k in kept)
                   and not isinstance(_find_module(block, n.rpartition(".")[0]), LinearizedExperts)]
        experts_path = parts.moe.experts.path + "." if parts.moe is not None else None
        unknown += [n for n, p in block.named_parameters() if p.dim() > 2
                    and (experts_path is None or not n.startswith(experts_path))]
        if unknown:
            raise ValueError(f"{self.model_type}: the block has linears or fused experts the architecture table does "
                             f"not name ({unknown[:4]}): they would stay unquantized; add them to "
                             "structure/architectures.py")
        return found

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """{name relative to the block: nn.Linear} in true_sequential order, for a block a method works on (its
        experts linearized by the pipeline, structure.experts.linearized, so each is an nn.Linear too)."""
        found = self.matrices(block)
        fused = [n for n, m in found.items() if not isinstance(m, nn.Linear)]
        if fused:
            raise TypeError(f"{self.model_type}: {fused[:2]}... are slices of fused expert parameters here; a method "
                            "sees them as linears only inside the pipeline's walk (structure.experts.linearized)")
        return found

    def shared_input_groups(self, model: nn.Module) -> list[tuple[str, ...]]:
        """Full names of the dense linears fed one tensor (each multi-linear scaling group of plain linears: q/k/v,
        gate/up), per block; packed kernels may run each group as one GEMM."""
        groups = []
        for i, block in enumerate(self.blocks(model)):
            parts = self.parts(block)
            for group in parts.scale_groups:
                if len(group.layers) > 1 and not any(parts.is_expert(n) for n in group.layers):
                    groups.append(tuple(f"{self.block_prefix(i)}.{name}" for name in group.layers))
        return groups

    def quantizable_linears(self, model: nn.Module) -> dict:
        """{fully qualified name: matrix} for every quantized matrix inside the decoder blocks (lm_head, embeddings
        and routers stay): nn.Linears, and experts' slices of fused parameters (structure.experts.ExpertMatrix)."""
        return {f"{self.block_prefix(i)}.{name}": lin
                for i, block in enumerate(self.blocks(model))
                for name, lin in self.matrices(block).items()}

    def is_expert_matrix(self, name: str) -> bool:
        """Whether a fully qualified matrix name is a routed expert's (a slice of a fused parameter, not a linear)."""
        moe = self.spec.moe
        return moe is not None and f".{moe.experts.path}." in name

    def linear_shapes(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """{fully qualified name: (out_features, in_features)} of quantizable_linears (a weightless skeleton is
        enough)."""
        return {name: (lin.out_features, lin.in_features) for name, lin in self.quantizable_linears(model).items()}

    def matrix(self, model: nn.Module, name: str):
        """The matrix (nn.Linear or ExpertMatrix) of one fully qualified name."""
        module = _find_module(model, name)
        if isinstance(module, nn.Linear):
            return module
        prefix = self.spec.blocks + "."
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            block = self.blocks(model)[int(index)]
            found = self.matrices(block).get(rest)
            if found is not None:
                return found
        raise ValueError(f"{self.model_type}: {name!r} is not a quantizable matrix of this model")

    def stored_sources(self, block: nn.Module, prefix: str) -> tuple[dict[str, list[list[str]]], dict[str, str]]:
        """How a checkpoint saved by transformers stores the block's tensors where it names them differently from the
        model: ({state-dict name of a fused expert parameter: per expert, the stored tensors whose concatenation
        along dim 0 is that expert's slice (gate_up: [gate, up]; down: [down])}, {state-dict name: stored name} of
        renamed tensors)."""
        parts = self.parts(block)
        if parts.moe is None:
            return {}, {}
        experts = parts.moe.experts
        stacked, renamed = {}, {}
        if experts.stored is not None:
            if experts.transposed or experts.interleaved:
                raise ValueError(f"{self.model_type}: experts stored one by one into a transposed or interleaved "
                                 "fused layout are not supported")
            gate, up, down = (f"{prefix}.{name}" for name in experts.stored)
            stacked[f"{prefix}.{experts.path}.{experts.gate_up}"] = [
                [gate.format(e=e) + ".weight", up.format(e=e) + ".weight"] for e in range(parts.n_experts)]
            stacked[f"{prefix}.{experts.path}.{experts.down}"] = [[down.format(e=e) + ".weight"]
                                                                  for e in range(parts.n_experts)]
        for model_prefix, stored_prefix in experts.renamed:
            for name, _ in block.named_parameters():
                if name.startswith(model_prefix) and f"{prefix}.{name}" not in stacked:
                    renamed[f"{prefix}.{name}"] = f"{prefix}.{stored_prefix}{name[len(model_prefix):]}"
        return stacked, renamed

    def replaced_parameters(self, block: nn.Module, prefix: str, artifacts=None) -> frozenset[str]:
        """State-dict names of the parameters that writing every matrix of the block replaces whole: each linear's
        weight, and each fused expert parameter (every expert's slice of it is a matrix). Given `artifacts` (by full
        matrix name), only those it replaces whole: a checkpoint may store some matrices unquantized (a fused
        parameter is replaced only when every expert matrix in it has an artifact)."""
        parts = self.parts(block)
        has = (lambda name: True) if artifacts is None else (lambda name: f"{prefix}.{name}" in artifacts)  # noqa: E731
        names = {f"{prefix}.{n}.weight" for n in parts.names if not parts.is_expert(n) and has(n)}
        if parts.moe is not None:
            experts = parts.moe.experts
            for param, in_it in ((experts.gate_up, ("gate_proj", "up_proj")), (experts.down, ("down_proj",))):
                if all(has(f"{experts.path}.{e}.{p}") for e in range(parts.n_experts) for p in in_it):
                    names.add(f"{prefix}.{experts.path}.{param}")
        return frozenset(names)


def _find_module(root: nn.Module, dotted: str) -> nn.Module | None:
    try:
        return get_submodule(root, dotted)
    except AttributeError:
        return None


def layout_for(model_or_config) -> ModelLayout:
    """The layout of a model (or its config); a clear error names the supported families (and, given a model, those
    whose table really fits it)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        model = model_or_config if isinstance(model_or_config, nn.Module) else None
        raise ValueError(unknown_architecture(model_type, model))
    return ModelLayout(model_type, ARCHITECTURES.get(model_type))


def fits(spec: ArchSpec, model: nn.Module) -> bool:
    """Whether `spec` describes `model` completely (a weightless skeleton is enough): every block resolves, the table
    names every linear and fused expert, and every scaling group's modules exist."""
    layout = ModelLayout("?", spec)
    try:
        if spec.moe is not None and not any(layout.parts(b).moe for b in layout.blocks(model)):
            return False  # a mixture's entry describes a model with experts
        for block in layout.blocks(model):
            matrices = layout.matrices(block)
            for g in layout.scale_groups(block):
                names = (g.prev, g.inspect, g.input_module, *g.layers, *g.also_scaled)
                if not all(n in matrices or _has(block, n) for n in names):
                    return False
    except (AttributeError, ValueError, TypeError, IndexError):
        return False
    return True


def unknown_architecture(model_type, model: nn.Module | None = None) -> str:
    """Why a model_type has no layout. Families are named only when their table really fits the model (checked on
    the model's modules, never by the name's spelling: Mixtral is not Mistral)."""
    same = [name for name, spec in ARCHITECTURES.items() if fits(spec, model)] if model is not None else []
    hint = (f"; the entries of {same} name every linear, expert and norm of its blocks: if one of those families also "
            "matches its norms (Gemma's 1 + weight) and BOS use, register the model type with that entry in "
            "structure/architectures.py" if same else "; add an entry for it to structure/architectures.py")
    return (f"architecture model_type {model_type!r} is not in the architecture table (known: {ARCHITECTURES.names()})"
            f"{hint}")


@torch.no_grad()
def write_weight(matrix, weight: torch.Tensor, device: torch.device | None = None) -> None:
    """Make `weight` [out, in] the weight of a matrix (an nn.Linear, or an ExpertMatrix: copied into the fused
    parameter). A linear whose weight is still on the meta device (a streamed block whose linears were not read)
    gets a new parameter on `device`."""
    if not isinstance(matrix, nn.Linear):
        if matrix.param.is_meta:
            raise ValueError("an expert's fused parameter was never loaded (meta): allocate it before writing experts")
        matrix.write(weight)
        return
    if matrix.weight.is_meta:
        if device is None:
            raise ValueError("a linear's weight was never loaded (meta) and no device was given for it")
        matrix.weight = nn.Parameter(weight.to(device), requires_grad=False)
    else:
        matrix.weight.data = weight.to(matrix.weight.device)


@torch.no_grad()
def apply_artifacts(model: nn.Module, artifacts: dict, dtype: torch.dtype | None = None,
                    device: torch.device | None = None, layout: ModelLayout | None = None) -> None:
    """Fake-quantize: make each named matrix's weight its artifact's dequantized weight (an expert's: written into
    its slice of the fused parameter). A weight still on the meta device (a streamed block whose weights were not
    read, since the artifacts replace them) becomes a new parameter on `device`."""
    layout = layout or layout_for(model)
    for name, art in artifacts.items():
        matrix = layout.matrix(model, name)
        write_weight(matrix, art.dequantize(dtype or matrix.weight.dtype), device)


def _allocate_meta_experts(block: nn.Module, layout: ModelLayout, device: torch.device | None) -> None:
    """Give a block's fused expert parameters that are still on the meta device (a streamed block whose experts were
    not read) real, uninitialised memory on `device`; the caller then writes every expert's slice of them."""
    parts = layout.parts(block)
    if parts.moe is None:
        return
    experts = parts.moe.experts
    module = get_submodule(block, experts.path)
    for pname in (experts.gate_up, experts.down):
        p = getattr(module, pname)
        if p.is_meta:
            if device is None:
                raise ValueError(f"{experts.path}.{pname} was never loaded (meta) and no device was given for it")
            setattr(module, pname, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                                requires_grad=False))


@torch.no_grad()
def apply_block_artifacts(block: nn.Module, prefix: str, layout: ModelLayout, artifacts, dtype=None,
                          device: torch.device | None = None) -> None:
    """apply_artifacts for one (materialized) block: `prefix` is its full name, e.g. "model.layers.3". A matrix
    without an artifact (a checkpoint that stores it unquantized) keeps the weight the block was read with."""
    _allocate_meta_experts(block, layout, device)
    for name, matrix in layout.matrices(block).items():
        if f"{prefix}.{name}" not in artifacts:
            continue
        art = artifacts[f"{prefix}.{name}"]
        write_weight(matrix, art.dequantize(dtype or matrix.weight.dtype), device)


class BlockArtifacts:
    """A walk's `prepare_block` that writes each block's fake-quantized weights (the artifacts, dequantized) as the
    walk materializes it. `replaces(i)` names the weights it overwrites, so a streamed walk does not read them from
    the checkpoint: the linears and fused experts are nearly all of a block's bytes."""

    def __init__(self, layout: ModelLayout, artifacts, device: torch.device | str, model: nn.Module) -> None:
        self.layout, self.artifacts, self.device, self.model = layout, artifacts, torch.device(device), model

    def replaces(self, index: int) -> frozenset[str]:
        return self.layout.replaced_parameters(self.layout.blocks(self.model)[index], self.layout.block_prefix(index),
                                               self.artifacts)

    def __call__(self, index: int, block: nn.Module) -> None:
        apply_block_artifacts(block, self.layout.block_prefix(index), self.layout, self.artifacts, device=self.device)
