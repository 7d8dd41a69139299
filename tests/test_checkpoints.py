"""Checkpoints made elsewhere (method=checkpoint): each reader against the library that wrote the file, the bits per
weight against a hand count, the refusals of a checkpoint of another model, and whole runs.

The golden files under tests/golden/checkpoints/ were written by the real libraries from the tiny Llama there
(scripts/produce/; each directory's PRODUCER.json says how)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from checkpoints.base import CheckpointError, check_belongs, digest, reader_for
from core.spec import DequantizedWeights, QuantizedWeights
from harness.config import ConfigError
from harness.run import execute
from structure.architectures import layout_for
from tests.conftest import gguf_writer, save_with_tokenizer, tiny_model, tiny_tokenizer
from tests.test_config import make_config
from tests.test_run import tiny_run_overrides

GOLDEN = Path(__file__).parent / "golden" / "checkpoints"
BASE = GOLDEN / "tiny-llama"
# GGUF types and their storage per block of 32 weights, counted by hand from llama.cpp's block structs:
# fp16 d (+ fp16 m for _1 types) + the codes (+ 32 high bits for Q5 types)
GGUF_BITS = {"Q4_0": (2 + 16) * 8 / 32, "Q4_1": (2 + 2 + 16) * 8 / 32, "Q5_0": (2 + 4 + 16) * 8 / 32,
             "Q5_1": (2 + 2 + 4 + 16) * 8 / 32, "Q8_0": (2 + 32) * 8 / 32,
             "MXFP4": (1 + 16) * 8 / 32}  # gpt-oss's type: one E8M0 exponent byte + 32 E2M1 codes
EXACT = {"Q4_0", "Q5_0", "Q8_0"}  # d * (q - offset): codes/scales/zeros; the others are carried dequantized


@pytest.fixture(scope="module")
def base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()


def gguf_file(kind: str) -> Path:
    return GOLDEN / "gguf" / f"tiny-{kind}.gguf"


def test_the_golden_base_is_the_tiny_test_model(base):
    fresh = tiny_model("llama", seed=0).state_dict()
    assert all(torch.equal(t, fresh[name]) for name, t in base.state_dict().items())


@pytest.mark.parametrize("kind", sorted(GGUF_BITS))
def test_gguf_reader_equals_transformers_gguf_loader(base, kind):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = gguf_file(kind)
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=base)["tensors"]
    reader = reader_for(path)
    check_belongs(reader.header(path, base), base, layout_for(base), tiny_tokenizer())
    contents = reader.read(path, base)
    assert set(contents.artifacts) == set(layout_for(base).quantizable_linears(base))
    for name, art in contents.artifacts.items():
        assert isinstance(art, QuantizedWeights if kind in EXACT else DequantizedWeights)
        assert torch.equal(art.dequantize(), theirs[f"{name}.weight"]), name
        assert art.storage_bits_per_weight() == GGUF_BITS[kind]
    assert set(contents.tensors) | {f"{n}.weight" for n in contents.artifacts} == set(theirs)
    for name, tensor in contents.tensors.items():
        assert torch.equal(tensor, theirs[name]), name


def test_gguf_exact_types_give_codes_in_range_with_the_format_zero(base):
    art = next(iter(reader_for(gguf_file("Q4_0")).read(gguf_file("Q4_0"), base).artifacts.values()))
    assert (art.bits, art.group_size, art.symmetric) == (4, 32, True)
    assert int(art.codes.max()) <= 15 and bool((art.zeros == 8).all())


def test_gguf_description_names_the_mix_and_whether_it_packs():
    q40, q41 = reader_for(gguf_file("Q4_0")).describe(gguf_file("Q4_0")), \
        reader_for(gguf_file("Q4_1")).describe(gguf_file("Q4_1"))
    assert (q40.label, q40.bits, q40.group_size, q40.packable) == ("gguf-Q4_0", 4, 32, True)
    assert (q41.label, q41.packable) == ("gguf-Q4_1", False)


def test_gguf_k_quant_mix_is_carried_dequantized_and_counted_per_type():
    """llama.cpp's Q4_K_M of a 256-wide tiny Llama (K-quants need 256 columns): Q4_K and Q6_K layers, each read as
    transformers reads it, stored bits per type by hand: Q4_K = 144 bytes per 256 weights (fp16 d and dmin, 12 bytes
    of 6-bit scales and mins, 128 of codes), Q6_K = 210 bytes per 256."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model, path = tiny_model("llama", hidden_size=256, intermediate_size=256, num_hidden_layers=1), \
        GOLDEN / "gguf" / "tiny256-Q4_K_M.gguf"
    reader = reader_for(path)
    about = reader.describe(path)
    assert (about.label, about.bits, about.packable) == ("gguf-Q4_K_M", 4, False)
    check_belongs(reader.header(path, model), model, layout_for(model), tiny_tokenizer())
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    contents = reader.read(path, model)
    bits = {art.format: art.storage_bits_per_weight() for art in contents.artifacts.values()}
    assert bits == {"GGUF Q4_K": 144 * 8 / 256, "GGUF Q6_K": 210 * 8 / 256}
    for name, art in contents.artifacts.items():
        assert torch.equal(art.dequantize(), theirs[f"{name}.weight"]), name
    assert torch.equal(contents.tensors["model.embed_tokens.weight"], theirs["model.embed_tokens.weight"])


