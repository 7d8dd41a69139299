"""GPTQ: the layer-level core on toy matrices, then the method on tiny random models."""
from __future__ import annotations

import pytest
import torch

from structure.architectures import layout_for
from core.spec import QuantSpec
from methods.gptq import GPTQ, GPTQConfig, HessianAccumulator, gptq_quantize_layer
from core.quant import grouped_qparams, quantize_weight
from conftest import tiny_model


def correlated_inputs(n: int = 1024, d: int = 64, seed: int = 0) -> torch.Tensor:
    """[n, d] activations with correlated channels and unequal scales, like real hidden states."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    return (torch.randn(n, d, generator=g) @ mix + 0.1 * torch.randn(n, d, generator=g)) * torch.linspace(0.2, 3, d)


def hessian_of(X: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(X.shape[-1], "cpu")
    acc.add(X)
    return acc.H


def output_error(W: torch.Tensor, Q: torch.Tensor, X: torch.Tensor) -> float:
    return ((W - Q) @ X.T).norm().item()


@pytest.fixture
def layer():
    torch.manual_seed(1)
    return torch.randn(48, 64), correlated_inputs()


def test_hessian_running_mean_matches_closed_form():
    X = correlated_inputs(300, 16)
    acc = HessianAccumulator(16, "cpu")
    for chunk in (X[:7], X[7:150].reshape(11, 13, 16), X[150:]):
        acc.add(chunk)
    assert acc.n == 300
    assert acc.H.dtype == torch.float64  # the default: stable under thread count and CPU kernel family
    torch.testing.assert_close(acc.H, 2 / 300 * X.double().T @ X.double(), rtol=1e-12, atol=1e-12)


def test_default_precision_is_independent_of_thread_count():
    """float64 Hessian maths: the codes GPTQ picks under 1 and 2 threads are the same (the single-thread run is
    the reference); fp32 maths is what the references use and what moved between thread counts."""
    W = torch.randn(96, 256, generator=torch.Generator().manual_seed(3))
    X = correlated_inputs(4096, 256)
    old = torch.get_num_threads()

    def run(n):
        torch.set_num_threads(n)
        acc = HessianAccumulator(256, "cpu")
        for chunk in X.split(512):
            acc.add(chunk)
        return gptq_quantize_layer(W, acc.H, QuantSpec(3, 64))[0]

    try:
        ref, art = run(1), run(2)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(art.codes, ref.codes) and torch.equal(art.scales, ref.scales)


def test_empty_calibration_is_an_error():
    with pytest.raises(ValueError, match="blk.q_proj.*empty calibration"):
        HessianAccumulator(8, "cpu", name="blk.q_proj").H


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [16, None])
def test_gptq_beats_rtn_on_layer_output(layer, bits, group_size):
    W, X = layer
    spec = QuantSpec(bits, group_size)
    art, stats = gptq_quantize_layer(W, hessian_of(X), spec)
    rtn = quantize_weight(W, spec, "minmax_zero")  # the same quantizer, no error feedback
    assert output_error(W, art.dequantize(), X) < 0.95 * output_error(W, rtn.dequantize(), X)
    assert stats["damp_retries"] == 0 and stats["damp_percent"] == 0.01 and stats["loss"] > 0


def test_lazy_batches_are_exact(layer):
    """Lazy batching only defers updates; it changes nothing while every group starts a block (as in the reference)."""
    W, X = layer
    H = hessian_of(X)
    for spec in (QuantSpec(4, None), QuantSpec(3, 32)):
        one_block, _ = gptq_quantize_layer(W, H, spec, block_size=32 if spec.group_size else 64)
        for block_size in (8, 16):
            lazy, _ = gptq_quantize_layer(W, H, spec, block_size=block_size)
            torch.testing.assert_close(lazy.dequantize(), one_block.dequantize(), rtol=0, atol=1e-4)


def test_matches_textbook_obq_update(layer):
    """Cholesky-form GPTQ equals the original OBS/OBQ update with an explicit inverse of the remaining Hessian."""
    W, X = layer
    W, X = W[:8, :24].double(), X[:, :24].double()
    spec = QuantSpec(3, None)
    H = 2 / X.shape[0] * X.T @ X
    H += 0.01 * torch.diag(H).mean() * torch.eye(24, dtype=torch.float64)
    scale, zero = (t.double() for t in grouped_qparams(W.float(), spec, "minmax_zero"))  # [out, 1] each
    Wk, Q = W.clone(), torch.zeros_like(W)
    for j in range(24):  # quantize column j, then re-fit the not yet quantized columns j+1.. (OBS step)
        Hinv_rest = torch.linalg.inv(H[j:, j:])
        Q[:, j] = ((torch.round(Wk[:, j:j + 1] / scale) + zero).clamp(0, 7) - zero)[:, 0] * scale[:, 0]
        err = (Wk[:, j] - Q[:, j]) / Hinv_rest[0, 0]
        Wk[:, j:] -= err[:, None] * Hinv_rest[0][None, :]
    art, _ = gptq_quantize_layer(W.float(), (2 / X.shape[0] * X.T @ X).float(), spec, block_size=8)
    torch.testing.assert_close(art.dequantize().double(), Q, rtol=0, atol=1e-5)


def test_short_last_group(layer):
    W, X = layer
    W, X = W[:, :40], X[:, :40]
    art, _ = gptq_quantize_layer(W, hessian_of(X), QuantSpec(4, 16))
    assert art.n_groups == 3 and art.has_short_group
    assert art.group_index().tolist() == [i // 16 for i in range(40)]


def test_act_order_records_valid_g_idx(layer):
    W, X = layer
    H = hessian_of(X)
    spec = QuantSpec(3, 16)
    art, _ = gptq_quantize_layer(W, H, spec, desc_act=True)
    g = art.g_idx.long()
    assert art.g_idx.dtype == torch.int32 and g.min() >= 0 and g.max() < art.n_groups == 4
    assert torch.bincount(g).tolist() == [16] * 4
    # Groups follow descending diag(H): the first group holds the 16 largest curvatures.
    top = torch.argsort(torch.diag(H), descending=True)[:16]
    assert set(torch.nonzero(g == 0).flatten().tolist()) == set(top.tolist())
    assert not torch.equal(g, torch.arange(64) // 16)
    manual = (art.codes.float() - art.zeros.float()[:, g]) * art.scales[:, g]
    torch.testing.assert_close(art.dequantize(), manual, rtol=0, atol=0)
    rtn = quantize_weight(W, spec, "minmax_zero")
    assert output_error(W, art.dequantize(), X) < output_error(W, rtn.dequantize(), X)


def test_static_groups_use_original_weight(layer):
    W, X = layer
    spec = QuantSpec(4, 16)
    for desc_act in (False, True):
        art, _ = gptq_quantize_layer(W, hessian_of(X), spec, desc_act=desc_act, static_groups=True)
        scale, zero = grouped_qparams(W, spec, "minmax_zero")
        torch.testing.assert_close(art.scales, scale, rtol=0, atol=0)
        assert torch.equal(art.zeros, zero.to(torch.uint8))
        if desc_act:  # static groups keep contiguous group numbers even under act-order
            assert torch.equal(art.g_idx.long(), torch.arange(64) // 16)
    dynamic, _ = gptq_quantize_layer(W, hessian_of(X), spec, block_size=16)
    assert torch.equal(dynamic.scales[:, 0], scale[:, 0])
    assert not torch.equal(dynamic.scales[:, 1:], scale[:, 1:])  # later groups see the updated weights


def test_dead_input_column_is_zeroed(layer):
    W, X = layer
    X = X.clone()
    X[:, [3, 40]] = 0
    for desc_act in (False, True):
        art, stats = gptq_quantize_layer(W, hessian_of(X), QuantSpec(4, 16), desc_act=desc_act)
        Q = art.dequantize()
        assert stats["n_dead"] == 2
        assert torch.all(Q[:, [3, 40]] == 0) and torch.isfinite(Q).all()


def test_symmetric_codes_center_on_half_range(layer):
    W, X = layer
    art, _ = gptq_quantize_layer(W, hessian_of(X), QuantSpec(4, 16, symmetric=True))
    assert torch.all(art.zeros == 8)


def test_indefinite_hessian_retries_damping():
    d = 32
    e = torch.ones(d) / d**0.5
    H = torch.eye(d) - 1.015 * torch.outer(e, e)  # one eigenvalue -0.015: damp 0.01 fails, 0.02 succeeds
    art, stats = gptq_quantize_layer(torch.randn(8, d), H, QuantSpec(4, None), damp_increment=0.01)
    assert stats["damp_retries"] == 1 and stats["damp_percent"] == pytest.approx(0.02)
    assert torch.isfinite(art.dequantize()).all()


def test_singular_hessian_after_retries_is_an_error():
    H = -torch.eye(16)
    with pytest.raises(ValueError, match="blk.o_proj.*singular"):
        gptq_quantize_layer(torch.randn(4, 16), H, QuantSpec(4, None), max_damp_retries=3, name="blk.o_proj")


@pytest.mark.parametrize("bad", ["nan_h", "inf_w", "zero_h", "shape"])
def test_bad_inputs_are_errors(bad):
    W, H = torch.randn(4, 16), hessian_of(correlated_inputs(64, 16))
    if bad == "nan_h":
        H[2, 3] = float("nan")
    elif bad == "inf_w":
        W[0, 0] = float("inf")
    elif bad == "zero_h":
        H = torch.zeros(16, 16)
    else:
        H = H[:8, :8]
    with pytest.raises(ValueError, match="blk.k_proj"):
        gptq_quantize_layer(W, H, QuantSpec(4, 8), name="blk.k_proj")


@pytest.mark.parametrize("kwargs", [dict(damp_percent=0.0), dict(damp_percent=1.5), dict(block_size=0),
                                    dict(range_rule="absmax"), dict(max_damp_retries=-1), dict(batch_size=0)])
def test_config_validation(kwargs):
    with pytest.raises(ValueError, match="method\\."):
        GPTQConfig(**kwargs)


@pytest.mark.parametrize("family,config", [("llama", GPTQConfig()), ("opt", GPTQConfig(desc_act=True, true_sequential=False))])
def test_method_quantizes_every_linear(family, config, calib_tokens):
    model = tiny_model(family)
    layout = layout_for(model)
    spec = QuantSpec(4, 32)
    with torch.no_grad():
        ref_logits = model(calib_tokens[:2]).logits
    result = GPTQ(config).quantize(model, layout, spec, calib_tokens, torch.device("cpu"))
    artifacts = result.artifacts
    linears = layout.quantizable_linears(model)
    assert set(artifacts) == set(linears)
    for name, lin in linears.items():
        art = artifacts[name]
        assert art.codes.shape == lin.weight.shape and art.bits == 4 and art.group_size == 32
        assert (art.g_idx is not None) == config.desc_act
        torch.testing.assert_close(lin.weight.data, art.dequantize(), rtol=0, atol=0)  # written in place
        assert result.stats[name]["n_tokens"] == calib_tokens.numel()
    assert not result.modified  # GPTQ changes only linear weights, which the artifacts cover
    with torch.no_grad():
        logits = model(calib_tokens[:2]).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, ref_logits)


def test_method_needs_calibration(tiny_llama):
    with pytest.raises(ValueError, match="calibration"):
        GPTQ(GPTQConfig()).quantize(tiny_llama, layout_for(tiny_llama), QuantSpec(4, 32), None, torch.device("cpu"))


def test_method_layer_matches_core_on_block0(calib_tokens):
    """Block 0's first sequential group sees the unquantized model: its artifacts equal the core run on hooked inputs."""
    model = tiny_model("llama")
    name = "model.layers.0.self_attn.q_proj"
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    W = model.get_submodule(name).weight.data.clone()
    with torch.no_grad():
        for row in calib_tokens:
            model(row[None])
    handle.remove()
    expected, _ = gptq_quantize_layer(W, hessian_of(torch.cat(seen)), QuantSpec(3, 16))
    artifacts = GPTQ(GPTQConfig()).quantize(model, layout_for(model), QuantSpec(3, 16), calib_tokens,
                                            torch.device("cpu")).artifacts
    torch.testing.assert_close(artifacts[name].dequantize(), expected.dequantize(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "opt"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_output_cache_gives_identical_artifacts(family, batch_size, calib_tokens):
    """Reusing already-quantized linears' outputs is a speed-up only: every code, scale and zero is bit-identical
    to recomputing them, for every architecture family the tests know (each has its own block data flow)."""
    results = {}
    for gb in (0.0, 1.0):
        model = tiny_model(family)
        results[gb] = GPTQ(GPTQConfig(output_cache_gb=gb, batch_size=batch_size)).quantize(
            model, layout_for(model), QuantSpec(4, 16), calib_tokens, torch.device("cpu")).artifacts
    assert results[0.0].keys() == results[1.0].keys()
    for name, art in results[0.0].items():
        other = results[1.0][name]
        assert torch.equal(art.codes, other.codes) and torch.equal(art.scales, other.scales), name
        assert torch.equal(art.zeros, other.zeros), name


def test_output_cache_serves_and_recomputes_a_changed_input(calib_tokens):
    """The cache serves final modules' outputs on later forwards (a container once all its linears are final), and
    computes afresh when an input changed or an output was modified in place."""
    from structure.blockwise import BlockContext, OutputCache

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)), torch.nn.ReLU(),
                                torch.nn.Linear(8, 4))
    x = torch.randn(4, 3, 8)
    ctx = BlockContext(0, block, "b", x, {}, batch_size=2)
    ctx.output_cache = cache = OutputCache(block, budget_bytes=1 << 20)
    first = ctx.forward()
    cache.finalize(["0.0"])  # the container "0" still holds a linear that may change
    assert torch.equal(ctx.forward(), first) and cache.served == 0  # recorded, not yet served
    assert torch.equal(ctx.forward(), first) and cache.served == 2  # "0.0", once per batch
    cache.finalize(["0.1"])  # now "0" is final as a whole
    assert torch.equal(ctx.forward(), first) and cache.served == 4  # "0.0" inside "0" while "0" records
    assert torch.equal(ctx.forward(), first) and cache.served == 6  # "0" itself, once per batch
    ctx.inputs = x + 1  # another input: the recorded outputs are stale
    assert torch.equal(ctx.forward(), block(x + 1)) and cache.served == 6
    ctx.inputs = x
    ctx.forward()
    served = cache.served
    computed = cache.computed
    cache._entries[("0", 0)][0].add_(1)  # an output changed in place after it was recorded (also "0.1"'s: one tensor)
    assert torch.equal(ctx.forward(), block(x))
    # batch 0: "0" and "0.1" computed afresh, "0.0" served; batch 2: "0" served
    assert (cache.served, cache.computed) == (served + 2, computed + 2)
    tiny = OutputCache(block, budget_bytes=0)  # no budget: nothing is held, everything computed
    ctx.output_cache = tiny
    tiny.finalize(["0.0", "0.1"])
    ctx.forward(), ctx.forward()
    assert tiny.served == 0 and tiny.used == 0


def test_output_cache_budget_is_not_part_of_the_run_key():
    from harness.identity import method_key

    assert "output_cache_gb" not in method_key(GPTQConfig(output_cache_gb=0.5))
    assert method_key(GPTQConfig(output_cache_gb=0.5)) == method_key(GPTQConfig())
    assert method_key(GPTQConfig(desc_act=True)) != method_key(GPTQConfig())
    with pytest.raises(ValueError, match="output_cache_gb"):
        GPTQConfig(output_cache_gb=-1)
