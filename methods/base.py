"""The common quantizer interface: a QuantSpec in, a QuantizationResult out (one artifact per linear layer plus
whatever else the method changed or measured), and the registry every method joins.

Every method returns the same artifact (core.spec.QuantizedWeights), so evaluation, export and the packed
kernels never need to know which method produced the weights.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from core.registry import Registry
from core.spec import QuantizedWeights, QuantSpec
from structure.architectures import ModelLayout
from structure.pipeline import BlockPipeline


@dataclass
class QuantizationResult:
    """Everything one quantization produced; the harness caches and applies exactly this, nothing else.

    artifacts: {fully qualified linear name: artifact}.
    modified: {state_dict key: tensor} of what the method changed in place that no artifact covers (AWQ's scales
        folded into norms and biases); applying them to a fresh model reproduces the method's model.
    stats: {linear name: {statistic: number}} (GPTQ: damping used and retries, loss, dead inputs, tokens).
    extras: {file name: torch-saveable object} written beside the run's rows (AWQ: awq_search.pt).
    routing: {block prefix: calibration tokens the router sent each expert} of every block with experts (what the
        pipeline's calibrated pass measured; empty for dense models and methods without calibration).
    """

    artifacts: dict[str, QuantizedWeights]
    modified: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    routing: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class ArtifactSource:
    """Where a method's artifacts come from when its config and the run's spec do not determine them (a checkpoint
    made elsewhere): it names the run's rows and keys its results and cache entries in place of the spec.

    label: the rows' method column, e.g. "ckpt:gguf-Q4_0". bits, group_size, symmetric: the source's nominal spec.
    digest: sha256 of the files the artifacts are read from, so a changed file is never read as the old one.
    packable: whether every artifact has a codes/scales/zeros form that packed kernels can run.
    """

    label: str
    bits: int
    group_size: int | None
    symmetric: bool | None
    digest: str
    packable: bool = True


class Method(ABC):
    """A weight-only quantization method, selected by `method=<name>` and configured by its `config_class`.

    A method is per-block maths plus its config: `quantize_blocks` hands per-block steps to the block pipeline
    (structure/pipeline.py), which walks the blocks, loads each one (from memory or streamed from the checkpoint),
    collects the artifacts the step returns and writes back what it changed. A method never walks blocks itself
    and never asks where the weights live.

    A step may change the model in place only in these ways: function-preserving transformations
    (AWQ folds its scales into the preceding norms; reported in `modified`), clipping a linear's weights before
    quantizing it (AWQ's clip search), and writing `artifact.dequantize()` into a linear's weight (GPTQ does, so
    later layers see quantized inputs). The caller then applies the returned artifacts (fake-quant or packed
    kernels), which is idempotent with the latter.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    needs_calibration: ClassVar[bool] = False
    # the artifacts bring their own bits, group size and symmetry (a checkpoint made elsewhere): the run's are not used
    spec_from_source: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config

    def artifact_source(self) -> ArtifactSource | None:
        """What besides the config and spec determines the artifacts (None: nothing; they are computed)."""
        return None

    def check_model(self, model: torch.nn.Module, tokenizer=None) -> None:
        """Refuse (ValueError naming the cause) a model this method cannot serve; `model` may be a weightless
        skeleton. Run before anything is measured. Computed artifacts fit any model: nothing to check."""

    def check_result(self, result: QuantizationResult) -> None:
        """Refuse (ValueError naming the cause) a result this method cannot stand behind, e.g. a checkpoint whose
        weights are implausibly far from the base model's; run on every result, a cached one too, before it is
        evaluated. Computed artifacts: nothing to check."""

    @abstractmethod
    def quantize_blocks(self, pipeline: BlockPipeline, spec: QuantSpec,
                        calib: torch.Tensor | None) -> QuantizationResult:
        """Quantize every linear of the decoder blocks through `pipeline`. `calib` is int64 [n_samples, seqlen] or
        None."""

    def quantize(self, model: torch.nn.Module, layout: ModelLayout, spec: QuantSpec, calib: torch.Tensor | None,
                 device: torch.device | str) -> QuantizationResult:
        """quantize_blocks for a model held whole in memory."""
        return self.quantize_blocks(BlockPipeline(model, layout, device), spec, calib)


DEFAULT_MIN_TOKENS = "0.5%"  # GPTQModel's default fallback threshold


def min_tokens(value: str | None, calibration_tokens: int) -> int:
    """The fewest calibration tokens a matrix's statistics may rest on (`method.moe_min_tokens`): a share of the
    calibration tokens ("0.5%", the default for None), or a count ("64"). A matrix that saw fewer (a routed expert
    the router starved) is rounded to nearest instead."""
    text = str(DEFAULT_MIN_TOKENS if value is None else value).strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1]) / 100
            if 0 <= share <= 1:
                return math.ceil(share * calibration_tokens)
        elif float(text) >= 0 and float(text) == int(float(text)):
            return int(float(text))
    except ValueError:
        pass
    raise ValueError(f"method.moe_min_tokens={value!r}; allowed values: a share of the calibration tokens such as "
                     "'0.5%' (0-100%), or a whole number of tokens such as '64'")


METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str, config_class: type):
    """Class decorator: make a Method selectable as `method=<name>` with `config_class` as its Hydra schema."""

    def wrap(cls: type[Method]) -> type[Method]:
        cls.name, cls.config_class = name, config_class
        METHODS.add(name, cls)
        return cls

    return wrap


def build_method(config: Any) -> Method:
    """Instantiate the registered method whose name is `config.name`."""
    return METHODS.get(config.name)(config)