def test_a_checkpoint_of_another_shape_is_refused():
    other = tiny_model("llama", intermediate_size=128)
    with pytest.raises(CheckpointError, match="mlp.*is \\(160, 64\\).*\\(128, 64\\)|is \\(64, 160\\).*\\(64, 128\\)"):
        check_belongs(reader_for(gguf_file("Q4_0")).header(gguf_file("Q4_0"), other), other, layout_for(other))


def test_a_checkpoint_of_another_architecture_is_refused():
    other = tiny_model("qwen2")
    with pytest.raises(CheckpointError, match="'llama' model, the base model a 'qwen2'"):
        reader_for(gguf_file("Q4_0")).header(gguf_file("Q4_0"), other)


def test_a_checkpoint_with_another_vocabulary_is_refused(base):
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["zebra"])  # one token more
    with pytest.raises(CheckpointError, match="tokens, the base model's"):
        check_belongs(reader_for(gguf_file("Q4_0")).header(gguf_file("Q4_0"), base), base, layout_for(base),
                      tokenizer)


def test_a_truncated_or_unknown_file_is_refused(tmp_path, base):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_file("Q4_0").read_bytes()[:50_000])
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        reader_for(cut).header(cut, base)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="no known format recognizes it"):
        reader_for(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="does not exist"):
        reader_for(tmp_path / "missing.gguf")


# --- whole runs -----------------------------------------------------------------------------------------------------

def checkpoint_run(text_file, tmp_path, path, *extra):
    return make_config(*tiny_run_overrides(BASE, text_file, tmp_path, "method=checkpoint", f"method.path={path}",
                                           *extra))


def test_a_gguf_run_is_named_and_counted_by_what_the_file_holds(text_file, tmp_path, base):
    frame = execute(checkpoint_run(text_file, tmp_path, gguf_file("Q4_0")))
    row = frame.iloc[0]
    sha = digest(gguf_file("Q4_0"))
    assert (row["method"], row["bits"], row["group_size"], row["symmetric"]) == (f"ckpt:gguf-Q4_0-{sha[:8]}", 4, 32,
                                                                                 True)
    assert row["run_id"].startswith(f"tiny-ckpt-gguf-Q4_0-{sha[:8]}-")
    quant = frame[frame.suite == "quant"].set_index("metric")["value"]
    assert quant["storage_bits_per_weight"] == GGUF_BITS["Q4_0"] and quant["quantized_layers"] == 14
    kld = frame[(frame.suite == "ppl") & (frame.metric == "kld")]["value"].iloc[0]
    assert kld > 0  # Q4_0 of random weights differs from them


def test_a_changed_checkpoint_file_is_a_different_run(text_file, tmp_path):
    first = tmp_path / "a.gguf"
    shutil.copy(gguf_file("Q4_0"), first)
    before = execute(checkpoint_run(text_file, tmp_path, first))["run_id"].iloc[0]
    shutil.copy(gguf_file("Q5_0"), first)  # same path, other contents
    after = execute(checkpoint_run(text_file, tmp_path, first))
    assert after["run_id"].iloc[0] != before and after["method"].iloc[0].startswith("ckpt:gguf-Q5_0-")


