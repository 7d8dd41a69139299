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
from structure.pipeline import BlockPipeline
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

    streamed, residency = load_streamed(directory, torch.float32, CPU, tmp_path / "scratch")
    assert all(p.is_meta for p in streamed.parameters())
    pipeline = BlockPipeline(streamed, layout_for(streamed), CPU, residency)
    got = build_method(METHOD_CONFIGS[method]).quantize_blocks(pipeline, spec, calib)
    assert isinstance(got.artifacts, ArtifactStore)  # on disk, not in memory
    assert all(p.is_meta for p in streamed.parameters())  # every block went back to the meta device
    assert not hasattr(streamed, "_weights_residency")  # the model carries no hidden state: the pipeline holds it
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


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "opt"])
def test_layerwise_forward_matches_the_ordinary_forward(family, tmp_path, monkeypatch):
    """Every window through block i before block i + 1: the same NLL as the model's own forward (Gemma 3 passes
    different masks and rotary embeddings to sliding and global layers; OPT has a final norm and no rotary). With
    the hidden states spilled to a file on disk, too."""
    import structure.layerwise
    from harness.perplexity import token_stats
    from structure.layerwise import layerwise_lm_head_inputs

    model = tiny_model(family, seed=5)
    windows = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    ordinary = token_stats(model, windows, CPU)["nll"]
    pipeline = BlockPipeline(model, layout_for(model), CPU)
    inputs = layerwise_lm_head_inputs(pipeline, windows)
    layerwise = token_stats(model, windows, CPU, hidden_of=lambda i, ids: inputs[i])["nll"]
    torch.testing.assert_close(torch.from_numpy(layerwise), torch.from_numpy(ordinary), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(structure.layerwise, "SPILL_FRACTION", 0.0)
    spilled = layerwise_lm_head_inputs(pipeline, windows, spill_dir=tmp_path)
    assert list(tmp_path.glob("hidden-*.bin")) and torch.equal(spilled, inputs)


def _tiny_run(model_dir, text_file, tmp_path, label, *extra):
    from harness.run import execute
    from test_run import tiny_run_overrides
    from test_config import make_config

    overrides = tiny_run_overrides(model_dir, text_file, tmp_path / label, *extra)
    return execute(make_config(*overrides, f"cache_dir={tmp_path / label / 'cache'}"))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_streamed_run_gives_the_in_memory_numbers(method, tiny_model_dir, text_file, tmp_path):
    """The whole run, model.streaming=true vs false: the same quantized weights (the cache entry is a directory of
    artifact files), the same baseline, ppl and KLD; a second streamed run reuses the entry."""
    args = (f"method={method}", "group_size=32", "calib.n_samples=4", "calib.seqlen=32", "eval.kld=true")
    if method == "awq":
        args += ("method.n_grid=4", "method.clip_grid=4")
    resident = _tiny_run(tiny_model_dir, text_file, tmp_path, "resident", *args, "model.streaming=false")
    streamed = _tiny_run(tiny_model_dir, text_file, tmp_path, "streamed", *args, "model.streaming=true")
    key = ["suite", "task", "metric"]
    a = resident[~resident.metric.str.endswith("wall_s") & (resident.suite != "stage")].set_index(key)["value"]
    b = streamed[~streamed.metric.str.endswith("wall_s") & (streamed.suite != "stage")].set_index(key)["value"]
    assert a.index.equals(b.index) and ("ppl", "textfile", "kld") in a.index
    torch.testing.assert_close(torch.tensor(b.to_numpy()), torch.tensor(a.to_numpy()), rtol=1e-5, atol=1e-7)
    assert resident.model_fingerprint.iloc[0] == streamed.model_fingerprint.iloc[0]
    entries = list((tmp_path / "streamed" / "cache" / "quantized").glob("*.d"))
    assert len(entries) == 1 and len(list((entries[0] / "artifacts").glob("*.pt"))) == 14
    assert not list((tmp_path / "streamed" / "cache").glob(".streaming-*"))  # the run's scratch is gone
    again = _tiny_run(tiny_model_dir, text_file, tmp_path, "streamed", *args, "model.streaming=true",
                      "eval.max_windows=2")
    detail = again[again.metric == "quant_wall_s"]["detail"].iloc[0]
    assert '"cached": true' in detail


def test_a_streamed_run_packs_the_model_for_kernels_and_timing(tiny_model_dir, text_file, tmp_path):
    """kernel=... and timing in a streamed run: the model is packed block by block into memory, checked against
    the fake-quantized model on the probe window, and evaluated packed: the in-memory run's numbers."""
    args = ("method=rtn", "group_size=32", "kernel=reference", "+eval/timing=default", "eval.timing.prompt_len=8",
            "eval.timing.decode_tokens=2", "eval.timing.repeats=1", "eval.timing.warmup=0")
    resident = _tiny_run(tiny_model_dir, text_file, tmp_path, "resident", *args, "model.streaming=false")
    streamed = _tiny_run(tiny_model_dir, text_file, tmp_path, "streamed", *args, "model.streaming=true")
    ppl = lambda f: f[(f.suite == "ppl") & (f.metric.isin(["ppl", "kld"]))].set_index("metric")["value"]  # noqa: E731
    torch.testing.assert_close(torch.tensor(ppl(streamed).to_numpy()), torch.tensor(ppl(resident).to_numpy()),
                               rtol=1e-6, atol=0)
    ratio = streamed[streamed.metric == "packed_ppl_ratio"]["value"].iloc[0]
    assert abs(ratio - 1) < 0.01
    assert (streamed.suite == "timing").any()


def test_a_streamed_run_that_cannot_hold_the_packed_model_is_refused_before_reading(tiny_model_dir, text_file,
                                                                                   tmp_path, monkeypatch):
    import structure.streaming
    from harness.config import ConfigError

    monkeypatch.setattr(structure.streaming, "available_memory", lambda device: 1000)
    with pytest.raises(ConfigError, match="eval.timing=null"):
        _tiny_run(tiny_model_dir, text_file, tmp_path, "x", "method=rtn", "model.streaming=true",
                  "+eval/timing=default")


def test_in_place_changes_survive_the_block_and_scratch_keeps_one_file_per_block(tmp_path):
    directory = sharded_checkpoint("llama", tmp_path / "ckpt")
    model, residency = load_streamed(directory, torch.float32, CPU, tmp_path / "scratch")
    layout = layout_for(model)
    name = "model.layers.0.mlp.down_proj.weight"
    original = residency.read(model, name)
    with residency.block(model, layout, 0) as block:
        block.mlp.down_proj.weight.data.mul_(2)  # in place: no new tensor to notice
    assert torch.equal(residency.read(model, name), original * 2)
    with residency.block(model, layout, 0) as block:
        block.input_layernorm.weight.data = block.input_layernorm.weight.data + 1
    assert torch.equal(residency.read(model, name), original * 2)  # carried into the block's new file
    assert len(list((tmp_path / "scratch").glob("model.layers.0.*.safetensors"))) == 1
    assert residency.artifact_store().directory != residency.artifact_store().directory


def test_a_streamed_run_evaluates_lm_eval_tasks_on_the_packed_model(tiny_model_dir, text_file, tmp_path):
    from harness.run import execute
    from test_config import make_config
    from test_run import tiny_run_overrides

    args = [a for a in tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=rtn", "group_size=32",
                                          "model.streaming=true") if a != "eval.lm_eval=null"]
    frame = execute(make_config(*args, "eval.lm_eval.tasks=[arc_easy]", "eval.lm_eval.limit=3"))
    acc = frame[(frame.suite == "lm_eval") & (frame.metric == "acc")]
    assert len(acc) == 1 and acc.n.iloc[0] == 3
    detail = frame[frame.metric == "kernel_fallback_layers"]["detail"].iloc[0]
    assert '"packed_from": "stream"' in detail


