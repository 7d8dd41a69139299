"""Data registry: disjoint, deterministic splits; seeded calibration; local text and HF datasets."""
import json

import pytest
import torch

from conftest import WORDS, random_text, tiny_tokenizer
from harness.config import TextSourceConfig
from harness.data import (SOURCES, TEXTFILE_DOC_CHARS, calibration_stream_size, calibration_tokens, check_source,
                          eval_tokens, role_documents, split_documents, textfile_documents)


def test_split_is_disjoint_stable_and_sized():
    docs = [(f"doc{i}", f"text {i}") for i in range(200)]
    calib, evaluation = split_documents(docs, 0.1)
    assert len(evaluation) == 20 and len(calib) == 180
    assert not {k for k, _ in calib} & {k for k, _ in evaluation}
    # independent of input order
    assert split_documents(list(reversed(docs)), 0.1) == (calib, evaluation)


def test_split_needs_two_documents():
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents([("a", "x")], 0.1)


def test_textfile_calibration_is_seeded_and_disjoint_from_eval(text_file, tmp_path):
    cfg = TextSourceConfig(kind="textfile", path=str(text_file))
    tok = tiny_tokenizer()
    a = calibration_tokens("t", cfg, tok, tmp_path, n_samples=4, seqlen=16, seed=0)
    b = calibration_tokens("t", cfg, tok, tmp_path, n_samples=4, seqlen=16, seed=0)
    c = calibration_tokens("t", cfg, tok, tmp_path, n_samples=4, seqlen=16, seed=1)
    assert a.tokens.shape == (4, 16) and torch.equal(a.tokens, b.tokens) and a.fingerprint == b.fingerprint
    assert not torch.equal(a.tokens, c.tokens)
    calib_docs = {t for _, t in role_documents(cfg, tmp_path, "calib")}
    eval_docs = {t for _, t in role_documents(cfg, tmp_path, "eval")}
    assert calib_docs and eval_docs and not calib_docs & eval_docs


def test_eval_tokens_are_truncated_to_the_budget(text_file, tmp_path):
    cfg = TextSourceConfig(kind="textfile", path=str(text_file))
    full = eval_tokens("t", cfg, tiny_tokenizer(), tmp_path, None)
    part = eval_tokens("t", cfg, tiny_tokenizer(), tmp_path, 50)
    assert part.tokens.numel() == 50 and torch.equal(full.tokens[:50], part.tokens)


def test_hf_source_with_real_splits_on_local_files(tmp_path):
    for split, n in (("train", 30), ("test", 10)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"{split} line {i} the quick brown fox"}) + "\n")
    files = {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}
    from harness import data

    cfg = TextSourceConfig(kind="hf", path=str(tmp_path / "ds"), eval_split="test", calib_split="train")
    import datasets

    datasets.load_dataset("json", data_files=files).save_to_disk(str(tmp_path / "ds"))
    evaluation = data.role_documents(cfg, tmp_path, "eval")
    calib = data.role_documents(cfg, tmp_path, "calib")
    assert [t for _, t in evaluation][:2] == ["test line 0 the quick brown fox", "test line 1 the quick brown fox"]
    assert len(evaluation) == 10 and len(calib) == 30


def test_hf_source_builder_with_data_files_is_hash_split(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(40)))
    cfg = TextSourceConfig(kind="hf", path="json", data_files=str(path), text_field="body")
    assert len(role_documents(cfg, tmp_path, "eval")) == 4
    with pytest.raises(KeyError, match="text_field"):
        role_documents(TextSourceConfig(kind="hf", path="json", data_files=str(path)), tmp_path, "eval")


def test_packaged_sources_are_registered():
    assert {"wiki", "code", "prose", "textfile", "hf"} <= set(SOURCES.names())


def test_code_source_reads_the_stdlib(tmp_path):
    docs = role_documents(TextSourceConfig(kind="code"), tmp_path, "eval")
    assert len(docs) > 20 and all(key.endswith(".py") for key, _ in docs)
    assert not any(key.startswith("test/") for key, _ in docs)


def _one_line_of(n_chars: int, sentence_end: str = ". ") -> str:
    import random

    rng = random.Random(0)
    words, size = [], 0
    while size < n_chars:
        word = rng.choice(WORDS) + (sentence_end if rng.random() < 0.08 else " ")
        words.append(word)
        size += len(word)
    return "".join(words).strip()


def test_a_5mb_file_on_one_line_is_cut_at_sentence_ends(tmp_path):
    text = _one_line_of(5_000_000)
    path = tmp_path / "one_line.txt"
    path.write_text(text + "\n")
    cfg = TextSourceConfig(kind="textfile", path=str(path))
    check_source("t", cfg, tmp_path)  # refused before: one line, one document
    docs = [t for _, t in textfile_documents(cfg, tmp_path, "eval")]
    assert len(docs) > 0.8 * len(text) / (2 * TEXTFILE_DOC_CHARS)
    assert all(len(d) < 2 * TEXTFILE_DOC_CHARS + 10 for d in docs)
    assert all(d.endswith(".") for d in docs[:-1])  # cut where a sentence ends
    assert " ".join(docs) == text  # nothing lost, nothing reordered
    assert len(role_documents(cfg, tmp_path, "eval")) >= 1 and len(role_documents(cfg, tmp_path, "calib")) >= 1


