"""Mixtures of experts (and Phi-3's fused projections): the architecture table describes every family's experts,
every expert is quantized as an ordinary matrix calibrated on the tokens its router sent it, a starved expert falls
back to round-to-nearest (counted, warned), streamed runs equal in-memory ones bit for bit, and AWQ's fold keeps the
routing."""
from __future__ import annotations

import logging
from contextlib import ExitStack

import pytest
import torch

from conftest import MOE_FAMILIES, tiny_model, tiny_moe_model
from core.quant import quantize_weight
from core.spec import QuantSpec
from methods import build_method
from methods.awq.config import AWQConfig
from methods.awq.search import run_awq_search
from methods.gptq import GPTQConfig, HessianAccumulator, gptq_quantize_layer
from methods.rtn import RTNConfig
from structure.architectures import apply_artifacts, fits, layout_for, unknown_architecture, ARCHITECTURES
from structure.experts import ExpertMatrix, LinearizedExperts, linearized
from structure.pipeline import BlockPipeline
from structure.streaming import load_streamed

CPU = torch.device("cpu")
FAMILIES = MOE_FAMILIES + ("phi3",)
SPEC = QuantSpec(4, 32)
METHOD_CONFIGS = {"rtn": RTNConfig(), "gptq": GPTQConfig(),
                  "awq": AWQConfig(n_grid=4, clip_grid=4, clip_n_tokens=64)}
ROUTER = {"mixtral": "mlp.gate", "qwen2_moe": "mlp.gate", "qwen3_moe": "mlp.gate", "olmoe": "mlp.gate",
          "deepseek_v3": "mlp.gate", "gpt_oss": "mlp.router"}