def test_a_streamed_unquantized_run_is_made_whole_for_timing(tiny_model_dir, text_file, tmp_path):
    """method=fp has nothing to pack: the streamed model is only materialized, and timed."""
    args = ("method=fp", "+eval/timing=default", "eval.timing.prompt_len=8", "eval.timing.decode_tokens=2",
            "eval.timing.repeats=1", "eval.timing.warmup=0")
    resident = _tiny_run(tiny_model_dir, text_file, tmp_path, "resident", *args, "model.streaming=false")
    streamed = _tiny_run(tiny_model_dir, text_file, tmp_path, "streamed", *args, "model.streaming=true")
    assert (streamed.suite == "timing").any() and not (streamed.suite == "quant").any()
    ppl = lambda f: f[f.metric == "ppl"]["value"].to_numpy()  # noqa: E731
    assert (ppl(streamed) == ppl(resident)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8,
                                   torch.bool])
def test_tensors_are_read_straight_from_the_file_as_safetensors_reads_them(dtype, tmp_path):
    from safetensors.torch import load_file, save_file

    from structure.streaming import read_safetensors

    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(7, 5, generator=gen), "b": torch.randn(3, generator=gen), "c": torch.zeros(0, 4),
               "scalar": torch.tensor(2.5)}
    tensors = {n: (t * 10).to(dtype) for n, t in tensors.items()}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    expected = load_file(str(tmp_path / "t.safetensors"))
    got = read_safetensors(tmp_path / "t.safetensors", list(tensors))
    for name in tensors:
        assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]), name
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-3])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        read_safetensors(tmp_path / "cut.safetensors", list(tensors))


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_the_next_block_reads_into_the_memory_the_last_one_released(stored, tmp_path):
    """Blocks of one shape reuse one set of tensors (no allocation per block, so no page faults per block), and a
    block's values are its own, not its predecessor's; a bf16 checkpoint is cast to the model's fp32 through
    pooled memory too."""
    tiny_model("llama", seed=3).to(stored).save_pretrained(tmp_path / "ckpt", max_shard_size="60KB")
    directory = tmp_path / "ckpt"
    model, residency = load_streamed(directory, torch.float32, CPU, tmp_path / "scratch")
    layout = layout_for(model)
    pointers, values = [], []
    for index in range(len(layout.blocks(model))):
        with residency.block(model, layout, index, writeback=False) as block:
            pointers.append(block.mlp.down_proj.weight.data_ptr())
            values.append(block.mlp.down_proj.weight.detach().clone())
    assert len(set(pointers[1:])) == 1 and pointers[1] == pointers[0]  # the first block's memory, reused
    for index, value in enumerate(values):
        assert torch.equal(value, residency.read(model, f"model.layers.{index}.mlp.down_proj.weight"))
    assert not torch.equal(values[0], values[1])