def test_a_one_line_file_without_sentence_ends_is_cut_at_whitespace(tmp_path):
    text = _one_line_of(50_000, sentence_end=" ")
    path = tmp_path / "no_sentences.txt"
    path.write_text(text)
    docs = [t for _, t in textfile_documents(TextSourceConfig(kind="textfile", path=str(path)), tmp_path, "eval")]
    assert len(docs) > 10 and all(len(d) < 2 * TEXTFILE_DOC_CHARS + 10 for d in docs)
    assert " ".join(docs).split() == text.split()


def test_one_sentence_per_line_files_keep_their_documents(tmp_path):
    """Lines shorter than a document are joined with newlines as before."""
    lines = [" ".join(WORDS[i % 7:i % 7 + 8]) + "." for i in range(1500)]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines) + "\n")
    docs = [t for _, t in textfile_documents(TextSourceConfig(kind="textfile", path=str(path)), tmp_path, "eval")]
    assert "\n".join(docs).splitlines() == lines and all(len(d) >= TEXTFILE_DOC_CHARS for d in docs[:-1])


def test_non_utf8_file_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "cp1252.txt"
    path.write_bytes(random_text(2000).replace("fox", "\u201cfox\u201d").encode("cp1252"))
    cfg = TextSourceConfig(kind="textfile", path=str(path))
    with pytest.raises(ValueError, match=r"data source 'mine': data.sources.mine.path: .*cp1252.txt is not UTF-8 text: "
                                         r"byte 0x93 at offset \d+"):
        check_source("mine", cfg, tmp_path)


def test_calibration_stream_size_matches_calibration_tokens(text_file, tmp_path):
    cfg = TextSourceConfig(kind="textfile", path=str(text_file))
    tok = tiny_tokenizer()
    full = calibration_stream_size(cfg, tok, tmp_path, seed=3, up_to=10**9)
    assert calibration_stream_size(cfg, tok, tmp_path, seed=3, up_to=100) == 100
    calibration_tokens("t", cfg, tok, tmp_path, n_samples=2, seqlen=full - 1, seed=3)  # fits: more than seqlen tokens
    with pytest.raises(ValueError, match="calib.seqlen"):
        calibration_tokens("t", cfg, tok, tmp_path, n_samples=2, seqlen=full, seed=3)



def test_a_datasets_tokens_are_kept_in_the_cache_and_verified(text_file, tmp_path, monkeypatch):
    """Tokenizing is the costly step of a dataset's tokens: the second job reads them from the cache (keyed by the
    text and the tokenizer, checksummed); a damaged entry is set aside and the tokens computed again."""
    import harness.data as data

    calls = []
    real = data._ids
    monkeypatch.setattr(data, "_ids", lambda text, tok: calls.append(len(text)) or real(text, tok))
    cfg = TextSourceConfig(kind="textfile", path=str(text_file))
    first = calibration_tokens("t", cfg, tiny_tokenizer(), tmp_path, n_samples=4, seqlen=16, seed=0)
    again = calibration_tokens("t", cfg, tiny_tokenizer(), tmp_path, n_samples=4, seqlen=16, seed=0)
    assert len(calls) == 1 and torch.equal(first.tokens, again.tokens)  # tokenized once
    entry, = (tmp_path / "tokens").glob("*.pt")
    entry.write_bytes(entry.read_bytes()[:-20] + b"x" * 20)  # damaged
    third = calibration_tokens("t", cfg, tiny_tokenizer(), tmp_path, n_samples=4, seqlen=16, seed=0)
    assert len(calls) == 2 and torch.equal(first.tokens, third.tokens)
    assert list(tmp_path.glob("tokens/*.corrupt-*"))  # moved aside, not read as tokens


def test_tokens_of_another_tokenizer_or_text_are_other_entries_and_the_preflight_writes_none(text_file, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from harness.data import encode

    encode("the quick brown fox", tiny_tokenizer(), tmp_path)
    encode("the quick brown dog", tiny_tokenizer(), tmp_path)
    other = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "the": 1}, unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    ids = encode("the quick brown fox", PreTrainedTokenizerFast(tokenizer_object=other, unk_token="<unk>"), tmp_path)
    assert ids.tolist() == [1, 0, 0, 0] and len(list((tmp_path / "tokens").glob("*.pt"))) == 3
    cfg = TextSourceConfig(kind="textfile", path=str(text_file))
    eval_tokens("t", cfg, tiny_tokenizer(), tmp_path / "fresh", 50, keep=False)
    assert not (tmp_path / "fresh" / "tokens").exists()