def test_a_mismatched_checkpoint_is_refused_before_anything_is_written(text_file, tmp_path):
    other = save_with_tokenizer(tiny_model("llama", intermediate_size=128), tmp_path / "other")
    cfg = make_config(*tiny_run_overrides(other, text_file, tmp_path, "method=checkpoint",
                                          f"method.path={gguf_file('Q4_0')}"))
    with pytest.raises(ConfigError, match="method.path=.*not a checkpoint of this model"):
        execute(cfg)
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_packed_kernels_refuse_a_checkpoint_carried_dequantized(text_file, tmp_path):
    cfg = checkpoint_run(text_file, tmp_path, gguf_file("Q4_1"), "kernel=reference")
    with pytest.raises(ConfigError, match="gguf-Q4_1-[0-9a-f]{8} stores some layers .* set kernel=null"):
        execute(cfg)


def test_method_path_is_required():
    with pytest.raises(Exception, match="method.path is missing"):
        make_config("method=checkpoint")


# --- export, and the round trip through the checkpoint method -------------------------------------------------------

def ppl_and_kld(frame):
    ppl = frame[frame.suite == "ppl"].set_index("metric")["value"]
    return ppl["ppl"], ppl["kld"]


@pytest.mark.parametrize("method,fmt", [("gptq", "gptq"), ("awq", "awq_gemm"), ("rtn", "gptq"),
                                        ("rtn", "compressed-tensors")])
def test_an_exported_run_evaluated_as_a_checkpoint_gives_the_same_numbers(tiny_model_dir, text_file, tmp_path, method,
                                                                         fmt):
    cfg = make_config(*tiny_run_overrides(tiny_model_dir, text_file, tmp_path, f"method={method}", "group_size=32",
                                          f"export={fmt}", "calib.n_samples=4", "calib.seqlen=32"))
    run = execute(cfg)
    exported = tmp_path / "results" / run["run_id"].iloc[0] / f"checkpoint-{fmt}"
    assert (exported / "config.json").is_file() and (exported / "model.safetensors").is_file()
    again = execute(make_config(*tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=checkpoint",
                                                    f"method.path={exported}", "method.label=exported")))
    assert again["method"].iloc[0] == "ckpt:exported"
    assert ppl_and_kld(again) == ppl_and_kld(run)


def test_our_export_reads_back_bit_exact(tmp_path, base):
    from core.quant import quantize_weight
    from core.spec import QuantSpec
    from kernels.export import as_stored, save_quantized

    layout = layout_for(base)
    for fmt, spec in (("gptq", QuantSpec(3, 32, True)), ("gptq", QuantSpec(4, None)), ("awq_gemm", QuantSpec(4, 32))):
        arts = {n: as_stored(quantize_weight(lin.weight.data, spec), fmt)
                for n, lin in layout.quantizable_linears(base).items()}
        out = save_quantized(base, arts, tmp_path / f"{fmt}-{spec.tag()}", fmt, spec, tiny_tokenizer())
        contents = reader_for(out).read(out, base)
        for name, art in arts.items():
            got = contents.artifacts[name]
            assert torch.equal(got.codes, art.codes) and torch.equal(got.zeros, art.zeros), name
            assert torch.equal(got.scales, art.scales), name


def test_gptq_bits_per_weight_count_every_stored_tensor(tmp_path, base):
    """w4 g32 GPTQ, counted by hand per layer [out, in]: 4-bit codes, per group of 32 an fp16 scale and a 4-bit zero,
    and an int32 g_idx entry per input column."""
    from core.quant import quantize_weight
    from core.spec import QuantSpec
    from kernels.export import save_quantized

    spec, layout = QuantSpec(4, 32), layout_for(base)
    arts = {n: quantize_weight(lin.weight.data, spec) for n, lin in layout.quantizable_linears(base).items()}
    out = save_quantized(base, arts, tmp_path / "ck", "gptq", spec)
    for name, art in reader_for(out).read(out, base).artifacts.items():
        n_out, n_in = art.out_features, art.in_features
        expected = 4 + (16 + 4) / 32 + 32 / n_out
        assert art.storage_bits_per_weight() == pytest.approx(expected), (name, n_out, n_in)


