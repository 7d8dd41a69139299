"""Mixture-of-experts checkpoints (issue 31, item 4): other tools' per-expert GPTQ / compressed-tensors checkpoints
and GGUF's stacked experts read into per-expert artifacts under our matrix names, a checkpoint of another mixture
refused before evaluation, the plausibility check per expert (AWQ's fold into the router included), and our export
written in the layout GPTQModel and vLLM load, read back to the run's numbers exactly."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import checkpoints  # noqa: F401  (registers the readers)
from checkpoints.base import CheckpointError, check_belongs, load_checkpoint_model, reader_for
from checkpoints.plausibility import relative_errors
from checkpoints.stored import export_names, stored_names
from core.quant import quantize_weight
from core.spec import QuantSpec
from harness.config import ConfigError
from harness.run import execute
from kernels.export import as_stored, save_quantized
from structure.architectures import apply_artifacts, layout_for
from tests.conftest import MOE_FAMILIES, gguf_writer, save_with_tokenizer, tiny_moe_model, tiny_tokenizer
from tests.test_config import make_config
from tests.test_run import tiny_run_overrides

SPEC = QuantSpec(4, 16)
PER_EXPERT = [f for f in MOE_FAMILIES if f != "gpt_oss"]  # gpt-oss checkpoints store its experts fused


def rtn_artifacts(model, spec=SPEC, fmt="gptq"):
    return {n: as_stored(quantize_weight(m.weight, spec), fmt)
            for n, m in layout_for(model).quantizable_linears(model).items()}


def export(model, arts, out, fmt="gptq", spec=SPEC):
    return save_quantized(model, arts, out, fmt, spec, tiny_tokenizer(), **export_names(model, arts))


def stored_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sorted(f.keys())


# --- export: per-expert tensors under the names other tools load, read back exactly -------------------------------

@pytest.mark.parametrize("family", PER_EXPERT)
@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "awq_gemm"])
def test_an_moe_export_stores_every_expert_under_its_checkpoint_name_and_reads_back_exactly(tmp_path, family, fmt):
    model = tiny_moe_model(family)
    layout = layout_for(model)
    arts = rtn_artifacts(model, fmt=fmt)
    out = export(model, arts, tmp_path / "ckpt", fmt)
    keys = stored_keys(out)
    experts = layout.parts(layout.blocks(model)[-1]).moe.experts
    first = {"gptq": "qweight", "compressed-tensors": "weight_packed", "awq_gemm": "qweight"}[fmt]
    for e in range(4):  # the table's stored names, one expert at a time: e.g. block_sparse_moe.experts.3.w1
        for stored in experts.stored:
            assert f"model.layers.1.{stored.format(e=e)}.{first}" in keys
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in keys)  # no fused parameter
    router = f"model.layers.1.{dict(experts.renamed).get('mlp.', 'mlp.')}{experts.router.removeprefix('mlp.')}.weight"
    assert router in keys
    reader = reader_for(out)
    header = reader.header(out, model)
    assert set(header.linears) == set(layout.quantizable_linears(model))  # every expert matrix, under our names
    check_belongs(header, model, layout, tiny_tokenizer())
    rebuilt, read = load_checkpoint_model(out)
    for name, art in arts.items():
        assert torch.equal(read[name].codes, art.codes) and torch.equal(read[name].scales, art.scales), name
    apply_artifacts(model, arts)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, model(ids).logits)


def test_mixtral_export_names_follow_the_table_never_the_model():
    """Mixtral's model says mlp.experts (fused) and mlp.gate; its checkpoints say block_sparse_moe.experts.N.w1/w3/w2
    and block_sparse_moe.gate, as on the Hub and in what GPTQModel and vLLM load."""
    model = tiny_moe_model("mixtral")
    names = stored_names(model)
    assert names.stored_matrix("model.layers.0.mlp.experts.2.gate_proj") == "model.layers.0.block_sparse_moe.experts.2.w1"
    assert names.stored_matrix("model.layers.0.mlp.experts.2.up_proj") == "model.layers.0.block_sparse_moe.experts.2.w3"
    assert names.stored_matrix("model.layers.0.mlp.experts.2.down_proj") == \
        "model.layers.0.block_sparse_moe.experts.2.w2"
    assert names.stored_tensor("model.layers.0.mlp.gate.weight") == "model.layers.0.block_sparse_moe.gate.weight"
    assert names.matrix("model.layers.1.block_sparse_moe.experts.3.w3") == "model.layers.1.mlp.experts.3.up_proj"
    assert names.matrix("model.layers.1.mlp.experts.3.up_proj") == "model.layers.1.mlp.experts.3.up_proj"
    assert names.stored_tensor("model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"


def test_gpt_oss_export_is_refused_in_one_line(tmp_path):
    model = tiny_moe_model("gpt_oss")
    with pytest.raises(ValueError, match="gpt_oss checkpoints store the experts fused .*set export=null"):
        export_names(model, rtn_artifacts(model))


# --- refusals: a checkpoint of another mixture -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixtral_ckpt(tmp_path_factory):
    model = tiny_moe_model("mixtral")
    return export(model, rtn_artifacts(model), tmp_path_factory.mktemp("moe") / "mixtral-gptq")


@pytest.mark.parametrize("overrides,match", [
    # more experts in the base model: its experts 4..7 have no weight in the checkpoint (the router differs first)
    ({"num_local_experts": 8}, r"gate\.weight is \(4, 64\), the base model's is \(8, 64\)"),
    # fewer: the checkpoint's expert 2 has no counterpart (named as the checkpoint names it)
    ({"num_local_experts": 2}, r"the checkpoint's model\.layers\.0\.block_sparse_moe\.experts\.2\.w1 is \(96, 64\), "
                               r"the base model's is missing"),
    ({"intermediate_size": 64}, r"the checkpoint's model\.layers\.0\.mlp\.experts\.0\.(gate|up)_proj is \(96, 64\), "
                                r"the base model's is \(64, 64\)"),
])
def test_a_checkpoint_of_another_mixture_is_refused_before_evaluation(mixtral_ckpt, overrides, match):
    other = tiny_moe_model("mixtral", **overrides)
    with pytest.raises(CheckpointError, match=match):
        check_belongs(reader_for(mixtral_ckpt).header(mixtral_ckpt, other), other, layout_for(other))


def test_a_checkpoint_of_another_moe_family_is_refused(mixtral_ckpt):
    other = tiny_moe_model("qwen3_moe", moe_intermediate_size=96)
    with pytest.raises(CheckpointError, match="'mixtral' model, the base model a 'qwen3_moe'"):
        check_belongs(reader_for(mixtral_ckpt).header(mixtral_ckpt, other), other, layout_for(other))


def test_a_missing_expert_is_refused(tmp_path, mixtral_ckpt):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "missing"
    shutil.copytree(mixtral_ckpt, path)
    tensors = {k: v for k, v in load_file(str(path / "model.safetensors")).items()
               if ".block_sparse_moe.experts.3.w2." not in k or "layers.1." not in k}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    model = tiny_moe_model("mixtral")
    with pytest.raises(CheckpointError, match=r"no weight for 1 of the base model's linears \(e\.g\. "
                                              r"model\.layers\.1\.mlp\.experts\.3\.down_proj\)"):
        check_belongs(reader_for(path).header(path, model), model, layout_for(model))


# --- whole runs: the exported MoE checkpoint reads back to the run's numbers exactly --------------------------------

@pytest.fixture
def tiny_moe_dir(tmp_path):
    return save_with_tokenizer(tiny_moe_model("mixtral"), tmp_path / "tiny-mixtral")


def ppl_and_kld(frame):
    ppl = frame[frame.suite == "ppl"].set_index("metric")["value"]
    return ppl["ppl"], ppl["kld"]


@pytest.mark.parametrize("method,fmt", [("gptq", "gptq"), ("awq", "awq_gemm"), ("rtn", "compressed-tensors")])
def test_an_exported_moe_run_evaluated_as_a_checkpoint_gives_the_same_numbers(tiny_moe_dir, text_file, tmp_path,
                                                                             method, fmt):
    cfg = make_config(*tiny_run_overrides(tiny_moe_dir, text_file, tmp_path, f"method={method}", "group_size=32",
                                          f"export={fmt}", "calib.n_samples=4", "calib.seqlen=32"))
    run = execute(cfg)
    exported = tmp_path / "results" / run["run_id"].iloc[0] / f"checkpoint-{fmt}"
    keys = stored_keys(exported)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.qweight" in keys or \
        "model.layers.1.block_sparse_moe.experts.3.w2.weight_packed" in keys
    for streaming in ("false", "true"):  # judged holding the model, and streamed block by block
        again = execute(make_config(*tiny_run_overrides(tiny_moe_dir, text_file, tmp_path, "method=checkpoint",
                                                        f"method.path={exported}", f"method.label=exported-{streaming}",
                                                        f"model.streaming={streaming}")))
        assert ppl_and_kld(again) == ppl_and_kld(run), streaming
        quant = again[again.suite == "quant"].set_index("metric")["value"]
        assert quant["quantized_layers"] == 8 + 2 * 4 * 3  # attention, and every expert's gate, up and down


def test_an_moe_export_of_gpt_oss_is_refused_in_the_preflight(tmp_path, text_file):
    path = save_with_tokenizer(tiny_moe_model("gpt_oss"), tmp_path / "tiny-gpt-oss")
    with pytest.raises(ConfigError, match="export=gptq: gpt_oss checkpoints store the experts fused"):
        execute(make_config(*tiny_run_overrides(path, text_file, tmp_path, "method=rtn", "group_size=16",
                                                "export=gptq")))


# --- the plausibility check, per expert -------------------------------------------------------------------------------

def fold_awq_scales(model, scale_router: bool, seed: int = 0):
    """What AWQ folds into a model's blocks, with scales from 0.1 to 10; in an MoE block the post-attention norm divided by
    s and every
    expert's (and the shared expert's) gate/up columns multiplied by s, the router's too unless scale_router=False
    (AutoAWQ's Mixtral); each expert's up rows divided by t and its down columns multiplied by t."""
    import copy

    from structure.experts import linearized

    folded = copy.deepcopy(model)
    layout = layout_for(folded)
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.exp(torch.empty(n).uniform_(-2.3, 2.3, generator=g))  # noqa: E731
    with torch.no_grad():
        for block in layout.blocks(folded):
            parts = layout.parts(block)
            if parts.moe is None:
                continue
            with linearized(block, parts.moe.experts):
                for group in layout.scale_groups(block):
                    layers = [block.get_submodule(n) for n in group.layers]
                    prev = block.get_submodule(group.prev)
                    if prev.weight.shape[0] != layers[0].weight.shape[1]:
                        continue  # grouped-query attention: v_proj does not feed o_proj channel for channel
                    s = rand(layers[0].weight.shape[1])
                    prev.weight.div_(s if prev.weight.dim() == 1 else s[:, None])
                    for layer in layers:
                        layer.weight.mul_(s)
                    if scale_router:
                        for name in group.also_scaled:
                            block.get_submodule(name).weight.mul_(s)
    return folded


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("scale_router", [True, False])
def test_awq_scales_folded_into_an_moe_block_are_not_error(family, scale_router):
    """AWQ's folds leave an MoE block's function alone (up to the router, which AutoAWQ's Mixtral leaves unscaled):
    every expert matrix, the shared expert and the router stay at float rounding, while the plain ||W_hat - W|| / ||W||
    of the rescaled matrices is far above 1."""
    from core.spec import DequantizedWeights

    model = tiny_moe_model(family)
    layout = layout_for(model)
    folded = fold_awq_scales(model, scale_router)
    exact = {n: DequantizedWeights(m.weight.detach().clone(), "folded", 32, 32, None)
             for n, m in layout.quantizable_linears(folded).items()}
    others = {k: v for k, v in folded.state_dict().items() if "norm" in k or k.endswith(("mlp.gate.weight",
                                                                                         "shared_expert_gate.weight"))}
    read = lambda name: model.get_parameter(name).detach()  # noqa: E731
    errors = relative_errors(exact, others, layout, model, read)
    experts = [n for n in errors if ".experts." in n]
    assert len(experts) == 4 * 3 * sum(layout.parts(b).moe is not None for b in layout.blocks(model))
    assert max(errors.values()) < 1e-5, max(errors.items(), key=lambda kv: kv[1])
    plain = {n: float((a.dequantize() - layout.matrix(model, n).weight).norm() / layout.matrix(model, n).weight.norm())
             for n, a in exact.items() if ".experts." in n}
    assert max(plain.values()) > 1.0


def test_one_damaged_expert_is_named_with_its_error(mixtral_ckpt, tmp_path):
    """One expert's scales times 2^16 in a GPTQ checkpoint (the damage a flipped exponent bit does) stands out under
    our name of that expert's matrix (the checkpoint calls it block_sparse_moe.experts.2.w3)."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "damaged"
    shutil.copytree(mixtral_ckpt, path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.1.block_sparse_moe.experts.2.w3.scales"] *= 65536
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    model = tiny_moe_model("mixtral")
    contents = reader_for(path).read(path, model)
    errors = relative_errors(contents.artifacts, contents.tensors, layout_for(model), model,
                             lambda name: model.get_parameter(name).detach())
    ranked = sorted(errors, key=errors.get, reverse=True)
    # up_proj feeds down_proj channel for channel: the pair's figure goes to both
    assert set(ranked[:2]) == {"model.layers.1.mlp.experts.2.up_proj", "model.layers.1.mlp.experts.2.down_proj"}
    assert errors[ranked[0]] > 100 and errors[ranked[2]] < 0.5


# --- GGUF: stacked experts ---------------------------------------------------------------------------------------------

GOLDEN = Path(__file__).parent / "golden" / "checkpoints"
MOE_BASES = {"mixtral": GOLDEN / "tiny-mixtral", "qwen2_moe": GOLDEN / "tiny-qwen2moe"}


@pytest.fixture(scope="module")
def moe_ggufs(tmp_path_factory):
    """{(family, fused gate_up): a Q8_0 GGUF of the tiny golden base}, experts stacked as llama.cpp stores them."""
    out = tmp_path_factory.mktemp("gguf")
    writer = gguf_writer()
    files = {}
    for family, base in MOE_BASES.items():
        for fused in (False, True):
            path = out / f"{family}{'-fused' if fused else ''}-Q8_0.gguf"
            writer.from_hf(base, path, "Q8_0", fused_gate_up=fused)
            files[family, fused] = path
    return files


def load_base(family):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MOE_BASES[family], dtype=torch.float32).eval()


@pytest.mark.parametrize("family", sorted(MOE_BASES))
@pytest.mark.parametrize("fused", [False, True], ids=["gate,up", "gate_up"])
def test_a_gguf_with_stacked_experts_reads_back_to_its_source_within_q8_0_error(moe_ggufs, family, fused):
    """Each expert's matrix read from blk.N.ffn_{gate,up,down}_exps (or ffn_gate_up_exps) is exactly what the gguf
    package's own Q8_0 dequantization gives for that expert's rows, and within one Q8_0 step (the block's
    max |w| / 127) of the fp source; every expert matrix of the model is read, as a QuantizedWeights with Q8_0's codes
    and scales."""
    import gguf

    from core.spec import QuantizedWeights

    path, base = moe_ggufs[family, fused], load_base(family)
    layout = layout_for(base)
    reader = reader_for(path)
    check_belongs(reader.header(path, base), base, layout, tiny_tokenizer())
    contents = reader.read(path, base)
    matrices = layout.quantizable_linears(base)
    assert set(contents.artifacts) == set(matrices)
    experts = [n for n in matrices if ".experts." in n]
    assert len(experts) == 2 * 4 * 3
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name in experts:
        art, source = contents.artifacts[name], matrices[name].weight
        assert isinstance(art, QuantizedWeights) and (art.bits, art.group_size) == (8, 32)
        own = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(source.numpy(), q8), q8))
        assert torch.equal(art.dequantize(), own), name
        step = source.abs().reshape(source.shape[0], -1, 32).amax(-1, keepdim=True) / 127
        assert ((art.dequantize() - source).abs().reshape(step.shape[0], -1, 32) <= step).all(), name
    assert torch.equal(contents.tensors["model.layers.1.mlp.gate.weight"], base.model.layers[1].mlp.gate.weight)
    if family == "qwen2_moe":  # stored [H, 1] in the file: the model's [1, H]
        assert torch.equal(contents.tensors["model.layers.0.mlp.shared_expert_gate.weight"],
                           base.model.layers[0].mlp.shared_expert_gate.weight)


