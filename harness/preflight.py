"""The preflight: bad input fails before any expensive work (before the model loads, the packaged GGUF is converted
or a baseline pass runs) and before anything is written, as one `config error: ...` line naming the key, its value
and what is allowed (or the file at fault).

One function per check, each raising ConfigError; `preflight` runs them cheapest first. `harness.run.execute` runs
them before it writes anything, and `SweepPreflight` (a Hydra callback) runs them for every job of a sweep before
the first job starts. Besides harness/__main__.py this is the one module that sees Hydra's DictConfig:
`to_run_config` turns one into a RunConfig.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import sys
import tempfile
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness import data as datasets_
from harness.config import ConfigError, RunConfig, one_line
from harness.identity import calibrates, declared_spec, used_sources
from harness.models import (PACKAGED_MAX_POSITIONS, cache_dir_of, check_model_location, local_model_directory,
                            resolve_device)
from harness.sweep import sweep_jobs

if TYPE_CHECKING:
    import torch

    from harness.config import ModelConfig

log = logging.getLogger(__name__)

# Source kinds whose token budget is checked. The packaged kinds (wiki, code, prose) hold millions of tokens, far
# more than any seqlen a model accepts (check_seqlens bounds those), so only a user's own text can be too short.
TOKEN_CHECKED_KINDS = ("textfile", "hf")


def preflight(cfg: RunConfig, cache: Path, device: torch.device | None) -> None:
    """Every check, each raising ConfigError: what must exist first, then what must fit. `device=None` skips the
    checks that need the machine the run will use (a sweep submitted to a cluster is checked on the submitting
    host)."""
    if device is not None:
        check_kernel_device(cfg, device)
    check_writable("results_dir", cfg.results_dir)
    check_writable("cache_dir" if cfg.cache_dir else "cache_dir (unset: $QUANT_HARNESS_CACHE or "
                   "~/.cache/quant-harness)", cache)
    check_model_location(cfg.model)
    directory = local_model_directory(cfg.model, cache)
    model_config = read_model_config(cfg.model, directory)
    if cfg.model.source == "hf" and directory == Path(os.path.expanduser(cfg.model.path)):  # a local directory
        check_safetensors(cfg.model, directory)  # (a hub snapshot may hold only some shards yet: they download later)
    for name in sorted(used_sources(cfg)):
        check_source(name, cfg, cache)
    check_lm_eval_tasks(cfg)
    check_seqlens(cfg, model_config)
    check_token_budgets(cfg, cache, directory, model_config)
    check_architecture(cfg, directory, model_config)
    check_checkpoint(cfg, directory)
    check_export(cfg, directory)


def preflight_config(cfg: RunConfig, check_device: bool = True) -> None:
    """The preflight of one run's config, with its device and cache directory resolved as the run resolves them."""
    preflight(cfg, cache_dir_of(cfg), resolve_device(cfg.device) if check_device else None)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The typed, validated RunConfig of a composed config (ValueError, ConfigError among them, when invalid)."""
    unknown = next(unknown_keys(cfg), None)
    if unknown is not None:
        key, value, allowed = unknown
        raise ConfigError(f"{key}={value} is not a config key (added with +?); allowed keys here: {allowed}")
    return OmegaConf.to_object(cfg)


def compose_error(err: Exception) -> str:
    """One line for an error Hydra or OmegaConf raised while composing a config, before any RunConfig exists: the key
    and the value given, what is wrong, and what the schema allows there (the keys of that node, the options of a
    config group, the values of the field's type)."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    text = str(err)
    given = _override_in(text) or getattr(cause, "full_key", None) or ""
    if isinstance(err, OverrideParseException):
        what, _, see = one_line(err.message).partition(" See ")
        return f"the override {err.override!r} cannot be parsed ({what}); see {see.removesuffix(' for details')}"
    if isinstance(err, MissingConfigException) and err.options is not None and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        return f"{group}={option} is invalid: no such option; allowed values: {sorted(err.options)}"
    schema, key = getattr(cause, "object_type", None), getattr(cause, "key", None)
    if dataclasses.is_dataclass(schema) and isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        keys = [f.name for f in dataclasses.fields(schema)]
        parent = str(cause.full_key or "").rpartition(".")[0]
        return f"{given} is not a config key{_of_method(schema, parent)}; allowed keys here: {keys}"
    if dataclasses.is_dataclass(schema) and isinstance(cause, ValidationError) and key in _field_types(schema):
        what = str(cause.msg).splitlines()[0]
        kind = _field_types(schema)[key]
        name = cause.full_key or key
        return (f"{given} is invalid: {what}; allowed values: {_values_of(kind)} ({name} is "
                f"{_type_name(kind)})")
    return one_line(f"{text}\n{cause}" if isinstance(cause, OmegaConfBaseException) and cause is not err else text)


def _override_in(text: str) -> str | None:
    """The override an error of Hydra's quotes ("Error merging override calib.seed=abc", "use +method.path=/x")."""
    match = re.search(r"Error merging override (\S+)", text) or re.search(r"use \+(\S+=\S*)", text)
    return match.group(1) if match else None


def _field_types(schema: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(schema)
    except Exception:  # noqa: BLE001 -- an annotation that does not resolve: no type to describe
        return {}


def _of_method(schema: type, parent: str) -> str:
    """Where a key was looked for: a method's config, a node, or the top level."""
    from methods import METHODS

    names = [name for name, cls in METHODS.items() if cls.config_class is schema]
    return f" of method={names[0]}" if names else f" under {parent}" if parent else ""


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is typing.Union:
        return f"Optional[{', '.join(_type_name(a) for a in typing.get_args(kind) if a is not type(None))}]"
    args = typing.get_args(kind)
    if args:
        return f"{getattr(typing.get_origin(kind), '__name__', kind)}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(kind, "__name__", str(kind))


def _values_of(kind: Any) -> str:
    """The values a field of this type takes, in words."""
    if typing.get_origin(kind) is typing.Union:
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        return " or ".join(_values_of(a) for a in inner) + " or null"
    if typing.get_origin(kind) in (list, tuple):
        inner = typing.get_args(kind)
        plural = {int: "integers", float: "numbers", str: "names", bool: "booleans"}.get(inner[0] if inner else None,
                                                                                       "values")
        return f"a list of {plural}, e.g. [a,b]" if plural == "names" else f"a list of {plural}, e.g. [1,2]"
    if dataclasses.is_dataclass(kind):
        return f"the keys {[f.name for f in dataclasses.fields(kind)]}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, _type_name(kind))


def check_keys_apply(cfg: RunConfig, overrides: list[str]) -> None:
    """A key set on the command line that the run would ignore is an error, not a silent no-op recorded as if it had
    been measured: a method whose artifacts bring their own spec (method=checkpoint) takes no bits, group_size,
    symmetric or strict_groups."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from methods import METHODS

    if not METHODS.get(cfg.method.name).spec_from_source:
        return
    given = [o for o in OverridesParser.create().parse_overrides(list(overrides)) if o.key_or_group in SPEC_KEYS]
    if given:
        keys = [o.key_or_group for o in given]
        raise ConfigError(f"{' '.join(o.input_line for o in given)}: {', '.join(keys)} do not apply to "
                          f"method={cfg.method.name}, which measures the checkpoint's own bits, group size and "
                          f"symmetry (its rows record them); allowed values: leave {', '.join(keys)} unset")


SPEC_KEYS = ("bits", "group_size", "symmetric", "strict_groups")  # what a method with its own spec does not take


def unknown_keys(node: DictConfig, prefix: str = ""):
    """(dotted key, value, the schema's keys) for every key that a `+key=value` override added to a typed node. Hydra
    accepts these, and the frozen dataclasses would only fail on them with an AttributeError traceback."""
    schema = OmegaConf.get_type(node)
    fields = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        child = node._get_node(key)  # not resolved: a missing value (???) is reported by to_object, naming its key
        if fields is not None and key not in fields:
            yield f"{prefix}{key}", child, fields
        elif isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            yield from unknown_keys(child, f"{prefix}{key}.")


def check_kernel_device(cfg: RunConfig, device: torch.device) -> None:
    """A packed kernel that cannot run on the device (triton without CUDA, ...)."""
    if cfg.kernel is None:
        return
    from kernels.quant_linear import check_backend_device

    try:
        check_backend_device(cfg.kernel, device)
    except ValueError as err:
        raise ConfigError(f"kernel={cfg.kernel!r} cannot run on device {device}: {err}") from None


def check_checkpoint(cfg: RunConfig, directory: Path | None) -> None:
    """method=checkpoint: the file exists and is of a known format, and belongs to the base model (architecture,
    every tensor's name and shape, the vocabulary), checked on a weightless skeleton; packed layers (kernel=...,
    timing) need a checkpoint whose every layer has a codes/scales/zeros form. A model not on this machine yet is
    checked by the run itself as soon as it has loaded, before anything is measured."""
    from methods import build_method

    method = build_method(cfg.method)
    try:
        source = method.artifact_source()
        if source is None:
            return
        packs = [key for key, value in (("kernel", cfg.kernel), ("eval.timing", cfg.eval.timing),
                                        ("export", cfg.export)) if value is not None]
        if packs and not source.packable:
            raise ValueError(f"{source.label} stores some layers in a form with no codes/scales/zeros (carried "
                             f"dequantized), which packed kernels cannot run; set {'=null '.join(packs)}=null to "
                             "evaluate it fake-quantized")
        if cfg.export is not None and method.describe().mixed:
            raise ValueError(f"{source.label} mixes quantization types across its layers and an export holds one "
                             "spec; set export=null")
        if directory is not None:
            method.check_model(*_skeleton(str(directory), cfg.model.trust_remote_code))
    except ValueError as err:
        raise ConfigError(f"method.path={cfg.method.path!r}: {err}") from None


def check_architecture(cfg: RunConfig, directory: Path | None, model_config: dict | None) -> None:
    """The model's family is in the architecture table, and the table describes it completely (every linear and
    fused expert of every block named), checked on a weightless skeleton before anything loads. A model not on this
    machine yet is checked by the run once it has its config."""
    from structure.architectures import ARCHITECTURES, unknown_architecture

    if model_config is None or directory is None:
        return
    model_type = model_config.get("model_type")
    try:
        skeleton = _model_skeleton(str(directory), cfg.model.trust_remote_code)
    except Exception as err:  # noqa: BLE001  (transformers raises many kinds for a config it cannot build)
        if model_type in ARCHITECTURES:
            raise ConfigError(f"model.path: transformers cannot build the {model_type!r} model of {directory} "
                              f"({' '.join(str(err).split())[:200]})") from None
        raise ConfigError(f"model.path: {unknown_architecture(model_type)}") from None
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"model.path: {unknown_architecture(model_type, skeleton)}")
    from structure.architectures import layout_for

    try:
        layout_for(skeleton).quantizable_linears(skeleton)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.path: {err}") from None


def check_export(cfg: RunConfig, directory: Path | None) -> None:
    """export=...: the format can hold the run's weights (its spec, act-order, and the shapes of the model's linears,
    read from a weightless skeleton when the model is on this machine; otherwise the run checks them as soon as the
    model has loaded, before quantizing), and the model is held whole (a streamed run has one block in memory at a
    time; streaming=auto is checked when the run plans)."""
    if cfg.export is None:
        return
    skeleton = None if directory is None else _model_skeleton(str(directory), cfg.model.trust_remote_code)
    why = export_refusal(cfg, skeleton)
    if why is not None:
        raise ConfigError(f"export={cfg.export}: {why}")
    if cfg.model.streaming == "true":
        raise ConfigError(f"export={cfg.export} needs the model whole in memory; set model.streaming=false or "
                          "export=null")


def export_refusal(cfg: RunConfig, model=None) -> str | None:
    """Why the run's export format cannot hold its weights (None: it can), given the model (a skeleton is enough; None:
    not known yet): the spec, act-order, the shapes of its matrices, and whether other tools load its experts one by
    one (checkpoints.stored.export_refusal)."""
    from checkpoints.stored import export_refusal as layout_refusal
    from kernels.export import refusal
    from structure.architectures import layout_for

    shapes = None if model is None else layout_for(model).linear_shapes(model)
    why = refusal(cfg.export, declared_spec(cfg), shapes, act_order=_records_act_order(cfg.method))
    return why if why is not None or model is None else layout_refusal(model)


def _records_act_order(method_cfg) -> bool:
    """Whether a method config asks for act-order (GPTQ's desc_act, also inside a composite method's config)."""
    if not dataclasses.is_dataclass(method_cfg):
        return False
    return bool(getattr(method_cfg, "desc_act", False)) or any(
        _records_act_order(getattr(method_cfg, f.name)) for f in dataclasses.fields(method_cfg))


@functools.lru_cache(maxsize=4)
def _skeleton(directory: str, trust_remote_code: bool):
    """(the model on the meta device: names and shapes, no weights; its tokenizer) from a model directory."""
    from transformers import AutoTokenizer

    return (_model_skeleton(directory, trust_remote_code),
            AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code))


@functools.lru_cache(maxsize=4)
def _model_skeleton(directory: str, trust_remote_code: bool):
    """The model of a directory's config.json on the meta device (names and shapes, no weights, no tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def check_writable(key: str, path: str | Path) -> None:
    """`path` is a writable directory, or can be created as one: its nearest existing ancestor is a directory this
    process may write to. Probed with a temporary file that is removed at once (os.access alone says yes to root on
    a read-only mount); the directory itself is not created here."""
    path = Path(path).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if os.path.exists(p))
    if not existing.is_dir():
        raise ConfigError(f"{key}={str(path)!r} is not writable: {existing} is a file, not a directory; allowed "
                          "values: a writable directory")
    try:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError("permission denied")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".preflight-"):
            pass
    except OSError as err:
        raise ConfigError(f"{key}={str(path)!r} is not writable ({existing}: {err.strerror or err}); allowed "
                          "values: a writable directory") from None