def test_export_refuses_what_its_format_cannot_hold(tiny_model_dir, text_file, tmp_path):
    with pytest.raises(ConfigError, match="export=awq_gemm: awq_gemm stores 4-bit asymmetric"):
        execute(make_config(*tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=rtn", "bits=3",
                                                "group_size=32", "export=awq_gemm")))
    with pytest.raises(ConfigError, match="gguf-Q4_1-[0-9a-f]{8} stores some layers .* set export=null"):
        execute(checkpoint_run(text_file, tmp_path, gguf_file("Q4_1"), "export=gptq"))
    with pytest.raises(Exception, match="export=.*null or one of"):
        make_config("export=exl2")


# --- checkpoint directories written by GPTQModel, AutoAWQ, llm-compressor and AutoRound ------------------------------

# golden directory -> (reader, label, bits, group size, symmetric); each holds library_dequantized.safetensors, every
# quantized linear as the library itself dequantizes it (scripts/produce/check_layout.py --write-reference)
HF_GOLDENS = {
    "gptqmodel-w4g32-sym": ("gptq", "gptq", 4, 32, True),
    "gptqmodel-w4g32-asym-actorder": ("gptq", "gptq", 4, 32, False),
    "gptqmodel-w4g32-v2": ("gptq", "gptq-v2", 4, 32, False),
    "gptqmodel-w3g32-asym": ("gptq", "gptq", 3, 32, False),
    "autoawq-gemm-w4g32": ("awq_gemm", "awq-gemm", 4, 32, False),
    "autoawq-gemv-w4g32": ("awq_gemv", "awq-gemv", 4, 32, False),
    "llmc-gptq-w4g32": ("compressed_tensors", "compressed-tensors", 4, 32, True),
    "llmc-gptq-w4g32-asym": ("compressed_tensors", "compressed-tensors", 4, 32, False),
    "llmc-awq-w4g32-asym": ("compressed_tensors", "compressed-tensors", 4, 32, False),
    "autoround-w4g32": ("auto_round", "autoround", 4, 32, True),
    "autoround-w4g32-asym": ("auto_round", "autoround-awq", 4, 32, False),
    "autoround-w4g32-gptq": ("gptq", "gptq", 4, 32, True),
    "autoround-w4g32-llmc": ("compressed_tensors", "compressed-tensors", 4, 32, True),
    # compressed-tensors alone (scripts/produce/compressed_tensors_pack.py), before and after its 3-bit packing changed
    "ct017-w3g32-asym": ("compressed_tensors", "compressed-tensors", 3, 32, False),
    "ct019-w3g32-asym": ("compressed_tensors", "compressed-tensors", 3, 32, False),
}
# AutoAWQ cannot dequantize GEMV on a CPU: the GEMV golden holds the very codes of its GEMM sibling (same search)
REFERENCE_OF = {"autoawq-gemv-w4g32": "autoawq-gemm-w4g32"}


def library_reference(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(GOLDEN / REFERENCE_OF.get(name, name) / "library_dequantized.safetensors"))


@pytest.mark.parametrize("name", sorted(HF_GOLDENS))
def test_checkpoint_reader_equals_the_library_that_wrote_it(base, name):
    path = GOLDEN / name
    fmt, label, bits, group, sym = HF_GOLDENS[name]
    reader = reader_for(path)
    about = reader.describe(path)
    assert (reader.name, about.label, about.bits, about.group_size, about.symmetric) == (fmt, label, bits, group, sym)
    check_belongs(reader.header(path, base), base, layout_for(base), tiny_tokenizer())
    contents = reader.read(path, base)
    reference = library_reference(name)
    assert {f"{n}.weight" for n in contents.artifacts} == set(reference)
    for linear, art in contents.artifacts.items():
        ref = reference[f"{linear}.weight"]
        assert torch.equal(art.dequantize().to(ref.dtype), ref), linear
    # every other tensor is the checkpoint's own (AutoAWQ's norms carry its folded scales)
    assert set(contents.tensors) <= set(base.state_dict())


def test_gptq_act_order_keeps_the_checkpoint_g_idx(base):
    path = GOLDEN / "gptqmodel-w4g32-asym-actorder"
    arts = reader_for(path).read(path, base).artifacts
    assert any(a.g_idx is not None for a in arts.values())


def test_compressed_tensors_bits_per_weight_count_what_the_file_stores(base):
    """llm-compressor's W4A16 (symmetric, group 32) by hand per layer: 4-bit codes, an fp32 scale per 32 weights,
    no zero point, and the two int64 of weight_shape."""
    path = GOLDEN / "llmc-gptq-w4g32"
    for name, art in reader_for(path).read(path, base).artifacts.items():
        n = art.out_features * art.in_features
        assert art.storage_bits_per_weight() == pytest.approx(4 + 32 / 32 + 128 / n), name