def test_a_tensor_of_the_overlay_is_never_reused_for_another_block(tmp_path):
    """The overlay (what a cached quantization folded in) is held by the residency: releasing a block that was
    given one of its tensors must not hand that memory to the next block's read."""
    directory = sharded_checkpoint("llama", tmp_path / "ckpt")
    name = "model.layers.0.mlp.down_proj.weight"
    skeleton_model, plain = load_streamed(directory, torch.float32, CPU, tmp_path / "plain")
    folded = plain.read(skeleton_model, name) * 3
    model, residency = load_streamed(directory, torch.float32, CPU, tmp_path / "scratch", overlay={name: folded})
    layout = layout_for(model)
    for index in range(len(layout.blocks(model))):
        with residency.block(model, layout, index, writeback=False):
            pass
    assert torch.equal(residency.read(model, name), plain.read(skeleton_model, name) * 3)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_a_streamed_quantized_evaluation_reads_no_weight_its_artifacts_replace(family, tmp_path, monkeypatch):
    """Layer-wise evaluation of a streamed model with its artifacts: the quantized linears' stored weights are never
    read (the dequantized artifacts replace them), and the lm_head inputs equal the fake-quantized model's in memory."""
    from harness.perplexity import token_stats
    from structure.architectures import BlockArtifacts, apply_artifacts
    from structure.layerwise import layerwise_lm_head_inputs

    directory = sharded_checkpoint(family, tmp_path / "ckpt")
    windows = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    in_memory = tiny_model(family, seed=3)
    layout = layout_for(in_memory)
    artifacts = build_method(RTNConfig()).quantize(in_memory, layout, QuantSpec(4, 32), None, CPU).artifacts
    apply_artifacts(in_memory, artifacts)
    expected = token_stats(in_memory, windows, CPU)["nll"]

    model, residency = load_streamed(directory, torch.float32, CPU, tmp_path / "scratch")
    pipeline = BlockPipeline(model, layout, CPU, residency)
    read: list[str] = []
    original = Checkpoint.read

    def counting_read(self, names, allocate=None):
        read.extend(names)
        return original(self, names, allocate)

    monkeypatch.setattr(Checkpoint, "read", counting_read)
    inputs = layerwise_lm_head_inputs(pipeline, windows, BlockArtifacts(layout, artifacts, CPU, pipeline.model))
    replaced = {f"{name}.weight" for name in artifacts}
    assert read and not replaced & set(read)  # the norms, biases and embeddings were read; no replaced weight was
    # the dequantized weights are freed with their block, not pooled for reads that never come (they would pile up)
    assert not [t for free in residency.pool._free.values() for t in free if t.dim() == 2]
    with pipeline.outside_blocks():
        got = token_stats(model, windows, CPU, hidden_of=lambda i, ids: inputs[i])["nll"]
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(expected), rtol=1e-5, atol=1e-6)