def read_model_config(model: ModelConfig, directory: Path | None) -> dict | None:
    """The model's config.json, parsed; None while it is not on this machine (the packaged model before its first
    conversion)."""
    if directory is None:
        return None
    file = directory / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError(f"a JSON {type(config).__name__}, not an object")
        return config
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if model.source == "packaged":  # a damaged conversion fails its manifest and is redone by convert_packaged
            return None
        raise ConfigError(f"model.path={model.path!r}: {file} is not a valid config.json ({err}); allowed values: "
                          "a model directory written by save_pretrained") from None


def check_safetensors(model: ModelConfig, directory: Path) -> None:
    """Every *.safetensors file of the model directory, and every shard its model.safetensors.index.json names,
    exists and is as long as its header says (a truncated download or copy). Reads the headers only."""
    files = set(directory.glob("*.safetensors"))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"model.path={model.path!r}: {index} is not a valid safetensors index "
                              f"({type(err).__name__}: {err})") from None
        for shard in sorted(shards):
            if not (directory / shard).is_file():
                raise ConfigError(f"model.path={model.path!r}: {index} names the shard {shard}, which is missing")
        files |= {directory / shard for shard in shards}
    for file in sorted(files):
        problem = safetensors_problem(file)
        if problem:
            raise ConfigError(f"model.path={model.path!r}: {file} {problem}; allowed values: complete safetensors "
                              "files (download or copy the checkpoint again)")


def safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file's framing (None: nothing): its 8-byte little-endian header length, the
    JSON header, and a file long enough for the furthest tensor's data_offsets end. The tensor data is not read."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is truncated: {size} bytes, shorter than the 8-byte header length"
        header_len = int.from_bytes(head, "little")
        if 8 + header_len > size:
            return f"is truncated: {size} bytes, shorter than its {header_len}-byte header"
        try:
            header = json.loads(f.read(header_len))
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                      default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            return f"has a malformed header ({type(err).__name__}: {err})"
    if 8 + header_len + end > size:
        return f"is truncated: {size:,} bytes where its header needs {8 + header_len + end:,}"
    return None


def max_positions(model: ModelConfig, config: dict | None) -> tuple[int | None, str]:
    """(the model's max_position_embeddings or None when unknown, where it was read)."""
    config = config or {}
    for node, where in ((config, "config.json"), (config.get("text_config") or {}, "config.json text_config")):
        if isinstance(node.get("max_position_embeddings"), int):
            return node["max_position_embeddings"], where
    if model.source == "packaged":  # not converted yet: the packaged model's known value
        return PACKAGED_MAX_POSITIONS, "the packaged SmolLM2-135M"
    return None, ""


def check_seqlens(cfg: RunConfig, model_config: dict | None) -> None:
    """eval.seqlen (and calib.seqlen, when the method calibrates) fit in the model's max_position_embeddings."""
    limit, where = max_positions(cfg.model, model_config)
    if limit is None:
        return
    keys = [("eval.seqlen", cfg.eval.seqlen)] + ([("calib.seqlen", cfg.calib.seqlen)] if calibrates(cfg) else [])
    for key, seqlen in keys:
        if seqlen > limit:
            raise ConfigError(f"{key}={seqlen} is longer than the model's max_position_embeddings={limit} ({where}); "
                              f"allowed values: 2 to {limit}")