def test_a_group_size_that_does_not_fit_the_layers_is_refused(tmp_path, base):
    import json

    path = tmp_path / "wrong-group"
    shutil.copytree(GOLDEN / "gptqmodel-w4g32-sym", path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["group_size"] = 64
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"down_proj.qzeros has shape \[5, 8\], expected \[3, 8\] for a 64 x 160 "
                                              r"linear at bits=4, group_size=64"):
        reader_for(path).header(path, base)


def test_a_damaged_safetensors_file_is_refused(tmp_path, base):
    path = tmp_path / "cut"
    shutil.copytree(GOLDEN / "llmc-gptq-w4g32", path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file|cannot be read"):
        reader = reader_for(path)
        reader.read(path, base)


def test_a_checkpoint_runs_through_the_packed_kernels_and_exports_again(text_file, tmp_path):
    """Artifacts read from another tool's checkpoint are ordinary artifacts: packed layers (checked against the
    fake-quantized reference at pack time) give the fake-quant perplexity, and the run exports them again."""
    path = GOLDEN / "gptqmodel-w4g32-sym"
    fake = execute(checkpoint_run(text_file, tmp_path, path, "method.label=gm"))
    packed = execute(checkpoint_run(text_file, tmp_path, path, "method.label=gm", "kernel=reference"))
    assert ppl_and_kld(packed)[0] == pytest.approx(ppl_and_kld(fake)[0], rel=1e-4)
    gguf = execute(checkpoint_run(text_file, tmp_path, gguf_file("Q4_0"), "export=gptq", "method.label=q40"))
    exported = tmp_path / "results" / gguf["run_id"].iloc[0] / "checkpoint-gptq"
    again = execute(checkpoint_run(text_file, tmp_path, exported, "method.label=q40-as-gptq"))
    assert ppl_and_kld(again) == ppl_and_kld(gguf)


@pytest.mark.parametrize("name,per_layer", [
    # 4-bit codes + per group of 32 an fp16 scale and a 4-bit zero
    ("autoawq-gemm-w4g32", lambda n_out, n_in: 4 + (16 + 4) / 32),
    ("autoround-w4g32", lambda n_out, n_in: 4 + (16 + 4) / 32),
    # GEMV pads each row's zeros to 4 int32 words (32 zeros) and its scales to 32 fp16: 640 bits per row
    ("autoawq-gemv-w4g32", lambda n_out, n_in: 4 + (4 * 32 + 32 * 16) / n_in),
])
def test_awq_and_autoround_bits_per_weight_by_hand(base, name, per_layer):
    path = GOLDEN / name
    for layer, art in reader_for(path).read(path, base).artifacts.items():
        assert art.storage_bits_per_weight() == pytest.approx(per_layer(art.out_features, art.in_features)), layer


# --- issue 30, finding 1: packed widths are checked, and compressed-tensors' older 3-bit packing is read -------------

def test_finding1_compressed_tensors_word_aligned_3bit_reads_as_the_library_does(base):
    """compressed-tensors up to 0.17 packed 32 // bits values per int32 (3 bits: 10 per word, rows of
    ceil(in / 10) words); 0.18 on packs densely (ceil(in * 3 / 32)). Both goldens are written by the library itself
    from the same weights; each must read as that version's own decompress reads it (the word-aligned one was
    unpacked as a dense stream before: max |W difference| 0.17, ppl 3.7e8 on SmolLM2)."""
    from safetensors import safe_open

    old, new = GOLDEN / "ct017-w3g32-asym", GOLDEN / "ct019-w3g32-asym"
    with safe_open(str(old / "model.safetensors"), "pt") as f_old, \
            safe_open(str(new / "model.safetensors"), "pt") as f_new:
        name = "model.layers.0.mlp.down_proj.weight_packed"  # 160 inputs: 16 words word-aligned, 15 dense
        assert f_old.get_slice(name).get_shape() == [64, 16] and f_new.get_slice(name).get_shape() == [64, 15]
    for path in (old, new):
        contents = reader_for(path).read(path, base)
        reference = library_reference(path.name)
        for linear, art in contents.artifacts.items():
            assert torch.equal(art.dequantize(), reference[f"{linear}.weight"]), (path.name, linear)
    read_old = reader_for(old).read(old, base).artifacts
    read_new = reader_for(new).read(new, base).artifacts
    for linear, art in read_new.items():  # the same weights, whichever packing held them
        assert torch.equal(art.codes, read_old[linear].codes) and torch.equal(art.zeros, read_old[linear].zeros)


def _resave(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["gptqmodel-w4g32-sym", "gptqmodel-w3g32-asym", "gptqmodel-w4g32-asym-actorder",
                                  "autoawq-gemm-w4g32", "autoawq-gemv-w4g32", "llmc-gptq-w4g32",
                                  "llmc-gptq-w4g32-asym", "ct017-w3g32-asym", "autoround-w4g32",
                                  "autoround-w4g32-asym"])
def test_finding1_every_reader_refuses_a_packed_tensor_of_another_width(tmp_path, base, name):
    """One int32 word too many in one layer's packed zero points (or packed codes where no zero point is stored) is a
    CheckpointError naming the tensor, its shape and the shape out, in, bits and group size imply; before, the extra
    word was ignored or read as values."""
    path = tmp_path / name
    shutil.copytree(GOLDEN / name, path)
    layer = "model.layers.1.mlp.down_proj"
    reader = reader_for(path)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        part = next(p for p in reversed(reader.packed) if f"{layer}.{p}" in f.keys())
        before = list(f.get_slice(f"{layer}.{part}").get_shape())

    words = 0 if part == "weight_zero_point" else -1  # compressed-tensors packs zero points along the outputs

    def widen(tensors):
        t = tensors[f"{layer}.{part}"]
        tensors[f"{layer}.{part}"] = torch.cat([t, torch.zeros_like(t.narrow(words, 0, 1))], dim=words)

    _resave(path, widen)
    after = list(before)
    after[words] += 1
    with pytest.raises(CheckpointError, match=rf"{layer}\.{part} has shape \[{after[0]}, {after[1]}\], expected "
                                              rf"\[{before[0]}, {before[1]}\]"):
        reader_for(path).read(path, base)
    with pytest.raises(CheckpointError, match=rf"{layer}\.{part} has shape"):
        reader_for(path).header(path, base)


def test_finding1_a_packed_tensor_of_another_dtype_is_refused(tmp_path, base):
    """compressed-tensors before 0.9.4 stored an asymmetric zero point unpacked (int8 [out, groups]); that is not the
    packed int32 layout this reader takes, and is refused by name rather than read as words."""
    path = tmp_path / "ct"
    shutil.copytree(GOLDEN / "llmc-gptq-w4g32-asym", path)
    layer = "model.layers.0.mlp.down_proj"

    def unpacked_zero_point(tensors):
        groups = tensors[f"{layer}.weight_scale"].shape[1]
        tensors[f"{layer}.weight_zero_point"] = torch.zeros(64, groups, dtype=torch.int8)

    _resave(path, unpacked_zero_point)
    with pytest.raises(CheckpointError, match=rf"{layer}\.weight_zero_point has shape \[64, 5\], expected \[8, 5\]"):
        reader_for(path).header(path, base)


# --- issue 30, finding 2: a GGUF judged against the HF model made from it -------------------------------------------

def write_tiny_gemma_gguf(out: Path) -> Path:
    """A tiny Gemma 3 GGUF (Q8_0 linears) with a sentencepiece vocabulary that stores runs of spaces as real spaces,
    as llama.cpp's Gemma files do ('  ', which transformers' loader spells '▁▁'), written with the `gguf` package:
    tensor names from its name table, norms stored + 1 as llama.cpp stores Gemma's."""
    import gguf
    import numpy as np

    from tests.conftest import WORDS

    model = tiny_model("gemma3_text")
    cfg = model.config
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\n", "  ", "   ", "▁", "."]
    tokens += [f"▁{w}" for w in dict.fromkeys(WORDS)] + sorted(set("".join(WORDS)))
    tokens += [f"▁filler{i}" for i in range(cfg.vocab_size - len(tokens))]
    producer = gguf_writer()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(out), "gemma3")
    producer.add_hyperparameters(writer, cfg)  # then what Gemma 3 adds
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3, 2, 3] + [1] * (len(tokens) - 5))  # control, unknown, normal
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for hf, tensor in model.state_dict().items():
        if hf == "lm_head.weight":  # tied to the embeddings
            continue
        base, suffix = hf.rsplit(".", 1)
        values = tensor.numpy().astype(np.float32) + (1 if "norm" in base else 0)
        name = f"{names.get_name(base)}.{suffix}"
        if values.ndim == 2 and ".layers." in hf:
            writer.add_tensor(name, gguf.quants.quantize(values, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, values)
    producer.write_file(writer)
    return out


def test_finding2_a_gguf_is_judged_against_the_hf_model_transformers_made_from_it(text_file, tmp_path):
    """transformers' GGUF loader spells the file's '  ' as '▁▁': the vocabulary check compared the two spellings and
    refused the pair. Compared as the loader converts it, the pair is accepted and the checkpoint is the base model
    itself: KLD exactly 0 and ppl equal to the baseline's."""
    from harness.models import save_gguf_as_hf

    path = write_tiny_gemma_gguf(tmp_path / "tiny-gemma3-Q8_0.gguf")
    base_dir = tmp_path / "from-gguf"
    save_gguf_as_hf(path, base_dir)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(base_dir).convert_ids_to_tokens([6, 7]) == ["▁▁", "▁▁▁"]
    frame = execute(make_config(*tiny_run_overrides(base_dir, text_file, tmp_path, "method=checkpoint",
                                                    f"method.path={path}", "method.label=gemma-q8")))
    ppl = frame[frame.suite == "ppl"].set_index("metric")["value"]
    assert ppl["kld"] == 0.0 and ppl["ppl"] == ppl["base_ppl"]


def test_finding2_a_vocabulary_refusal_quotes_tokens_with_repr_on_one_line(tmp_path):
    """Another vocabulary is still refused, and the one-line message keeps the token's spaces ('  ' stays two)."""
    from checkpoints.base import check_vocabulary
    from harness.config import one_line

    path = write_tiny_gemma_gguf(tmp_path / "tiny-gemma3-Q8_0.gguf")
    model = tiny_model("gemma3_text")
    header = reader_for(path).header(path, model)
    ours = list(header.vocab_as_loaded())
    ours[6] = "▁▁▁▁"
    with pytest.raises(CheckpointError) as refused:
        check_vocabulary(header, ours)
    line = one_line(f"method.path={str(path)!r}: {refused.value}")
    assert "token 6 is '▁▁' (stored as '  ') in the checkpoint's tokenizer as transformers' loader spells it and " \
           "'▁▁▁▁' in the base model's" in line


# --- issue 30, finding 3: a damaged or foreign tensor of the right shape is refused before it is evaluated ----------

def flip_scale_exponent(src: Path, out: Path, tensor: str = "blk.0.attn_q.weight") -> Path:
    """A copy of a Q4_0/Q8_0 GGUF with the top exponent bit of one block's fp16 scale flipped (the scale times 2^16):
    the damage one flipped byte does, still finite, the file still well formed."""
    import gguf

    t = next(t for t in gguf.GGUFReader(str(src)).tensors if t.name == tensor)
    data = bytearray(src.read_bytes())
    data[int(t.data_offset) + 1] ^= 0x40  # block 0's scale d: its high byte holds the sign and the exponent
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_finding3_a_flipped_exponent_in_one_gguf_scale_is_refused_naming_the_tensor(text_file, tmp_path, streaming):
    """Before, the damaged file ran to the end (ppl 7.2e9, KLD 20.5 on SmolLM2; rc 0). Its worst tensor is now
    refused with its relative error, in a run holding the model and in a streamed one; method.max_rel_error lets it
    through, and the rows record the figure either way."""
    damaged = flip_scale_exponent(gguf_file("Q4_0"), tmp_path / "damaged-Q4_0.gguf")
    args = (f"model.streaming={streaming}",)
    with pytest.raises(ConfigError, match=r"method.path=.*damaged-Q4_0.gguf.*: model\.layers\.0\.self_attn\.q_proj "
                                          r"has a relative error of [0-9.e+]+ against the base model's weight, above "
                                          r"method.max_rel_error=1 "):
        execute(checkpoint_run(text_file, tmp_path, damaged, *args))
    assert not (tmp_path / "results").exists() or not any(
        p for p in (tmp_path / "results").iterdir() if not p.name.startswith("."))
    frame = execute(checkpoint_run(text_file, tmp_path, damaged, *args, "method.max_rel_error=1e9"))
    row = frame[(frame.suite == "quant") & (frame.metric == "stat_rel_error")].iloc[0]
    assert row["value"] > 100 and json.loads(row["detail"])["max_layer"] == "model.layers.0.self_attn.q_proj"


def test_finding3_an_intact_checkpoint_records_its_worst_tensor(text_file, tmp_path):
    frame = execute(checkpoint_run(text_file, tmp_path, gguf_file("Q4_0")))
    row = frame[(frame.suite == "quant") & (frame.metric == "stat_rel_error")].iloc[0]
    assert 0 < row["value"] < 0.3 and json.loads(row["detail"])["aggregate"] == "max"


def test_finding3_awq_scales_folded_into_the_checkpoint_are_not_error(base):
    """AWQ multiplies a linear's input columns by s and divides the op before by s: the function is the same, the
    weights are not. Folded with scales from 0.1 to 10 (far beyond AWQ's), every tensor's figure stays at float
    rounding, while the plain ||W_hat - W|| / ||W|| of the rescaled layers is far above 1; quantized at w8 they stay
    far under the bound (the spread of scales coarsens each group's steps: about 0.1 where w8 alone gives 0.005)."""
    import copy

    from checkpoints.plausibility import relative_errors
    from core.quant import quantize_weight
    from core.spec import QuantSpec

    layout = layout_for(base)
    folded = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in layout.blocks(folded):
            for group in layout.spec.scale_groups:
                prev = block.get_submodule(group.prev)
                layers = [block.get_submodule(name) for name in group.layers]
                if prev.weight.shape[0] != layers[0].weight.shape[1]:
                    continue  # grouped-query attention: v_proj does not feed o_proj channel for channel
                s = torch.exp(torch.empty(layers[0].weight.shape[1]).uniform_(-2.3, 2.3, generator=g))
                prev.weight.div_(s if prev.weight.dim() == 1 else s[:, None])
                for layer in layers:
                    layer.weight.mul_(s)
    read = lambda name: base.get_parameter(name).detach()  # noqa: E731
    norms = {k: v for k, v in folded.state_dict().items() if "norm" in k}
    exact = {n: DequantizedWeights(lin.weight.data.clone(), "folded", 32, 32, None)
             for n, lin in layout.quantizable_linears(folded).items()}
    errors = relative_errors(exact, norms, layout, base, read)
    assert set(errors) == set(exact) and max(errors.values()) < 1e-5
    plain = {n: float((a.dequantize() - read(f"{n}.weight")).norm() / read(f"{n}.weight").norm())
             for n, a in exact.items()}
    assert max(plain.values()) > 1.0
    w8 = {n: quantize_weight(a.weight, QuantSpec(8, 32)) for n, a in exact.items()}
    assert max(relative_errors(w8, norms, layout, base, read).values()) < 0.2


def test_finding1_a_gguf_tensor_whose_header_shape_is_damaged_is_refused_by_name(tmp_path, base):
    """A GGUF's data layout follows its header's dimensions (the gguf package refuses rows that are not whole
    blocks), so its shape check is the header against the base model: one damaged dimension names the tensor, its
    shape and the base model's."""
    import struct

    src, path = gguf_file("Q8_0"), tmp_path / "damaged-dims.gguf"
    data = bytearray(src.read_bytes())
    name = b"blk.0.ffn_down.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    assert struct.unpack_from("<I2Q", data, at) == (2, 160, 64)  # n_dims, ne0 = in, ne1 = out
    struct.pack_into("<Q", data, at + 12, 32)  # 32 rows instead of 64
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj is \(32, 160\), the base model's is "
                                              r"\(64, 160\)"):
        check_belongs(reader_for(path).header(path, base), base, layout_for(base))


def test_a_stray_safetensors_file_beside_the_weights_is_not_part_of_the_checkpoint(tmp_path, base):
    """The reader takes model.safetensors (or the index's shards), as transformers does; before, every *.safetensors
    of the directory was read, e.g. the golden's library_dequantized.safetensors as extra tensors."""
    path = GOLDEN / "autoawq-gemm-w4g32"
    assert (path / "library_dequantized.safetensors").is_file()
    contents = reader_for(path).read(path, base)
    assert not any(name.endswith("_proj.weight") for name in contents.tensors)
