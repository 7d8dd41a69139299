"""Export: GPTQ / AWQ-GEMM / compressed-tensors checkpoints of tiny models round-trip to the same artifacts and
logits (read back by checkpoints/, the readers of every checkpoint)."""
from __future__ import annotations

import json

import pytest
import torch

from structure.architectures import apply_artifacts, layout_for
import checkpoints  # noqa: F401  (registers the readers)
from checkpoints.base import load_checkpoint_model
from kernels.export import save_quantized
from core.spec import QuantSpec
from methods.gptq import GPTQ, GPTQConfig
from core.quant import quantize_weight
from conftest import tiny_model


def load_quantized(path):
    """(the checkpoint's own config, its artifacts), as checkpoints/ reads it."""
    model, artifacts = load_checkpoint_model(path)
    return model.config, artifacts


def rtn_artifacts(model, spec):
    return {name: quantize_weight(lin.weight.data, spec, "minmax_zero")
            for name, lin in layout_for(model).quantizable_linears(model).items()}


def assert_same_artifacts(loaded, original, atol):
    assert set(loaded) == set(original)
    for name, art in original.items():
        got = loaded[name]
        assert torch.equal(got.codes, art.codes) and torch.equal(got.zeros, art.zeros), name
        assert (got.bits, got.group_size, got.symmetric) == (art.bits, art.group_size, art.symmetric)
        torch.testing.assert_close(got.dequantize(), art.dequantize(), rtol=0, atol=atol)


@pytest.mark.parametrize("family,spec", [("llama", QuantSpec(4, 32)), ("opt", QuantSpec(3, 48)), ("llama", QuantSpec(4, None, True))])
def test_gptq_round_trip_exact_with_fp32_scales(tmp_path, family, spec):
    model = tiny_model(family)
    arts = rtn_artifacts(model, spec)
    out = save_quantized(model, arts, tmp_path / "ckpt", "gptq", spec, scale_dtype=torch.float32)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == spec.bits and qc["sym"] == spec.symmetric
    assert qc["group_size"] == (-1 if spec.group_size is None else spec.group_size) and qc["checkpoint_format"] == "gptq"
    config, loaded = load_quantized(out)
    assert not hasattr(config, "quantization_config") and config.model_type == family
    assert_same_artifacts(loaded, arts, atol=0)

    apply_artifacts(model, arts)
    rebuilt, _ = load_checkpoint_model(out)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_gptq_act_order_checkpoint(tmp_path, calib_tokens):
    model = tiny_model("llama")
    spec = QuantSpec(4, 32)
    arts = GPTQ(GPTQConfig(desc_act=True)).quantize(model, layout_for(model), spec, calib_tokens,
                                                   torch.device("cpu")).artifacts
    out = save_quantized(model, arts, tmp_path / "ckpt", "gptq", spec, extra_config={"damp_percent": 0.01})
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is True and qc["damp_percent"] == 0.01
    _, loaded = load_quantized(out)
    assert all(loaded[n].g_idx is not None for n in arts)
    # fp16 scales on disk: codes exact, weights within half an fp16 ulp of the scale
    assert_same_artifacts(loaded, arts, atol=1e-3)


def test_awq_gemm_round_trip(tmp_path):
    model = tiny_model("qwen2")
    spec = QuantSpec(4, 32)
    arts = {n: quantize_weight(lin.weight.data, spec, "minmax") for n, lin in layout_for(model).quantizable_linears(model).items()}
    for art in arts.values():  # AWQ GEMM scales are fp16 on disk: make them representable so the check is exact
        art.scales = art.scales.half().float()
    out = save_quantized(model, arts, tmp_path / "awq", "awq_gemm", spec)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "q_group_size": 32, "zero_point": True}
    _, loaded = load_quantized(out)
    assert_same_artifacts(loaded, arts, atol=0)