def check_source(name: str, cfg: RunConfig, cache: Path) -> None:
    """A source's data is there, is UTF-8 and can be split into calibration and evaluation documents."""
    try:
        datasets_.check_source(name, cfg.data.sources[name], cache)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None


def check_token_budgets(cfg: RunConfig, cache: Path, directory: Path | None, model_config: dict | None) -> None:
    """The user's own sources hold enough tokens: a full window of eval.seqlen in an eval set's eval split, more than
    calib.seqlen in the calibration source's calibration split. A warning when eval.max_windows asks for more
    windows than there are."""
    names = [name for name in sorted(used_sources(cfg)) if cfg.data.sources[name].kind in TOKEN_CHECKED_KINDS]
    if not names:
        return
    tokenizer = load_tokenizer(cfg.model, directory)
    if tokenizer is None:
        return
    bos = int(_needs_bos(model_config) and tokenizer.bos_token_id is not None)  # as perplexity.eval_windows
    for name in names:
        if name in cfg.eval.ppl_sets:
            check_eval_budget(cfg, name, tokenizer, cache, bos)
        if calibrates(cfg) and name == cfg.calib.source:
            check_calib_budget(cfg, name, tokenizer, cache)


def load_tokenizer(model: ModelConfig, directory: Path | None):
    """The run's tokenizer (cheap next to the model), None for the packaged model before its first conversion.

    The packaged model's tokenizer is saved with its converted copy, which the first run makes (~30 s, the expensive
    work the preflight runs before). Its own sources are large; a user's text file with it is checked from the second
    run on, and on the first run fails as before, after the conversion."""
    if model.source == "packaged":
        if directory is None:
            return None
        location, revision = str(directory), None
    else:
        location, revision = os.path.expanduser(model.path), model.revision
    try:
        return _tokenizer(location, revision, model.trust_remote_code)
    except Exception as err:  # OSError, ValueError, ...: transformers' own classes
        if model.source == "packaged":  # a damaged conversion is redone by convert_packaged
            return None
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"model.path={model.path!r}: its tokenizer cannot be loaded ({type(err).__name__}: "
                          f"{reason})") from None


