"""Checkpoints made elsewhere (method=checkpoint): each reader against the library that wrote the file, the bits per
weight against a hand count, the refusals of a checkpoint of another model, and whole runs.

The golden files under tests/golden/checkpoints/ were written by the real libraries from the tiny Llama there
(scripts/produce/; each directory's PRODUCER.json says how)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from checkpoints.base import CheckpointError, check_belongs, reader_for
from core.spec import DequantizedWeights, QuantizedWeights
from harness.config import ConfigError
from harness.run import execute
from structure.architectures import layout_for
from tests.conftest import tiny_model, tiny_tokenizer
from tests.test_config import make_config
from tests.test_run import tiny_run_overrides

GOLDEN = Path(__file__).parent / "golden" / "checkpoints"
BASE = GOLDEN / "tiny-llama"
# GGUF types and their storage per block of 32 weights, counted by hand from llama.cpp's block structs:
# fp16 d (+ fp16 m for _1 types) + the codes (+ 32 high bits for Q5 types)
GGUF_BITS = {"Q4_0": (2 + 16) * 8 / 32, "Q4_1": (2 + 2 + 16) * 8 / 32, "Q5_0": (2 + 4 + 16) * 8 / 32,
             "Q5_1": (2 + 2 + 4 + 16) * 8 / 32, "Q8_0": (2 + 32) * 8 / 32}
EXACT = {"Q4_0", "Q5_0", "Q8_0"}  # d * (q - offset): codes/scales/zeros; the others are carried dequantized


@pytest.fixture(scope="module")
def base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()


def gguf_file(kind: str) -> Path:
    return GOLDEN / "gguf" / f"tiny-{kind}.gguf"


def test_the_golden_base_is_the_tiny_test_model(base):
    fresh = tiny_model("llama", seed=0).state_dict()
    assert all(torch.equal(t, fresh[name]) for name, t in base.state_dict().items())


@pytest.mark.parametrize("kind", sorted(GGUF_BITS))
def test_gguf_reader_equals_transformers_gguf_loader(base, kind):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = gguf_file(kind)
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=base)["tensors"]
    reader = reader_for(path)
    check_belongs(reader.header(path, base), base, layout_for(base), tiny_tokenizer())
    contents = reader.read(path, base)
    assert set(contents.artifacts) == set(layout_for(base).quantizable_linears(base))
    for name, art in contents.artifacts.items():
        assert isinstance(art, QuantizedWeights if kind in EXACT else DequantizedWeights)
        assert torch.equal(art.dequantize(), theirs[f"{name}.weight"]), name
        assert art.storage_bits_per_weight() == GGUF_BITS[kind]
    assert set(contents.tensors) | {f"{n}.weight" for n in contents.artifacts} == set(theirs)
    for name, tensor in contents.tensors.items():
        assert torch.equal(tensor, theirs[name]), name


def test_gguf_exact_types_give_codes_in_range_with_the_format_zero(base):
    art = next(iter(reader_for(gguf_file("Q4_0")).read(gguf_file("Q4_0"), base).artifacts.values()))
    assert (art.bits, art.group_size, art.symmetric) == (4, 32, True)
    assert int(art.codes.max()) <= 15 and bool((art.zeros == 8).all())


def test_gguf_description_names_the_mix_and_whether_it_packs():
    q40, q41 = reader_for(gguf_file("Q4_0")).describe(gguf_file("Q4_0")), \
        reader_for(gguf_file("Q4_1")).describe(gguf_file("Q4_1"))
    assert (q40.label, q40.bits, q40.group_size, q40.packable) == ("gguf-Q4_0", 4, 32, True)
    assert (q41.label, q41.packable) == ("gguf-Q4_1", False)


def test_a_checkpoint_of_another_shape_is_refused():
    other = tiny_model("llama", intermediate_size=128)
    with pytest.raises(CheckpointError, match="mlp.*is \\(160, 64\\).*\\(128, 64\\)|is \\(64, 160\\).*\\(64, 128\\)"):
        check_belongs(reader_for(gguf_file("Q4_0")).header(gguf_file("Q4_0"), other), other, layout_for(other))


def test_a_checkpoint_of_another_architecture_is_refused():
    other = tiny_model("qwen2")
    with pytest.raises(CheckpointError, match="'llama' model, the base model a 'qwen2'"):
        reader_for(gguf_file("Q4_0")).header(gguf_file("Q4_0"), other)


def test_a_checkpoint_with_another_vocabulary_is_refused(base):
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["zebra"])  # one token more
    with pytest.raises(CheckpointError, match="tokens, the base model's"):
        check_belongs(reader_for(gguf_file("Q4_0")).header(gguf_file("Q4_0"), base), base, layout_for(base),
                      tokenizer)


def test_a_truncated_or_unknown_file_is_refused(tmp_path, base):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_file("Q4_0").read_bytes()[:50_000])
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        reader_for(cut).header(cut, base)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="no known format recognizes it"):
        reader_for(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="does not exist"):
        reader_for(tmp_path / "missing.gguf")


# --- whole runs -----------------------------------------------------------------------------------------------------

def checkpoint_run(text_file, tmp_path, path, *extra):
    return make_config(*tiny_run_overrides(BASE, text_file, tmp_path, "method=checkpoint", f"method.path={path}",
                                           *extra))


def test_a_gguf_run_is_named_and_counted_by_what_the_file_holds(text_file, tmp_path, base):
    frame = execute(checkpoint_run(text_file, tmp_path, gguf_file("Q4_0")))
    row = frame.iloc[0]
    assert (row["method"], row["bits"], row["group_size"], row["symmetric"]) == ("ckpt:gguf-Q4_0", 4, 32, True)
    assert row["run_id"].startswith("tiny-ckpt-gguf-Q4_0-")
    quant = frame[frame.suite == "quant"].set_index("metric")["value"]
    assert quant["storage_bits_per_weight"] == GGUF_BITS["Q4_0"] and quant["quantized_layers"] == 14
    kld = frame[(frame.suite == "ppl") & (frame.metric == "kld")]["value"].iloc[0]
    assert kld > 0  # Q4_0 of random weights differs from them


def test_a_changed_checkpoint_file_is_a_different_run(text_file, tmp_path):
    first = tmp_path / "a.gguf"
    shutil.copy(gguf_file("Q4_0"), first)
    before = execute(checkpoint_run(text_file, tmp_path, first))["run_id"].iloc[0]
    shutil.copy(gguf_file("Q5_0"), first)  # same path, other contents
    after = execute(checkpoint_run(text_file, tmp_path, first))
    assert after["run_id"].iloc[0] != before and after["method"].iloc[0] == "ckpt:gguf-Q5_0"


def test_a_mismatched_checkpoint_is_refused_before_anything_is_written(text_file, tmp_path):
    other = tmp_path / "other"
    tiny_model("llama", intermediate_size=128).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    cfg = make_config(*tiny_run_overrides(other, text_file, tmp_path, "method=checkpoint",
                                          f"method.path={gguf_file('Q4_0')}"))
    with pytest.raises(ConfigError, match="method.path=.*not a checkpoint of this model"):
        execute(cfg)
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_packed_kernels_refuse_a_checkpoint_carried_dequantized(text_file, tmp_path):
    cfg = checkpoint_run(text_file, tmp_path, gguf_file("Q4_1"), "kernel=reference")
    with pytest.raises(ConfigError, match="gguf-Q4_1 stores some layers .* set kernel=null"):
        execute(cfg)


def test_method_path_is_required():
    with pytest.raises(Exception, match="method.path is missing"):
        make_config("method=checkpoint")
