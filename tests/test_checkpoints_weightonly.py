"""The data-free weight-only formats people download (bitsandbytes NF4/FP4, MLX affine, HQQ, optimum-quanto, torchao
int4): each reader against the library that wrote the golden file (its own dequantization, saved beside it by
scripts/produce/weightonly.py), stored bits by hand, every packed tensor's shape checked, a checkpoint of another
model refused, and a whole run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from checkpoints.base import CheckpointError, check_belongs, reader_for
from core.spec import DequantizedWeights, QuantizedWeights
from harness.run import execute
from structure.architectures import layout_for
from tests.conftest import tiny_model, tiny_tokenizer
from tests.test_checkpoints import GOLDEN, checkpoint_run, ppl_and_kld

# golden directory -> (reader, label, nominal bits, group size); each holds library_dequantized.safetensors
GOLDENS = {
    "bnb-nf4": ("bitsandbytes", "bnb-nf4", 4, 64),
    "bnb-nf4-dq": ("bitsandbytes", "bnb-nf4-dq", 4, 64),
    "bnb-fp4": ("bitsandbytes", "bnb-fp4", 4, 64),
    "bnb-fp4-dq": ("bitsandbytes", "bnb-fp4-dq", 4, 64),
    "mlx-w4g32": ("mlx", "mlx-4bit-g32", 4, 32),
    "mlx-w3g32": ("mlx", "mlx-3bit-g32", 3, 32),
    "hqq-w4g32": ("hqq", "hqq-w4g32", 4, 32),
    "hqq-w3g32": ("hqq", "hqq-w3g32", 3, 32),
    "quanto-qint4": ("quanto", "quanto-qint4", 4, None),
    "quanto-qint8": ("quanto", "quanto-qint8", 8, None),
    "torchao-int4-g32": ("torchao", "torchao-int4-g32", 4, 32),
    "torchao-int4-g32-asym": ("torchao", "torchao-int4-g32-asym", 4, 32),
}
# a packed part of each format, and how to damage its shape (one row fewer)
DAMAGE = {"bnb-nf4-dq": "model.layers.0.mlp.down_proj.weight.absmax",
          "mlx-w4g32": "model.layers.0.mlp.down_proj.scales",
          "hqq-w4g32": "model.layers.0.mlp.down_proj.W_q",
          "quanto-qint4": "model.layers.0.mlp.down_proj.weight._scale",
          "torchao-int4-g32": "model.layers.0.mlp.down_proj._weight_scale"}


@pytest.fixture(scope="module")
def base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(GOLDEN / "tiny-llama", dtype=torch.float32).eval()


def library_reference(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(GOLDEN / name / "library_dequantized.safetensors"))


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_reader_equals_the_library_that_wrote_it(base, name):
    path = GOLDEN / name
    fmt, label, bits, group = GOLDENS[name]
    reader = reader_for(path)
    about = reader.describe(path)
    assert (reader.name, about.label, about.bits, about.group_size) == (fmt, label, bits, group)
    check_belongs(reader.header(path, base), base, layout_for(base), tiny_tokenizer())
    contents = reader.read(path, base)
    reference = library_reference(name)
    linears = set(layout_for(base).quantizable_linears(base))
    assert set(contents.artifacts) == linears
    # MLX also quantizes the embedding table: it is read (dequantized) among the other tensors
    assert {f"{n}.weight" for n in contents.artifacts} | {n for n in reference if n in contents.tensors} == \
        set(reference)
    for key, ref in reference.items():
        ours = contents.artifacts[key.removesuffix(".weight")].dequantize() if key.removesuffix(".weight") in linears \
            else contents.tensors[key]
        assert torch.equal(ours.to(ref.dtype), ref), key
    assert set(contents.tensors) <= set(base.state_dict())


def test_the_library_references_are_of_the_files_beside_them():
    """A golden regenerated without its reference (or the other way round) is caught: the reference records the
    sha256 of the model file it was computed from."""
    import hashlib

    from safetensors import safe_open

    for name in GOLDENS:
        with safe_open(str(GOLDEN / name / "library_dequantized.safetensors"), "pt") as f:
            recorded = f.metadata()["source_sha256"]
        assert recorded == hashlib.sha256((GOLDEN / name / "model.safetensors").read_bytes()).hexdigest(), name


def test_the_library_reference_of_a_sharded_checkpoint_hashes_its_shards(tmp_path):
    """HQQ's save_to_safetensors writes shards and an index, no model.safetensors, for a model of more than 5 blocks
    (SmolLM2-135M: 30): writing the reference beside them must hash the shards the index names, in sorted order
    (it raised FileNotFoundError on model.safetensors, so the producer failed on the packaged model)."""
    import hashlib
    import importlib.util

    from safetensors import safe_open
    from safetensors.torch import save_file

    script = Path(__file__).resolve().parents[1] / "scripts" / "produce" / "check_layout.py"
    spec = importlib.util.spec_from_file_location("_check_layout", script)
    check_layout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_layout)
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"b": "model-00002-of-00002.safetensors", "a": "model-00001-of-00002.safetensors"}}))
    check_layout.write_reference(tmp_path, ({"layer": torch.eye(2)}, "lib 1.0", "how"))
    with safe_open(str(tmp_path / "library_dequantized.safetensors"), "pt") as f:
        recorded = f.metadata()["source_sha256"]
    shards = b"".join((tmp_path / f"model-0000{i}-of-00002.safetensors").read_bytes() for i in (1, 2))
    assert recorded == hashlib.sha256(shards).hexdigest()


def test_formats_without_integer_zeros_are_carried_dequantized_and_torchao_int4_packs(base):
    for name in ("bnb-nf4", "mlx-w4g32", "hqq-w4g32", "quanto-qint4"):
        arts = reader_for(GOLDEN / name).read(GOLDEN / name, base).artifacts
        assert all(isinstance(a, DequantizedWeights) for a in arts.values()), name
        assert not reader_for(GOLDEN / name).describe(GOLDEN / name).packable
    path = GOLDEN / "torchao-int4-g32-asym"
    arts = reader_for(path).read(path, base).artifacts
    assert all(isinstance(a, QuantizedWeights) and a.bits == 4 and a.group_size == 32 for a in arts.values())
    assert reader_for(path).describe(path).packable


def _json_bits(path: Path, key: str) -> int:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return f.get_slice(key).get_shape()[0] * 8


@pytest.mark.parametrize("name,per_layer", [
    # NF4 codes (4 bits), an fp32 absmax per 64 weights, the fp32 [16] code book, the quant state's JSON bytes
    ("bnb-nf4", lambda path, layer, n: 4 + 32 / 64 + (16 * 32 + _json_bits(
        path, f"{layer}.weight.quant_state.bitsandbytes__nf4")) / n),
    # double quantization: uint8 absmax per 64, an fp32 scale per 256 of them, the fp32 [256] 8-bit code book
    ("bnb-nf4-dq", lambda path, layer, n: 4 + 8 / 64 + (16 * 32 + 256 * 32 + 32 * -(-n // 64 // 256) + _json_bits(
        path, f"{layer}.weight.quant_state.bitsandbytes__nf4")) / n),
    # MLX w4 g32, fp16 scales and biases: 4 + 2 * 16 / 32
    ("mlx-w4g32", lambda path, layer, n: 5.0),
    ("mlx-w3g32", lambda path, layer, n: 4.0),
    # torchao's IntxUnpackedToInt8: int8 per 4-bit code, fp32 scale and int8 zero point per 32
    ("torchao-int4-g32-asym", lambda path, layer, n: 8 + (32 + 8) / 32),
])
def test_bits_per_weight_count_what_the_file_stores(base, name, per_layer):
    path = GOLDEN / name
    for layer, art in reader_for(path).read(path, base).artifacts.items():
        n = art.out_features * art.in_features
        assert art.storage_bits_per_weight() == pytest.approx(per_layer(path, layer, n)), layer


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_a_checkpoint_of_another_model_is_refused(name):
    other = tiny_model("llama", intermediate_size=128)
    path = GOLDEN / name
    with pytest.raises(CheckpointError, match="not a checkpoint of this model|stores .*the checkpoint is damaged"):
        check_belongs(reader_for(path).header(path, other), other, layout_for(other))


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_a_packed_tensor_of_the_wrong_shape_is_refused_naming_it(tmp_path, base, name):
    from safetensors.torch import load_file, save_file

    path = tmp_path / name
    shutil.copytree(GOLDEN / name, path)
    (path / "library_dequantized.safetensors").unlink()
    tensors = load_file(str(path / "model.safetensors"))
    key = DAMAGE[name]
    tensors[key] = tensors[key][:-1].clone()
    from safetensors import safe_open

    with safe_open(str(GOLDEN / name / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(path / "model.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match=f"{key.replace('.', '[.]')} is \\("):
        reader_for(path).header(path, base)


def test_a_bitsandbytes_8bit_checkpoint_is_refused_in_one_line(tmp_path):
    path = tmp_path / "int8"
    shutil.copytree(GOLDEN / "bnb-nf4", path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(load_in_4bit=False, load_in_8bit=True)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="8-bit .*this reader takes 4-bit"):
        reader_for(path).describe(path)


@pytest.mark.parametrize("name", ["bnb-nf4-dq", "mlx-w4g32"])
def test_a_run_on_a_library_checkpoint(text_file, tmp_path, name):
    frame = execute(checkpoint_run(text_file, tmp_path, GOLDEN / name, f"method.label={name}"))
    quant = frame[frame.suite == "quant"].set_index("metric")["value"]
    assert quant["quantized_layers"] == 14 and quant["storage_bits_per_weight"] > 4
    assert ppl_and_kld(frame)[1] > 0