def test_our_gguf_experts_equal_transformers_gguf_loader(moe_ggufs):
    """transformers' GGUF loader fuses Qwen2-MoE's stacked gate and up into gate_up_proj: every expert's slice of it
    equals what we read for that expert's matrix."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, base = moe_ggufs["qwen2_moe", False], load_base("qwen2_moe")
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=base)["tensors"]
    contents = reader_for(path).read(path, base)
    layout = layout_for(base)
    for name, art in contents.artifacts.items():
        matrix = layout.matrix(base, name)
        if ".experts." in name:
            fused = theirs[f"{name.rsplit('.', 2)[0]}.{matrix.param_name}"]
            assert torch.equal(art.dequantize(), matrix.slice_of(fused)), name
        else:
            assert torch.equal(art.dequantize(), theirs[f"{name}.weight"]), name


def test_an_moe_gguf_of_another_expert_count_is_refused(moe_ggufs):
    other = tiny_moe_model("mixtral", intermediate_size=32, num_local_experts=8)
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_(gate|up|down)_exps\.weight has shape \[4, \d+, \d+\]; "
                                              r"block 0 of the base model has 8 experts"):
        reader_for(moe_ggufs["mixtral", False]).header(moe_ggufs["mixtral", False], other)


def test_a_q8_0_moe_gguf_run_is_close_to_its_base(moe_ggufs, text_file, tmp_path):
    """A whole run on the Q8_0 Mixtral GGUF against the base it was written from: every expert matrix counted, KLD
    small but not zero."""
    frame = execute(make_config(*tiny_run_overrides(MOE_BASES["mixtral"], text_file, tmp_path, "method=checkpoint",
                                                    f"method.path={moe_ggufs['mixtral', False]}")))
    quant = frame[frame.suite == "quant"].set_index("metric")["value"]
    assert quant["quantized_layers"] == 8 + 2 * 4 * 3
    assert quant["storage_bits_per_weight"] == (2 + 32) * 8 / 32
    kld = frame[(frame.suite == "ppl") & (frame.metric == "kld")]["value"].iloc[0]
    assert 0 < kld < 1e-3


# --- golden MoE checkpoints written by GPTQModel and llm-compressor ---------------------------------------------------

# golden directory -> (base family, reader, label, bits, group size, symmetric); each holds library_dequantized.safetensors
# (scripts/produce/check_layout.py --write-reference): every quantized matrix as the library itself dequantizes it,
# named as the library's own modules name it
MOE_GOLDENS = {
    "gptqmodel-mixtral-w4g16-v2": ("mixtral", "gptq", "gptq-v2", 4, 16, False),
    "gptqmodel-qwen2moe-w4g16-sym-actorder": ("qwen2_moe", "gptq", "gptq", 4, 16, True),
    "llmc-gptq-mixtral-w4g16": ("mixtral", "compressed_tensors", "compressed-tensors", 4, 16, True),
    "llmc-awq-qwen2moe-w4g16-asym": ("qwen2_moe", "compressed_tensors", "compressed-tensors", 4, 16, False),
}


@pytest.mark.parametrize("name", sorted(MOE_GOLDENS))
def test_moe_checkpoint_reader_equals_the_library_that_wrote_it(name):
    """Every expert matrix (and every other quantized linear) of a checkpoint GPTQModel 7.6 or llm-compressor 0.14 wrote
    from a tiny Mixtral / Qwen2-MoE reads exactly as the library dequantizes it, under our matrix names, whatever the
    library called it (GPTQModel: mlp.experts.N.gate_proj; llm-compressor on Mixtral: block_sparse_moe.experts.N.
    gate_proj); the routers (and Qwen2-MoE's shared-expert gate) are full-precision tensors under the model's names;
    every figure of the plausibility check is that of 4-bit quantization."""
    from safetensors.torch import load_file

    family, fmt, label, bits, group, sym = MOE_GOLDENS[name]
    path, base = GOLDEN / name, load_base(family)
    layout = layout_for(base)
    reader = reader_for(path)
    about = reader.describe(path)
    assert (reader.name, about.label, about.bits, about.group_size, about.symmetric) == (fmt, label, bits, group, sym)
    check_belongs(reader.header(path, base), base, layout, tiny_tokenizer())
    contents = reader.read(path, base)
    names = stored_names(base)
    reference = {names.matrix(k.removesuffix(".weight")): v
                 for k, v in load_file(str(path / "library_dequantized.safetensors")).items()}
    assert set(contents.artifacts) == set(reference) == set(layout.quantizable_linears(base))
    assert sum(".experts." in n for n in contents.artifacts) == 2 * 4 * 3
    for matrix, art in contents.artifacts.items():
        assert torch.equal(art.dequantize().to(reference[matrix].dtype), reference[matrix]), matrix
    routers = {n for n in contents.tensors if n.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))}
    assert len(routers) == (4 if family == "qwen2_moe" else 2)
    assert set(contents.tensors) <= set(base.state_dict())
    errors = relative_errors(contents.artifacts, contents.tensors, layout, base,
                             lambda n: base.get_parameter(n).detach())
    assert 0.05 < max(errors.values()) < 0.2


def test_llm_compressor_awq_leaves_qwen2_moe_shared_expert_unscaled():
    """What llm-compressor 0.14's AWQ (its default mappings) wrote for Qwen2-MoE's block 0: the post-attention norm
    divided by s (s from 0.91 to 1.10), the router's and every routed expert's gate/up columns multiplied by s, but not
    the shared expert's nor its gate: they see x / s in the checkpoint. The plausibility check takes the router either
    way (the smaller figure), so the checkpoint is judged, and its numbers show what that costs."""
    path, base = GOLDEN / "llmc-awq-qwen2moe-w4g16-asym", load_base("qwen2_moe")
    contents = reader_for(path).read(path, base)
    block = base.model.layers[0]
    s = block.post_attention_layernorm.weight.detach() / contents.tensors["model.layers.0.post_attention_layernorm.weight"]
    assert 0.9 < s.min() < 0.95 and 1.05 < s.max() < 1.1
    router = contents.tensors["model.layers.0.mlp.gate.weight"]
    torch.testing.assert_close(router, block.mlp.gate.weight.detach() * s, rtol=1e-5, atol=1e-6)
    assert torch.equal(contents.tensors["model.layers.0.mlp.shared_expert_gate.weight"],
                       block.mlp.shared_expert_gate.weight.detach())


@pytest.mark.parametrize("family,golden", [("mixtral", "llmc-gptq-mixtral-w4g16"),
                                           ("qwen2_moe", "llmc-awq-qwen2moe-w4g16-asym")])
def test_a_compressed_tensors_moe_export_ignores_the_routers_as_llm_compressor_does(tmp_path, family, golden):
    """compressed-tensors' `ignore` names the linears left in full precision: our export lists the routers (and
    Qwen2-MoE's shared-expert gate) by their stored module names, exactly as llm-compressor's checkpoint of the same
    base does."""
    base = load_base(family)
    out = export(base, rtn_artifacts(base, QuantSpec(4, 16), "compressed-tensors"), tmp_path / "ct",
                 "compressed-tensors", QuantSpec(4, 16))
    ours = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    theirs = json.loads((GOLDEN / golden / "config.json").read_text())["quantization_config"]["ignore"]
    assert ours == theirs


# --- experts stored unquantized, one by one (the "experts left in 16 bits" checkpoints of GPTQModel#1680) ----------

def unquantize_block_experts(src: Path, out: Path, block: int, only: str | None = None) -> Path:
    """A copy of an llm-compressor MoE checkpoint whose block's experts (or, with `only`, that one stored matrix) are
    stored as full-precision weights under the names the checkpoint uses, holding exactly the library's dequantized
    values."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    tensors = load_file(str(out / "model.safetensors"))
    reference = load_file(str(src / "library_dequantized.safetensors"))
    for name in [k for k in reference if f"layers.{block}." in k and ".experts." in k]:
        if only is not None and only not in name:
            continue
        layer = name.removesuffix(".weight")
        for key in [k for k in tensors if k.startswith(layer + ".")]:
            del tensors[key]
        tensors[name] = reference[name]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_experts_stored_unquantized_are_read_into_the_fused_parameters(tmp_path, text_file):
    """Block 1's experts stored as full-precision weights, one by one: read into the model's fused parameters (not
    counted as quantized), the checkpoint still belongs to the model, and a run judges it exactly as the all-quantized
    checkpoint with the same values, holding the model and streamed."""
    src = GOLDEN / "llmc-gptq-mixtral-w4g16"
    path = unquantize_block_experts(src, tmp_path / "fp-experts", block=1)
    base = load_base("mixtral")
    layout = layout_for(base)
    reader = reader_for(path)
    header = reader.header(path, base)
    assert "model.layers.1.mlp.experts.2.up_proj.weight" in header.tensors
    check_belongs(header, base, layout, tiny_tokenizer())
    contents = reader.read(path, base)
    assert len(contents.artifacts) == 32 - 12 and not any("layers.1.mlp.experts" in n for n in contents.artifacts)
    fused = contents.tensors["model.layers.1.mlp.experts.gate_up_proj"]
    from safetensors.torch import load_file

    reference = load_file(str(src / "library_dequantized.safetensors"))
    up = layout.matrix(base, "model.layers.1.mlp.experts.2.up_proj")
    assert torch.equal(up.slice_of(fused), reference["model.layers.1.block_sparse_moe.experts.2.up_proj.weight"])
    whole = execute(make_config(*tiny_run_overrides(MOE_BASES["mixtral"], text_file, tmp_path, "method=checkpoint",
                                                    f"method.path={src}", "method.label=all")))
    for streaming in ("false", "true"):
        frame = execute(make_config(*tiny_run_overrides(MOE_BASES["mixtral"], text_file, tmp_path, "method=checkpoint",
                                                        f"method.path={path}", f"method.label=fp-{streaming}",
                                                        f"model.streaming={streaming}")))
        assert ppl_and_kld(frame) == ppl_and_kld(whole), streaming
        quant = frame[frame.suite == "quant"].set_index("metric")["value"]
        assert quant["quantized_layers"] == 20


def test_a_fused_parameter_half_quantized_is_refused(tmp_path):
    path = unquantize_block_experts(GOLDEN / "llmc-gptq-mixtral-w4g16", tmp_path / "half", block=1,
                                    only="experts.2.up_proj")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj: the checkpoint stores "
                                              r"1 of its 8 expert matrices in full precision"):
        reader_for(path).read(path, load_base("mixtral"))
