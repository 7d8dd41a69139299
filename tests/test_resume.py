"""A quantization stopped between two blocks resumes from the blocks it kept, and its result is identical to an
uninterrupted run's: for every calibrated method, in memory and streamed. Kept progress is reused only when every
file of it matches its checksum and it belongs to the same quantization; a run that died without a stop resumes
from its last periodic save (harness/progress.py, structure/progress.py)."""
from __future__ import annotations

import signal

import pytest
import torch

from conftest import tiny_model, tiny_moe_model
from core.spec import QuantSpec
from harness.preemption import Preempted, StopRequest
from harness.progress import ProgressStore
from methods import build_method
from methods.awq.config import AWQConfig, AWQGPTQConfig
from methods.gptq import GPTQConfig
from structure.architectures import layout_for
from structure.pipeline import BlockPipeline
from structure.streaming import load_streamed
from test_streaming import _same_result

CPU = torch.device("cpu")
AWQ = AWQConfig(n_grid=4, clip_grid=4, clip_n_tokens=64)
METHOD_CONFIGS = {"gptq": GPTQConfig(), "awq": AWQ, "awq_gptq": AWQGPTQConfig(awq=AWQ)}
SPEC = QuantSpec(4, 32)
N_BLOCKS = 4
KEY = {"what": "a test quantization"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "tiny4"
    tiny_model("llama", seed=3, num_hidden_layers=N_BLOCKS).save_pretrained(directory, max_shard_size="60KB")
    return directory


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def _pipeline(checkpoint, streamed: bool, scratch) -> BlockPipeline:
    from transformers import AutoModelForCausalLM

    if streamed:
        model, residency = load_streamed(checkpoint, torch.float32, CPU, scratch)
        return BlockPipeline(model, layout_for(model), CPU, residency)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return BlockPipeline(model, layout_for(model), CPU)


class StopAfter(ProgressStore):
    """Progress whose stop is asked for (as SIGUSR1 would) right after block `block` of pass `pass_index`."""

    def __init__(self, *args, pass_index: int, block: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.at = (pass_index, block)

    def open_pass(self, desc, n_blocks):
        kept, index = super().open_pass(desc, n_blocks), len(self.passes) - 1
        keep = kept.keep

        def keep_then_stop(block, next_inputs, n):
            if (index, block.index) == self.at:
                self.stop.ask(signal.SIGUSR1)
            keep(block, next_inputs, n)

        kept.keep = keep_then_stop
        return kept


def _same_nested(a, b) -> None:
    """Equal nested dicts/lists of tensors and plain values (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same_nested(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same_nested(x, y)
    else:
        assert a == b


def _state(pipeline: BlockPipeline) -> dict[str, torch.Tensor]:
    return {name: pipeline.read(name) for name in pipeline.model.state_dict()}


@pytest.mark.parametrize("streamed", [False, True], ids=["in_memory", "streamed"])
@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_a_stopped_quantization_resumes_to_the_uninterrupted_result(method, streamed, checkpoint, calib, tmp_path):
    config = METHOD_CONFIGS[method]
    reference = _pipeline(checkpoint, streamed, tmp_path / "s0")
    expected = build_method(config).quantize_blocks(reference, SPEC, calib)

    last_pass = 1 if method == "awq_gptq" else 0  # awq_gptq: stopped in its second pass (GPTQ), the AWQ pass done
    stopping = StopAfter(tmp_path / "progress", KEY, StopRequest(), every_s=None, pass_index=last_pass, block=1)
    with pytest.raises(Preempted, match="after block 2 of 4"):
        build_method(config).quantize_blocks(_pipeline(checkpoint, streamed, tmp_path / "s1").with_progress(stopping),
                                             SPEC, calib)

    resumed_pipeline = _pipeline(checkpoint, streamed, tmp_path / "s2")
    store = ProgressStore(tmp_path / "progress", KEY, every_s=None)
    got = build_method(config).quantize_blocks(resumed_pipeline.with_progress(store), SPEC, calib)
    summary = list(store.summary().values())
    assert summary[-1] == {"reused": 2, "computed": 2}  # blocks 0 and 1 kept, 2 and 3 computed
    if method == "awq_gptq":
        assert summary[0] == {"reused": N_BLOCKS, "computed": 0}  # the finished AWQ pass is restored, not rerun
    _same_result(expected, got)
    _same_nested(expected.extras, got.extras)  # AWQ's search, as saved with the run
    expected_state, got_state = _state(reference), _state(resumed_pipeline)  # the model as the method leaves it
    assert expected_state.keys() == got_state.keys()
    for name in expected_state:
        assert torch.equal(expected_state[name], got_state[name]), name


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "tiny_moe4"
    tiny_moe_model("mixtral", seed=3, num_hidden_layers=N_BLOCKS).save_pretrained(directory, max_shard_size="60KB")
    return directory


@pytest.mark.parametrize("streamed", [False, True], ids=["in_memory", "streamed"])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_stopped_moe_quantization_resumes_with_its_routing_and_fallbacks(method, streamed, moe_checkpoint, calib,
                                                                          tmp_path):
    """A mixture's kept blocks hold the fused experts as the step left them and the routing the pass measured: the
    resumed result (artifacts, stats with each expert's token count and fallback, routing per block) and the model
    equal an uninterrupted run's."""
    config = METHOD_CONFIGS[method]
    reference = _pipeline(moe_checkpoint, streamed, tmp_path / "s0")
    expected = build_method(config).quantize_blocks(reference, SPEC, calib)
    assert len(expected.routing) == N_BLOCKS

    stopping = StopAfter(tmp_path / "progress", KEY, StopRequest(), every_s=None, pass_index=0, block=1)
    with pytest.raises(Preempted, match="after block 2 of 4"):
        build_method(config).quantize_blocks(
            _pipeline(moe_checkpoint, streamed, tmp_path / "s1").with_progress(stopping), SPEC, calib)
    resumed_pipeline = _pipeline(moe_checkpoint, streamed, tmp_path / "s2")
    store = ProgressStore(tmp_path / "progress", KEY, every_s=None)
    got = build_method(config).quantize_blocks(resumed_pipeline.with_progress(store), SPEC, calib)
    assert list(store.summary().values()) == [{"reused": 2, "computed": 2}]
    _same_result(expected, got)
    assert got.routing == expected.routing  # blocks 0 and 1: from the kept progress
    expected_state, got_state = _state(reference), _state(resumed_pipeline)
    for name in expected_state:
        assert torch.equal(expected_state[name], got_state[name]), name


def test_kept_progress_that_fails_its_checksum_is_set_aside_and_recomputed(checkpoint, calib, tmp_path):
    expected = build_method(GPTQConfig()).quantize_blocks(_pipeline(checkpoint, False, None), SPEC, calib)
    stopping = StopAfter(tmp_path / "progress", KEY, StopRequest(), every_s=None, pass_index=0, block=1)
    with pytest.raises(Preempted):
        build_method(GPTQConfig()).quantize_blocks(_pipeline(checkpoint, False, None).with_progress(stopping), SPEC,
                                                   calib)
    block = tmp_path / "progress" / "pass-0" / "block-0.pt"
    data = bytearray(block.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit inside the kept artifacts
    block.write_bytes(bytes(data))
    store = ProgressStore(tmp_path / "progress", KEY, every_s=None)
    got = build_method(GPTQConfig()).quantize_blocks(_pipeline(checkpoint, False, None).with_progress(store), SPEC,
                                                     calib)
    assert store.summary() == {"gptq": {"reused": 0, "computed": N_BLOCKS}}
    assert any(".corrupt-" in p.name for p in (tmp_path / "progress").iterdir())  # moved aside, not deleted
    _same_result(expected, got)


def test_progress_of_another_quantization_is_never_reused(checkpoint, calib, tmp_path):
    stopping = StopAfter(tmp_path / "progress", KEY, StopRequest(), every_s=None, pass_index=0, block=1)
    with pytest.raises(Preempted):
        build_method(GPTQConfig()).quantize_blocks(_pipeline(checkpoint, False, None).with_progress(stopping), SPEC,
                                                   calib)
    other = ProgressStore(tmp_path / "progress", {"what": "another quantization"}, every_s=None)
    build_method(GPTQConfig()).quantize_blocks(_pipeline(checkpoint, False, None).with_progress(other), SPEC, calib)
    assert other.summary() == {"gptq": {"reused": 0, "computed": N_BLOCKS}}


class DiesAfter(ProgressStore):
    """Progress of a run killed (no stop asked for, nothing saved on the way out) right after block `block`."""

    def __init__(self, *args, block: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.block = block

    def open_pass(self, desc, n_blocks):
        kept = super().open_pass(desc, n_blocks)
        keep = kept.keep

        def keep_then_die(block, next_inputs, n):
            keep(block, next_inputs, n)
            if block.index == self.block:
                raise KeyboardInterrupt("killed")

        kept.keep = keep_then_die
        return kept


@pytest.mark.parametrize("every_s, reused", [(0.0, 3), (None, 0)], ids=["every_block", "only_when_signalled"])
def test_a_killed_run_resumes_from_its_last_periodic_save(every_s, reused, checkpoint, calib, tmp_path):
    """progress_every_s=0 saves the next inputs after every block, so a run killed without warning loses nothing;
    with null it saves only when a signal asks for a stop, and a killed run starts over (its block files alone
    are not enough)."""
    expected = build_method(GPTQConfig()).quantize_blocks(_pipeline(checkpoint, False, None), SPEC, calib)
    dying = DiesAfter(tmp_path / "progress", KEY, every_s=every_s, block=2)
    with pytest.raises(KeyboardInterrupt):
        build_method(GPTQConfig()).quantize_blocks(_pipeline(checkpoint, False, None).with_progress(dying), SPEC,
                                                   calib)
    store = ProgressStore(tmp_path / "progress", KEY, every_s=every_s)
    got = build_method(GPTQConfig()).quantize_blocks(_pipeline(checkpoint, False, None).with_progress(store), SPEC,
                                                     calib)
    assert store.summary() == {"gptq": {"reused": reused, "computed": N_BLOCKS - reused}}
    _same_result(expected, got)