def _calib(n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _moe_blocks(model) -> list[int]:
    layout = layout_for(model)
    return [i for i, b in enumerate(layout.blocks(model)) if layout.parts(b).moe is not None]


@pytest.mark.parametrize("family", FAMILIES)
def test_linearized_experts_compute_what_the_model_computes(family):
    """The per-expert linears (views of the fused parameters, the model's own gating) give the model's output."""
    model = tiny_moe_model(family)
    ids = _calib(2, 16)
    with torch.no_grad():
        expected = model(ids).logits
        layout = layout_for(model)
        with ExitStack() as stack:
            linears = [stack.enter_context(linearized(b, layout.parts(b).moe.experts))
                       for b in layout.blocks(model) if layout.parts(b).moe is not None]
            got = model(ids).logits
    assert all(isinstance(lin, LinearizedExperts) for lin in linears)
    assert len(linears) == len(_moe_blocks(model))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_table_names_every_matrix_of_every_block(family):
    """E x 3 matrices per MoE block (gate, up, down of each expert) plus the block's other linears; the router is never
    among them; no linear of the model is left out."""
    model = tiny_moe_model(family)
    layout = layout_for(model)
    matrices = layout.quantizable_linears(model)
    experts = [n for n in matrices if ".experts." in n]
    n_experts = model.config.num_local_experts if hasattr(model.config, "num_local_experts") else \
        getattr(model.config, "num_experts", getattr(model.config, "n_routed_experts", 0))
    assert len(experts) == (n_experts * 3 * len(_moe_blocks(model)) if family != "phi3" else 0)
    assert all(isinstance(matrices[n], ExpertMatrix) for n in experts)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    kept = {n for n in linears if n.endswith((".mlp.gate", ".mlp.router", "shared_expert_gate"))}
    assert linears - kept == {n for n in matrices if n not in experts}
    assert not any(n.endswith((".mlp.gate", ".mlp.router")) for n in matrices)
    if family in ROUTER:
        assert fits(ARCHITECTURES.get(family), model)


def test_an_expert_matrix_reads_and_writes_its_slice_of_the_fused_parameter():
    model = tiny_moe_model("gpt_oss")  # transposed and interleaved: the hardest layout
    experts = model.model.layers[0].mlp.experts
    spec = layout_for(model).parts(model.model.layers[0]).moe.experts
    up = ExpertMatrix(experts, spec, 2, "up_proj")
    assert torch.equal(up.weight, experts.gate_up_proj.data[2][:, 1::2].T)
    before = experts.gate_up_proj.data.clone()
    up.write(torch.full((up.out_features, up.in_features), 7.0))
    changed = (experts.gate_up_proj.data != before)
    assert changed[2][:, 1::2].all() and not changed[2][:, 0::2].any() and not changed[[0, 1, 3]].any()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_every_family_quantizes_streamed_bit_identically_to_in_memory(family, method, tmp_path):
    from transformers import AutoModelForCausalLM

    from test_streaming import _same_result

    tiny_moe_model(family, seed=3).save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    calib = _calib()
    resident = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    routers = {n: p.detach().clone() for n, p in resident.named_parameters() if n.endswith(("gate.weight",
                                                                                            "router.weight"))}
    expected = build_method(METHOD_CONFIGS[method]).quantize(resident, layout_for(resident), SPEC, calib, CPU)

    streamed, residency = load_streamed(tmp_path / "ckpt", torch.float32, CPU, tmp_path / "scratch")
    pipeline = BlockPipeline(streamed, layout_for(streamed), CPU, residency)
    got = build_method(METHOD_CONFIGS[method]).quantize_blocks(pipeline, SPEC, calib)
    _same_result(expected, got)
    assert expected.routing == got.routing
    n_expert_matrices = sum(".experts." in n for n in expected.artifacts)
    assert n_expert_matrices == (0 if family == "phi3" else 4 * 3 * len(_moe_blocks(resident)))
    for name, before in routers.items():  # never quantized; only AWQ's fold touches it (see the routing test)
        assert name.rpartition(".")[0] not in expected.artifacts
        if method != "awq" and not name.endswith("shared_expert_gate.weight"):
            assert torch.equal(resident.get_parameter(name), before)
    if family != "phi3" and method != "rtn":
        tokens = calib.numel()
        top_k = 2
        assert sorted(expected.routing) == [f"model.layers.{i}" for i in _moe_blocks(resident)]
        assert all(sum(c) == tokens * top_k for c in expected.routing.values())


def _moe_inputs_of_block0(model, calib):
    """The inputs of block 0's MoE module, one calibration window at a time (as the pipeline feeds them)."""
    seen = []
    handle = model.model.layers[0].mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        for row in calib:
            model(row[None], use_cache=False)
    handle.remove()
    return seen


def test_a_gptq_expert_is_gptq_on_exactly_the_tokens_routed_to_it():
    """Expert e's codes equal GPTQ run on a Hessian built from exactly the tokens block 0's router sent to e."""
    model = tiny_moe_model("mixtral")
    calib = _calib()
    inputs = _moe_inputs_of_block0(model, calib)  # the fp block: true_sequential=False sees it unquantized
    gate = model.model.layers[0].mlp.gate
    experts_spec = layout_for(model).parts(model.model.layers[0]).moe.experts
    weights = {e: (ExpertMatrix(model.model.layers[0].mlp.experts, experts_spec, e, "gate_proj").weight.clone(),
                   ExpertMatrix(model.model.layers[0].mlp.experts, experts_spec, e, "up_proj").weight.clone())
               for e in range(4)}
    hessians = {e: HessianAccumulator(64, CPU) for e in range(4)}
    for x in inputs:
        h = x.reshape(-1, 64)
        _, _, top_k = gate(h)
        for e in range(4):
            token_idx, _ = torch.where(top_k == e)
            hessians[e].add(h[token_idx])
    result = build_method(GPTQConfig(true_sequential=False)).quantize(model, layout_for(model), SPEC, calib, CPU)
    for e in range(4):
        assert hessians[e].n == result.stats[f"model.layers.0.mlp.experts.{e}.gate_proj"]["n_tokens"] > 0
        for w, proj in zip(weights[e], ("gate_proj", "up_proj")):
            art, _ = gptq_quantize_layer(w, hessians[e].H, SPEC)
            assert torch.equal(art.codes, result.artifacts[f"model.layers.0.mlp.experts.{e}.{proj}"].codes)
    assert result.routing["model.layers.0"] == [hessians[e].n for e in range(4)]


def _starve_expert(model, expert: int) -> None:
    """Make every router of a gpt-oss model never choose `expert` (its router bias, far below the others)."""
    for block in model.model.layers:
        block.mlp.router.bias.data[expert] = -1e4


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_an_expert_that_gets_no_tokens_falls_back_to_rtn_counted_and_warned(method, caplog):
    model = tiny_moe_model("gpt_oss")
    _starve_expert(model, 3)
    calib = _calib()
    with caplog.at_level(logging.WARNING):
        result = build_method(METHOD_CONFIGS[method]).quantize(model, layout_for(model), SPEC, calib, CPU)
    assert "rounded to nearest" in caplog.text
    for block in ("model.layers.0", "model.layers.1"):
        assert result.routing[block][3] == 0
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"{block}.mlp.experts.3.{proj}"
            assert result.stats[name] == {"fallback": 1, "n_tokens": 0} or \
                (result.stats[name]["fallback"] == 1 and result.stats[name]["n_tokens"] == 0)
            assert result.stats[f"{block}.mlp.experts.0.{proj}"]["fallback"] == 0
    fell_back = [n for n, s in result.stats.items() if s.get("fallback")]
    assert len(fell_back) == 2 * 3
    if method == "gptq":  # plain round to nearest of the weight, with GPTQ's quantizer range
        fresh = tiny_moe_model("gpt_oss")
        spec = layout_for(fresh).parts(fresh.model.layers[1]).moe.experts
        w = ExpertMatrix(fresh.model.layers[1].mlp.experts, spec, 3, "down_proj").weight
        assert torch.equal(result.artifacts["model.layers.1.mlp.experts.3.down_proj"].codes,
                           quantize_weight(w, SPEC, "minmax_zero").codes)


def test_moe_min_tokens_sets_the_fallback_threshold():
    calib = _calib()
    every = build_method(GPTQConfig(moe_min_tokens="100%")).quantize(
        model := tiny_moe_model("qwen3_moe"), layout_for(model), SPEC, calib, CPU)
    assert all(s["fallback"] == (".experts." in n) for n, s in every.stats.items())
    none = build_method(GPTQConfig(moe_min_tokens="0")).quantize(
        model := tiny_moe_model("qwen3_moe"), layout_for(model), SPEC, calib, CPU)
    assert not any(s["fallback"] for s in none.stats.values())
    with pytest.raises(ValueError, match="method.moe_min_tokens"):
        GPTQConfig(moe_min_tokens="lots")


def test_routing_all_gives_every_expert_every_token_while_the_output_follows_the_router():
    model = tiny_moe_model("gpt_oss")
    _starve_expert(model, 3)
    calib = _calib()
    pipeline = BlockPipeline(model, layout_for(model), CPU, moe_routing="all")
    result = build_method(GPTQConfig()).quantize_blocks(pipeline, SPEC, calib)
    experts = {n: s for n, s in result.stats.items() if ".experts." in n}
    assert all(s["n_tokens"] == calib.numel() and s["fallback"] == 0 for s in experts.values())
    assert all(counts[3] == 0 and sum(counts) == 2 * calib.numel() for counts in result.routing.values())
    with pytest.raises(ValueError, match="calib.moe_routing"):
        BlockPipeline(model, layout_for(model), CPU, moe_routing="some")


@pytest.mark.parametrize("scale_router, keeps_routing", [(None, True), (False, False)])
def test_awq_folds_the_shared_expert_scale_into_the_router(scale_router, keeps_routing):
    """With the router's columns scaled too (the default), folding AWQ's scales changes nothing the model computes;
    AutoAWQ's Mixtral leaves the router unscaled (scale_router=false), and the routing moves."""
    model = tiny_moe_model("mixtral", seed=1)
    with torch.no_grad():  # uneven activations, so the searched scales are far from 1
        model.model.layers[0].post_attention_layernorm.weight.mul_(torch.linspace(0.2, 5.0, 64))
    calib = _calib()
    ids = _calib(2, 16, seed=5)
    with torch.no_grad():
        expected = model(ids).logits
    config = AWQConfig(n_grid=4, auto_clip=False, scale_router=scale_router)
    search = run_awq_search(BlockPipeline(model, layout_for(model), CPU), SPEC, calib, config)[0]
    gate_up = [g for g in search.blocks["model.layers.0"].scales if g.prev == "post_attention_layernorm"][0]
    assert not torch.allclose(gate_up.s, torch.ones_like(gate_up.s))
    assert gate_up.also_scaled == (("mlp.gate",) if keeps_routing else ())
    with torch.no_grad():
        got = model(ids).logits
    if keeps_routing:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    else:
        assert (got - expected).abs().max() > 1e-3


def test_phi3_folds_up_to_down_into_the_last_rows_of_gate_up():
    model = tiny_moe_model("phi3")
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.mul_(torch.linspace(0.2, 5.0, 64))
    calib, ids = _calib(), _calib(2, 16, seed=5)
    with torch.no_grad():
        expected = model(ids).logits
    search = run_awq_search(BlockPipeline(model, layout_for(model), CPU), SPEC, calib,
                            AWQConfig(n_grid=4, auto_clip=False))[0]
    assert any(g.prev_rows == "last" for g in search.blocks["model.layers.0"].scales)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_fake_quant_writes_every_expert_into_the_fused_parameters():
    model = tiny_moe_model("qwen2_moe")
    layout = layout_for(model)
    artifacts = {n: quantize_weight(m.weight, SPEC) for n, m in layout.quantizable_linears(model).items()}
    apply_artifacts(model, artifacts)
    for name, art in artifacts.items():
        assert torch.equal(layout.matrix(model, name).weight, art.dequantize())


def test_an_unknown_family_names_a_family_only_when_its_layout_really_fits():
    granite = tiny_model("llama")  # a Llama-shaped model under a name the table does not know
    granite.config.model_type = "granite_like"
    suggested = unknown_architecture("granite_like", granite).split("the entries of")[1]
    assert "'llama'" in suggested and "'mixtral'" not in suggested
    mixtral = tiny_moe_model("mixtral")
    message = unknown_architecture("mixtral_like", mixtral)
    suggested = message.split("the entries of")[1]
    assert "'mistral'" not in suggested and "'llama'" not in suggested and "'mixtral'" in suggested
    assert "did you mean" not in message
    assert not fits(ARCHITECTURES.get("mistral"), mixtral)  # Mixtral's experts are not Mistral's MLP
