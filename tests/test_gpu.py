"""Every CUDA path against its CPU reference: the block driver with GPU-resident blocks, each method on a tiny model,
the packed Triton model, and timing. Marked `gpu`; skipped where torch sees no CUDA device (scripts/gpu_check.sh
runs them on the device machine)."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model
from core.spec import QuantSpec
from methods import build_method
from methods.awq import AWQConfig
from methods.gptq import GPTQConfig
from methods.rtn import RTNConfig
from structure.architectures import apply_artifacts, layout_for
from structure.blockwise import capture_block_inputs
from structure.pipeline import BlockPipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def _calib(n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def test_block_driver_keeps_blocks_and_activations_on_the_gpu():
    model = tiny_model("llama").to(CUDA)
    layout = layout_for(model)
    inputs, kwargs = capture_block_inputs(model, layout, _calib(), CUDA)
    assert inputs.device.type == "cuda"
    cpu_inputs, _ = capture_block_inputs(tiny_model("llama"), layout, _calib(), CPU)
    torch.testing.assert_close(inputs.cpu(), cpu_inputs, rtol=1e-4, atol=1e-4)
    def step(ctx):
        out = ctx.forward()
        assert out.device.type == "cuda" and next(ctx.block.parameters()).device.type == "cuda"
        ctx.next_inputs = out
        return {}

    BlockPipeline(model, layout, CUDA).calibrated_pass(step, _calib(), "gpu check")


@pytest.mark.parametrize("config", [RTNConfig(), GPTQConfig(), AWQConfig(batch_size=4)], ids=lambda c: c.name)
def test_method_on_cuda_matches_cpu(config):
    base = tiny_model("llama")
    results = {}
    for device in (CUDA, CPU):
        model = copy.deepcopy(base).to(device)
        results[device.type] = build_method(config).quantize(model, layout_for(model), QuantSpec(4, 32), _calib(),
                                                             device).artifacts
    gpu, cpu = results["cuda"], results["cpu"]
    assert gpu.keys() == cpu.keys()
    for name in gpu:
        same = (gpu[name].codes.cpu() == cpu[name].codes).float().mean().item()
        assert same >= 0.99, f"{config.name} {name}: only {same:.4f} of the codes agree between CUDA and CPU"
        torch.testing.assert_close(gpu[name].scales.cpu(), cpu[name].scales, rtol=1e-3, atol=1e-6)


def test_packed_triton_model_matches_fake_quant_on_cuda():
    from kernels.quant_linear import pack_model

    model = tiny_model("llama").to(CUDA)
    layout = layout_for(model)
    artifacts = build_method(RTNConfig()).quantize(model, layout, QuantSpec(4, 32), None, CUDA).artifacts
    fake = copy.deepcopy(model)
    apply_artifacts(fake, artifacts)
    used = pack_model(model, artifacts, "triton", layout.shared_input_groups(model))
    assert set(used.values()) == {"triton"}
    ids = _calib(2, 16, seed=3).to(CUDA)
    with torch.no_grad():
        y, ref = model(ids).logits.float(), fake(ids).logits.float()
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 5e-3


def test_timing_on_cuda_returns_positive_rates():
    from harness.timing import time_generation

    rows = time_generation(tiny_model("llama").to(CUDA), 256, prompt_len=16, decode_tokens=4, batch_sizes=[1, 2],
                           device=CUDA, warmup=1, repeats=2)
    assert {r["metric"] for r in rows} == {"prefill_tokens_per_s", "decode_tokens_per_s"}
    assert all(r["value"] > 0 and "cuda" in r["detail"] for r in rows)
