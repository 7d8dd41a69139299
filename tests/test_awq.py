"""AWQ: scale folding is function-preserving on every family, the searches beat RTN, searches save and reload."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model
from structure.architectures import apply_artifacts, get_submodule, layout_for
from structure.blockwise import capture_block_inputs
from methods.awq import SEARCH_FILE, AWQConfig, AWQSearch, GroupScale, apply_scales
from methods.awq.search import _group_applies
from methods.awq.maths import awq_scale, clip_weight, search_clip, weight_mean
from core.spec import QuantSpec
from methods.base import build_method
from core.quant import fake_quantize, group_slices

FAMILIES = ["llama", "qwen2", "gemma3_text", "opt"]
CPU = torch.device("cpu")


def _calib(n=8, length=32, seed=0):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


def _awq(config=None, **kw):
    return build_method(config or AWQConfig(**kw))


# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("key,value", [("n_grid", 0), ("clip_grid", 0), ("clip_max_shrink", 1.0),
                                       ("clip_max_shrink", -0.1), ("clip_n_tokens", 0), ("batch_size", 0),
                                       ("load_search", " ")])
def test_config_rejects_bad_values(key, value):
    with pytest.raises(ValueError, match=key):
        AWQConfig(**{key: value})


# ------------------------------------------------------------------------------------------- pure maths


def test_weight_mean_respects_short_last_group():
    torch.manual_seed(0)
    w = torch.randn(5, 40)
    got = weight_mean(w, 16)
    parts = []
    for sl in group_slices(40, 16):  # groups 0:16, 16:32 and the short 32:40
        g = w[:, sl].abs()
        parts.append(g / (g.amax(dim=1, keepdim=True) + 1e-6))
    torch.testing.assert_close(got, torch.cat(parts, dim=1).mean(0))
    # a short last group normalised by a full-width max would differ (the extra columns hold the larger max)
    wider = torch.cat([w, 10 + w[:, :24].abs()], 1)
    assert not torch.allclose(got, weight_mean(wider, 16)[:40])


def test_awq_scale_formulas():
    x_mean, w_mean = torch.rand(32) + 0.1, torch.rand(32) + 0.1
    s = awq_scale(x_mean, None, 0.5)  # llm-awq: x_mean^a, normalised so max*min = 1
    ref = x_mean.sqrt() / (x_mean.sqrt().max() * x_mean.sqrt().min()).sqrt()
    torch.testing.assert_close(s, ref)
    torch.testing.assert_close(awq_scale(x_mean, None, 0.0), torch.ones(32))
    duo = x_mean.pow(0.3) / (w_mean.pow(0.7) + 1e-4)
    torch.testing.assert_close(awq_scale(x_mean, w_mean, 0.3), duo / (duo.max() * duo.min()).sqrt())


def _clip_reference(w, x, spec, n_grid=20, max_shrink=0.5):
    """The references' direct formula: materialise (x_g . w_g) per group and compare outputs."""
    best = []
    for sl in group_slices(w.shape[1], spec.group_size):
        wg, xg = w[:, sl], x[:, sl]
        amax = wg.abs().amax(dim=1)
        org = xg @ wg.T
        errs = []
        for i in range(int(max_shrink * n_grid)):
            mv = amax * (1 - i / n_grid)
            q = fake_quantize(torch.clamp(wg, -mv[:, None], mv[:, None]), QuantSpec(spec.bits, None, spec.symmetric))
            errs.append(((xg @ q.T - org) ** 2).mean(0))
        idx = torch.stack(errs).argmin(0)
        best.append(amax * (1 - idx.float() / n_grid))
    return torch.stack(best, dim=1)


