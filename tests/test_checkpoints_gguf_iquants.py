"""GGUF i-quants made by llama.cpp's quantizer with an importance matrix computed by llama.cpp's llama-imatrix on the
golden calibration windows (scripts/produce/gguf_imatrix.py): each read exactly as transformers' GGUF loader (the
`gguf` package's dequantization) reads it, stored bits counted by hand from llama.cpp's block structs, and refused
for another model."""
from __future__ import annotations

import pytest
import torch

from checkpoints.base import CheckpointError, check_belongs, reader_for
from core.spec import DequantizedWeights
from structure.architectures import layout_for
from tests.conftest import tiny_model, tiny_tokenizer
from tests.test_checkpoints import GOLDEN

# bytes per block / weights per block, from ggml-common.h's structs (fp16 d, then codes, signs, scales)
HAND_BITS = {"IQ2_XXS": (2 + 64) * 8 / 256, "IQ2_XS": (2 + 64 + 8) * 8 / 256, "IQ2_S": (2 + 64 + 8 + 8) * 8 / 256,
             "IQ3_XXS": (2 + 96) * 8 / 256, "IQ3_S": (2 + 64 + 8 + 32 + 4) * 8 / 256, "IQ1_S": (2 + 32 + 16) * 8 / 256,
             "IQ1_M": (32 + 16 + 8) * 8 / 256, "IQ4_NL": (2 + 16) * 8 / 32, "IQ4_XS": (2 + 2 + 4 + 128) * 8 / 256,
             "Q2_K": 84 * 8 / 256, "Q3_K": 110 * 8 / 256, "Q4_K": 144 * 8 / 256, "Q5_K": 176 * 8 / 256,
             "Q6_K": 210 * 8 / 256, "Q4_0": 18 * 8 / 32, "Q5_0": 22 * 8 / 32, "Q5_1": 24 * 8 / 32,
             "Q8_0": 34 * 8 / 32}
FILES = sorted((GOLDEN / "gguf").glob("tiny256-*-imatrix.gguf"))


def model256(**kw):
    return tiny_model("llama", hidden_size=256, intermediate_size=kw.pop("intermediate_size", 256),
                      num_hidden_layers=1, **kw)


def test_the_i_quant_goldens_are_there():
    kinds = {p.name.removeprefix("tiny256-").removesuffix("-imatrix.gguf") for p in FILES}
    assert {"IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ1_S"} <= kinds


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_i_quant_reads_as_transformers_reads_it_and_counts_its_blocks(path):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = model256()
    reader = reader_for(path)
    kind = path.name.removeprefix("tiny256-").removesuffix("-imatrix.gguf")
    about = reader.describe(path)
    assert about.label == f"gguf-{kind}" and not about.packable
    check_belongs(reader.header(path, model), model, layout_for(model), tiny_tokenizer())
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    contents = reader.read(path, model)
    types = set()
    for name, art in contents.artifacts.items():
        assert isinstance(art, DequantizedWeights)
        assert torch.equal(art.dequantize(), theirs[f"{name}.weight"]), name
        ggml_type = art.format.removeprefix("GGUF ")
        types.add(ggml_type)
        assert art.storage_bits_per_weight() == HAND_BITS[ggml_type], name
    assert any(t.startswith("IQ") for t in types), types
    for name, tensor in contents.tensors.items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("path", FILES[:2], ids=lambda p: p.name)
def test_an_i_quant_of_another_model_is_refused(path):
    other = model256(intermediate_size=128)
    with pytest.raises(CheckpointError, match="not a checkpoint of this model"):
        check_belongs(reader_for(path).header(path, other), other, layout_for(other))