@functools.lru_cache(maxsize=4)  # a sweep checks every job against the same model
def _tokenizer(location: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=trust_remote_code)


def _needs_bos(model_config: dict | None) -> bool:
    from structure.architectures import ARCHITECTURES

    model_type = (model_config or {}).get("model_type")
    return model_type in ARCHITECTURES and ARCHITECTURES.get(model_type).needs_bos


def check_eval_budget(cfg: RunConfig, name: str, tokenizer, cache: Path, bos: int) -> None:
    """At least one window of eval.seqlen tokens in the eval split (a warning when max_windows asks for more)."""
    body, wanted = cfg.eval.seqlen - bos, cfg.eval.max_windows or 1
    have = datasets_.eval_tokens(name, cfg.data.sources[name], tokenizer, cache, wanted * body,
                                 keep=False).tokens.numel()  # the preflight writes nothing
    if have < body:
        raise ConfigError(f"eval.seqlen={cfg.eval.seqlen} is longer than the eval split of data.sources.{name} "
                          f"({have} tokens): not one window; allowed values: eval.seqlen <= {have + bos} for this "
                          "source, or more text in it")
    if have < wanted * body:
        _warn_once(f"eval.max_windows={wanted} asks for more windows than the eval split of data.sources.{name} "
                   f"holds: {have} tokens make {have // body} windows of eval.seqlen={cfg.eval.seqlen}; evaluating "
                   "those")


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """A warning, once per process (a sweep job passes the preflight twice: in the sweep's check of every job, and
    in its run)."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


def check_calib_budget(cfg: RunConfig, name: str, tokenizer, cache: Path) -> None:
    """More than calib.seqlen tokens in the calibration split, which calibration draws its windows from."""
    seqlen = cfg.calib.seqlen
    have = datasets_.calibration_stream_size(cfg.data.sources[name], tokenizer, cache, cfg.calib_seed, seqlen + 1)
    if have <= seqlen:
        raise ConfigError(f"calib.seqlen={seqlen} needs more than {seqlen} tokens in the calibration split of "
                          f"calib.source={name!r}, which has {have}; allowed values: calib.seqlen < {have}, or more "
                          f"text in data.sources.{name}")


_TASKS_CHECKED: set[str] = set()  # lm-eval settings found valid in this process (a sweep's jobs share them)


def check_lm_eval_tasks(cfg: RunConfig) -> None:
    """Unknown lm-eval tasks or MMLU subjects, missing task data (once per distinct setting: a passthrough name
    costs a ~13 s scan of lm-eval's registry)."""
    if cfg.eval.lm_eval is None or repr(cfg.eval.lm_eval) in _TASKS_CHECKED:
        return
    from harness.lmeval import check_tasks

    check_tasks(cfg.eval.lm_eval)
    _TASKS_CHECKED.add(repr(cfg.eval.lm_eval))


class SweepPreflight(Callback):
    """Hydra callback: before a sweep (-m) launches any job, compose every job's config and run the preflight on it.
    When any job fails, print one line per failing job (its overrides and the error) and exit 2, so that a bad value
    in the last job does not wait for the first jobs to finish.

    Only for Hydra's basic sweeper, which knows every job in advance; the launcher (basic, joblib, submitit) is
    unaffected. A job for a Slurm cluster is checked on the submitting host, without its device checks."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not str(config.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper"):
            return
        remote = "slurm" in str(config.hydra.launcher.get("_target_", "")).lower()
        jobs = sweep_jobs(config)
        common = set.intersection(*(set(job) for job in jobs))  # the overrides every job shares
        failures = []
        for number, job in enumerate(jobs):
            error = job_error(config, job, check_device=not remote)
            if error is not None:
                shown = [o for o in job if o not in common] or job  # what tells the jobs apart
                failures.append(f"config error: sweep job {number} ({' '.join(shown)}): {error}")
        if failures:
            print("\n".join(failures), file=sys.stderr, flush=True)
            sys.exit(2)


def job_error(config: DictConfig, job: list[str], check_device: bool) -> str | None:
    """Why one sweep job's config is invalid (composed as its launcher will compose it), None when it is valid."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import open_dict, read_write

    try:
        job_config = GlobalHydra.instance().config_loader().load_sweep_config(config, job)
        with read_write(job_config), open_dict(job_config):
            del job_config["hydra"]  # what the task function receives
        run_cfg = to_run_config(job_config)
        check_keys_apply(run_cfg, job)
        preflight_config(run_cfg, check_device=check_device)
    except (HydraException, OmegaConfBaseException) as err:  # composing the job's config
        return compose_error(err)
    except ValueError as err:  # ConfigError, the methods' and evaluators' own checks
        return one_line(err)
    return None