@pytest.mark.parametrize("group_size", [16, 12, None])  # 12 leaves a short last group of 4 in 40 columns
def test_search_clip_matches_direct_formula(group_size):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 40, generator=g)
    w[:, 3] *= 6  # outliers make clipping worth it
    x = torch.randn(300, 40, generator=g)
    spec = QuantSpec(3, group_size)
    got = search_clip(w, x, spec, oc_batch=7)  # odd batch exercises the row batching
    torch.testing.assert_close(got, _clip_reference(w, x, spec), rtol=1e-6, atol=1e-6)
    assert (got < w.abs().amax(1, keepdim=True)).any()  # some group was actually clipped
    clipped = clip_weight(w, got, group_size)
    assert torch.all(clipped.abs() <= got[:, torch.arange(40) // (group_size or 40)] + 1e-7)


# ------------------------------------------------------------------------------------------ folding


def _random_scales(block, layout, gen):
    return [GroupScale(g.prev, g.layers, torch.exp(0.5 * torch.randn(get_submodule(block, g.layers[0]).in_features,
                                                                    generator=gen)))
            for g in layout.spec.scale_groups if _group_applies(block, g)]


@pytest.mark.parametrize("family,overrides", [(f, {}) for f in FAMILIES] + [("llama", {"num_key_value_heads": 4})])
def test_random_scales_fold_preserves_logits(family, overrides):
    model = tiny_model(family, **overrides)
    layout = layout_for(model)
    ids = _calib(2, 16)
    ref = _logits(model, ids)
    gen = torch.Generator().manual_seed(0)
    unfolded = copy.deepcopy(model)
    n_groups = 0
    for i, block in enumerate(layout.blocks(model)):
        scales = _random_scales(block, layout, gen)
        n_groups += len(scales)
        apply_scales(block, scales, layout.spec.norm_weight_offset)
        for g in scales:  # control: scaling the layers without folding must change the output
            for name in g.layers:
                get_submodule(layout.blocks(unfolded)[i], name).weight.data *= g.s[None, :]
    if overrides.get("num_key_value_heads") == 4 or family == "opt":
        assert n_groups == 8  # full attention: the v -> o group is folded too
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-4)
    assert (_logits(unfolded, ids) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_searched_scales_preserve_logits(family):
    model = tiny_model(family)
    ids = _calib()
    ref = _logits(model, ids)
    method = _awq(auto_clip=False)
    result = method.quantize(model, layout_for(model), QuantSpec(4, 32), ids, CPU)
    assert len(result.artifacts) == len(layout_for(model).quantizable_linears(model))
    search = AWQSearch.from_state(result.extras[SEARCH_FILE])
    scales = [g.s for b in search.blocks.values() for g in b.scales]
    assert any((s - 1).abs().max() > 0.05 for s in scales)  # the searched scales are not the identity
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ quality vs RTN


def _outlier_model(family="llama"):
    """Tiny model whose norms amplify a few channels, the activation outliers AWQ is built for."""
    model = tiny_model(family)
    layout = layout_for(model)
    gen = torch.Generator().manual_seed(3)
    for block in layout.blocks(model):
        for g in layout.spec.scale_groups:
            prev = get_submodule(block, g.prev)
            if prev.weight.ndim == 1:
                idx = torch.randperm(prev.weight.numel(), generator=gen)[:4]
                prev.weight.data[idx] *= 8.0
    return model, layout


@torch.no_grad()
def _block_errors(model, layout, artifacts, inputs, kwargs):
    """Per block: MSE of the fake-quantized block's output against the fp block, both on the same fp inputs."""
    errors = []
    quantized = copy.deepcopy(model)
    apply_artifacts(quantized, artifacts)
    for i, (fp_block, q_block) in enumerate(zip(layout.blocks(model), layout.blocks(quantized))):
        fp_out = fp_block(inputs, **kwargs[i])
        fp_out = fp_out[0] if isinstance(fp_out, tuple) else fp_out
        q_out = q_block(inputs, **kwargs[i])
        q_out = q_out[0] if isinstance(q_out, tuple) else q_out
        errors.append(((q_out - fp_out) ** 2).mean().item())
        inputs = fp_out
    return errors


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_block_error_not_worse_than_rtn(bits):
    from methods.rtn import RTN, RTNConfig

    model, layout = _outlier_model()
    ids = _calib()
    spec = QuantSpec(bits, 32)
    inputs, kwargs = capture_block_inputs(model, layout, ids, CPU)
    rtn_err = _block_errors(model, layout, RTN(RTNConfig()).quantize(model, layout, spec, ids, CPU).artifacts, inputs,
                            kwargs)
    awq_model = copy.deepcopy(model)
    awq_art = _awq().quantize(awq_model, layout, spec, ids, CPU).artifacts
    awq_err = _block_errors(awq_model, layout, awq_art, inputs, kwargs)  # AWQ only rewrites weights inside blocks
    for r, a in zip(rtn_err, awq_err):
        assert a <= r, f"AWQ block error {a:.3e} > RTN {r:.3e} at w{bits}g32"
    assert sum(awq_err) < 0.9 * sum(rtn_err)


# ------------------------------------------------------------------------------------ save / load


def _artifacts_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for key in ("codes", "scales", "zeros"):
            assert torch.equal(getattr(a[name], key), getattr(b[name], key)), f"{name}.{key} differs"


@pytest.mark.parametrize("family,group_size", [("llama", 48), ("gemma3_text", 32)])  # 48: short last groups
def test_search_save_load_round_trip(tmp_path, family, group_size):
    model = tiny_model(family)
    layout = layout_for(model)
    fresh = copy.deepcopy(model)
    spec = QuantSpec(3, group_size)
    result = _awq().quantize(model, layout, spec, _calib(), CPU)
    artifacts = result.artifacts
    path = tmp_path / SEARCH_FILE
    AWQSearch.from_state(result.extras[SEARCH_FILE]).save(path)
    some = next(iter(artifacts.values()))
    assert some.n_groups == spec.n_groups(some.in_features)
    loaded = _awq(load_search=str(path)).quantize(fresh, layout, spec, None, CPU)
    _artifacts_equal(artifacts, loaded.artifacts)
    assert loaded.modified.keys() == result.modified.keys() and result.modified  # the folded norms
    for key, tensor in result.modified.items():
        assert torch.equal(loaded.modified[key], tensor)
    ids = _calib(2, 16, seed=5)
    torch.testing.assert_close(_logits(fresh, ids), _logits(model, ids), rtol=0, atol=0)


def test_load_search_errors(tmp_path):
    model = tiny_model("llama")
    layout = layout_for(model)
    with pytest.raises(ValueError, match="load_search"):
        _awq(load_search=str(tmp_path / "missing.pt")).quantize(model, layout, QuantSpec(4, 32), None, CPU)
    result = _awq(auto_clip=False, n_grid=2).quantize(copy.deepcopy(model), layout, QuantSpec(4, 32), _calib(), CPU)
    path = str(tmp_path / SEARCH_FILE)
    AWQSearch.from_state(result.extras[SEARCH_FILE]).save(path)
    with pytest.raises(ValueError, match="bits"):
        _awq(load_search=path).quantize(copy.deepcopy(model), layout, QuantSpec(3, 32), None, CPU)
    wider = tiny_model("llama", hidden_size=96)
    with pytest.raises(ValueError, match="channels"):
        _awq(load_search=path).quantize(wider, layout_for(wider), QuantSpec(4, 32), None, CPU)
    deeper = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(ValueError, match="blocks"):
        _awq(load_search=path).quantize(deeper, layout_for(deeper), QuantSpec(4, 32), None, CPU)
    opt = tiny_model("opt")
    with pytest.raises(ValueError, match="load_search"):
        _awq(load_search=path).quantize(opt, layout_for(opt), QuantSpec(4, 32), None, CPU)
    torch.save({"format": "something else"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not an AWQ search"):
        AWQSearch.load(tmp_path / "bad.pt")


# ------------------------------------------------------------------------------------------ awq_gptq


@pytest.mark.parametrize("half,key,value", [("gptq", "range_rule", "nearest"), ("gptq", "damp_percent", 0.0),
                                             ("awq", "n_grid", 0)])
def test_awq_gptq_config_rejects_bad_values(half, key, value):
    from methods.awq import AWQConfig
    from methods.gptq import GPTQConfig

    with pytest.raises(ValueError, match=key):
        {"awq": AWQConfig, "gptq": GPTQConfig}[half](**{key: value})


def test_awq_gptq_config_composes_from_the_cli():
    from test_config import make_config

    cfg = make_config("method=awq_gptq", "method.awq.n_grid=10", "method.gptq.desc_act=true")
    assert (cfg.method.awq.n_grid, cfg.method.gptq.desc_act, cfg.method.gptq.range_rule) == (10, True, "minmax")


@torch.no_grad()
def test_awq_gptq_beats_rtn_and_reloads(tmp_path):
    from methods.awq import AWQConfig, AWQGPTQConfig
    from methods.rtn import RTN, RTNConfig

    model, layout = _outlier_model()
    ids, held_out = _calib(), _calib(4, 32, seed=9)
    ref = _logits(model, held_out)
    spec = QuantSpec(3, 32)

    def logit_mse(artifacts, m):
        q = copy.deepcopy(m)
        apply_artifacts(q, artifacts)
        return ((_logits(q, held_out) - ref) ** 2).mean().item()

    rtn_err = logit_mse(RTN(RTNConfig()).quantize(model, layout, spec, ids, CPU).artifacts, model)
    combo = copy.deepcopy(model)
    result = build_method(AWQGPTQConfig(awq=AWQConfig(batch_size=4))).quantize(combo, layout, spec, ids, CPU)
    artifacts = result.artifacts
    AWQSearch.from_state(result.extras[SEARCH_FILE]).save(tmp_path / SEARCH_FILE)
    assert result.stats and all("damp_retries" in s for s in result.stats.values())  # the GPTQ half's statistics
    assert artifacts.keys() == layout.quantizable_linears(model).keys()
    err = logit_mse(artifacts, combo)
    assert err < rtn_err, f"awq_gptq logit MSE {err:.3e} >= RTN {rtn_err:.3e}"
    # the saved AWQ half re-applies: same artifacts without searching
    again = copy.deepcopy(model)
    reloaded = build_method(AWQGPTQConfig(awq=AWQConfig(batch_size=4, load_search=str(tmp_path / SEARCH_FILE))))
    _artifacts_equal(artifacts, reloaded.quantize(again, layout, spec, ids, CPU).artifacts)
