"""Streaming: a meta-device model whose blocks are read from the safetensors shards one at a time must quantize to
bit-identical results, for every method, on two families; and the checkpoint reader's errors."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from core.spec import QuantSpec
from methods import build_method
from methods.awq.config import AWQConfig, AWQGPTQConfig
from methods.gptq import GPTQConfig
from methods.rtn import RTNConfig
from structure.architectures import layout_for
from structure.streaming import ArtifactStore, Checkpoint, CheckpointFormatError, load_streamed

CPU = torch.device("cpu")
METHOD_CONFIGS = {
    "rtn": RTNConfig(),
    "gptq": GPTQConfig(),
    "awq": AWQConfig(n_grid=4, clip_grid=4, clip_n_tokens=64),
    "awq_gptq": AWQGPTQConfig(awq=AWQConfig(n_grid=4, clip_grid=4, clip_n_tokens=64)),
}


def sharded_checkpoint(family: str, directory, shard: str = "60KB"):
    """A tiny random model saved as several safetensors shards with an index file."""
    model = tiny_model(family, seed=3)
    model.save_pretrained(directory, max_shard_size=shard)
    return directory


def _same_result(a, b) -> None:
    assert sorted(a.artifacts) == sorted(b.artifacts)
    for name in a.artifacts:
        x, y = a.artifacts[name], b.artifacts[name]
        for field in ("codes", "scales", "zeros"):
            assert torch.equal(getattr(x, field), getattr(y, field)), f"{name}.{field} differs"
    assert sorted(a.modified) == sorted(b.modified)
    for name in a.modified:
        assert torch.equal(a.modified[name], b.modified[name]), f"{name} differs"
    assert a.stats == b.stats


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_streamed_quantization_is_bit_identical(family, method, tmp_path):
    from transformers import AutoModelForCausalLM

    directory = sharded_checkpoint(family, tmp_path / "ckpt")
    assert (directory / "model.safetensors.index.json").exists()  # really sharded
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(4, 32)

    resident = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    expected = build_method(METHOD_CONFIGS[method]).quantize(resident, layout_for(resident), spec, calib, CPU)

    streamed = load_streamed(directory, torch.float32, CPU, tmp_path / "scratch")
    assert all(p.is_meta for p in streamed.parameters())
    got = build_method(METHOD_CONFIGS[method]).quantize(streamed, layout_for(streamed), spec, calib, CPU)
    assert isinstance(got.artifacts, ArtifactStore)  # on disk, not in memory
    assert all(p.is_meta for p in streamed.parameters())  # every block went back to the meta device
    _same_result(expected, got)


def test_a_checkpoint_without_safetensors_is_refused(tmp_path):
    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the older pickle format
    with pytest.raises(CheckpointFormatError, match="pytorch_model.bin"):
        Checkpoint(tmp_path)


def test_reads_tensor_by_tensor_across_shards(tmp_path):
    from safetensors.torch import load_file

    directory = sharded_checkpoint("llama", tmp_path, shard="30KB")
    checkpoint = Checkpoint(directory)
    shards = sorted(directory.glob("*.safetensors"))
    assert len(shards) > 2
    everything = {k: v for f in shards for k, v in load_file(f).items()}
    got = checkpoint.read(sorted(everything))
    assert all(torch.equal(got[k], everything[k]) for k in everything)
    assert checkpoint.nbytes() == sum(f.stat().st_size for f in shards)
