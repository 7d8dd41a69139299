"""The upcycled MoE test bed (harness/upcycle.py): each expert a perturbed copy of the dense MLP, the router uneven,
the model close to the dense one it came from; and its config."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from harness import upcycle
from harness.config import ConfigError, ModelConfig
from structure.architectures import layout_for


def _calib(n=4, length=32):
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layout", upcycle.LAYOUTS)
def test_an_upcycled_model_computes_close_to_its_dense_model(layout):
    dense = tiny_model("llama")
    moe = upcycle.upcycle(dense, layout, _calib())
    ids = _calib(2, 24)
    with torch.no_grad():
        a, b = dense(ids).logits, moe(ids).logits
    assert moe.config.model_type == layout and layout_for(moe).spec.moe is not None
    assert not any(p.is_meta for p in moe.parameters())
    rel = (a - b).norm() / a.norm()
    assert 0 < rel < 0.05  # the experts' own perturbation, nothing more
    experts = moe.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(experts[0], experts[1])  # each expert is an expert of its own
    dense_gate = dense.model.layers[0].mlp.gate_proj.weight
    assert torch.allclose(experts[3][:dense_gate.shape[0]], dense_gate, rtol=0.2, atol=1e-3)


def test_the_router_is_uneven_and_deterministic():
    dense = tiny_model("llama")
    a = upcycle.upcycle(dense, "mixtral", _calib())
    b = upcycle.upcycle(dense, "mixtral", _calib())
    assert torch.equal(a.model.layers[1].mlp.gate.weight, b.model.layers[1].mlp.gate.weight)
    routed = []
    handle = a.model.layers[1].mlp.gate.register_forward_hook(lambda m, args, out: routed.append(out[2]))
    with torch.no_grad():
        a(_calib(16, 32))
    handle.remove()
    top = torch.cat(routed)
    shares = torch.bincount(top.flatten(), minlength=upcycle.EXPERTS).float() / top.shape[0]
    assert shares.max() > 2 * shares.min()  # some experts are hot, some cold


def test_model_upcycle_config():
    cfg = ModelConfig(name="smollm2_moe", upcycle="qwen2_moe")
    assert cfg.name == "smollm2_moe_qwen2_moe"
    with pytest.raises(ConfigError, match="model.upcycle"):
        ModelConfig(upcycle="qwen3_moe")
    with pytest.raises(ConfigError, match="model.upcycle"):
        ModelConfig(source="hf", path="x", upcycle="mixtral")