def test_overwrite_is_atomic_and_explicit(tmp_path):
    model = tiny_model("llama")
    spec = QuantSpec(4, 32)
    arts = rtn_artifacts(model, spec)
    out = save_quantized(model, arts, tmp_path / "ckpt", "gptq", spec)
    with pytest.raises(FileExistsError):
        save_quantized(model, arts, out, "gptq", spec)
    bad = dict(arts)
    bad["model.layers.0.mlp.down_proj"] = arts["model.layers.0.mlp.up_proj"]  # wrong shape for that module
    with pytest.raises(ValueError, match="down_proj"):
        save_quantized(model, bad, out, "gptq", spec, overwrite=True)
    save_quantized(model, arts, out, "gptq", spec, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directories left behind
    _, loaded = load_quantized(out)
    assert set(loaded) == set(arts)


@pytest.mark.parametrize("fmt,spec,match", [("marlin", QuantSpec(4, 32), "fmt"), ("awq_gemm", QuantSpec(3, 32), "bits"),
                                            ("awq_gemm", QuantSpec(4, 32, True), "symmetric"),
                                            ("gptq", QuantSpec(3, 32), "one checkpoint holds one spec")])
def test_bad_export_requests(tmp_path, fmt, spec, match):
    model = tiny_model("llama")
    arts = rtn_artifacts(model, QuantSpec(4, 32))
    if fmt == "awq_gemm" and spec.bits == 3:
        arts = rtn_artifacts(model, spec)
    with pytest.raises(ValueError, match=match):
        save_quantized(model, arts, tmp_path / "x", fmt, spec)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(4, 32, True), QuantSpec(3, None), QuantSpec(8, 32)])
def test_compressed_tensors_round_trip_exact_with_fp32_scales(tmp_path, spec):
    model = tiny_model("llama")
    arts = rtn_artifacts(model, spec)
    out = save_quantized(model, arts, tmp_path / "ct", "compressed-tensors", spec, scale_dtype=torch.float32)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (qc["quant_method"], qc["format"], weights["num_bits"], weights["symmetric"]) == \
        ("compressed-tensors", "pack-quantized", spec.bits, spec.symmetric)
    _, loaded = load_quantized(out)
    assert_same_artifacts(loaded, arts, atol=0)


def test_finding13_a_checkpoint_of_our_calibrated_export_carries_its_calibration_draw(tiny_model_dir, text_file,
                                                                                      tmp_path, capsys):
    """A method=checkpoint run of our own export of a GPTQ run records the draw that run calibrated on, so compare
    marks its cells '† conditional on one calibration draw' as it marks the run's own; an RTN export has no draw."""
    from analysis.compare import main as compare_main
    from harness.run import execute
    from test_config import make_config
    from test_run import tiny_run_overrides

    def run(*extra):
        return execute(make_config(*tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "group_size=32",
                                                       "eval.max_windows=8", "eval.ci_block=8", *extra)))

    gptq = run("method=gptq", "export=gptq", "calib.n_samples=4", "calib.seqlen=32", "calib.seed=3")
    rtn = run("method=rtn", "bits=3", "export=gptq")
    results = tmp_path / "results"
    ckpt = run("method=checkpoint", f"method.path={results / gptq.run_id.iloc[0] / 'checkpoint-gptq'}",
               "method.label=ours")
    keys = ["calib_source", "calib_samples", "calib_seqlen", "calib_seed"]
    assert ckpt[keys].iloc[0].tolist() == gptq[keys].iloc[0].tolist() == ["textfile", 4, 32, 3]
    from harness.export_stage import PROVENANCE_FILE

    made = json.loads((results / gptq.run_id.iloc[0] / "checkpoint-gptq" / PROVENANCE_FILE).read_text())
    assert made["run_id"] == gptq.run_id.iloc[0] and made["calibration"]["calib_seed"] == 3
    rtn_ckpt = run("method=checkpoint", f"method.path={results / rtn.run_id.iloc[0] / 'checkpoint-gptq'}",
                   "method.label=rtn-export")
    assert rtn_ckpt["calib_seed"].isna().all()
    assert compare_main([str(results / ckpt.run_id.iloc[0]), str(results / rtn.run_id.iloc[0])]) == 0
    out = capsys.readouterr().out
    assert "]†" in out and "† conditional on one calibration draw" in out
    assert compare_main([str(results / rtn_ckpt.run_id.iloc[0]), str(results / rtn.run_id.iloc[0])]) == 0
    assert "†" not in capsys.readouterr().out
