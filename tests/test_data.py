"""Data registry: disjoint, deterministic splits; seeded calibration; local text and HF datasets."""
import json

import pytest
import torch

from conftest import tiny_tokenizer
from harness.config import TextSourceConfig
from harness.data import SOURCES, calibration_tokens, eval_tokens, role_documents, split_documents


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
