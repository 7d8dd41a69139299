"""Quantizer primitives and the common artifact: round trips, error bounds, grouping."""
import pytest
import torch

from core.spec import QuantizedWeights, QuantSpec
from core.quant import fake_quantize, grouped_qparams, group_slices, quantize_weight


def _step_per_element(art: QuantizedWeights) -> torch.Tensor:
    return art.scales[:, art.group_index()]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, None])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("rule", ["minmax", "minmax_zero"])
def test_rtn_error_at_most_half_a_step(bits, group_size, symmetric, rule):
    torch.manual_seed(bits)
    w = torch.randn(48, 160) * torch.linspace(0.1, 3, 160)  # uneven column ranges
    art = quantize_weight(w, QuantSpec(bits, group_size, symmetric), rule)
    err = (art.dequantize() - w).abs()
    assert torch.all(err <= _step_per_element(art) / 2 + 1e-6)
    assert art.codes.dtype == torch.uint8 and int(art.codes.max()) <= 2**bits - 1
    assert int(art.zeros.max()) <= 2**bits - 1


def test_short_last_group_is_shorter_not_padded():
    w = torch.randn(8, 576)
    spec = QuantSpec(4, 128)
    art = quantize_weight(w, spec)
    assert art.n_groups == spec.n_groups(576) == 5 and art.has_short_group
    assert [s.stop - s.start for s in group_slices(576, 128)] == [128] * 4 + [64]
    # the last group's parameters come from its 64 columns only
    scale, zero = grouped_qparams(w[:, 512:], QuantSpec(4, None))
    assert torch.allclose(art.scales[:, 4], scale[:, 0])


def test_per_channel_is_one_group():
    w = torch.randn(16, 96)
    art = quantize_weight(w, QuantSpec(4, None))
    assert art.scales.shape == (16, 1) and not art.has_short_group
    assert torch.equal(art.group_index(), torch.zeros(96, dtype=torch.long))


def test_awq_rule_keeps_range_gptq_rule_includes_zero():
    w = torch.rand(4, 32) + 1.0  # all positive: the two rules must differ
    awq = quantize_weight(w, QuantSpec(4, None), "minmax")
    gptq = quantize_weight(w, QuantSpec(4, None), "minmax_zero")
    assert torch.all(gptq.scales > awq.scales)  # GPTQ's range [0, max] is wider than [min, max]
    assert torch.all(gptq.zeros == 0)


def test_explicit_g_idx_dequantizes_by_group_map():
    codes = torch.randint(0, 16, (3, 6), dtype=torch.uint8)
    scales = torch.tensor([[1.0, 2.0]] * 3)
    zeros = torch.tensor([[8, 0]] * 3, dtype=torch.uint8)
    g_idx = torch.tensor([1, 0, 1, 0, 1, 0], dtype=torch.int32)
    art = QuantizedWeights(codes, scales, zeros, bits=4, group_size=3, g_idx=g_idx)
    expected = torch.where(g_idx.bool(), codes.float() * 2.0, codes.float() - 8.0)
    assert torch.equal(art.dequantize(), expected)


def test_fake_quantize_matches_artifact_and_keeps_dtype():
    w = torch.randn(8, 64, dtype=torch.float64)
    spec = QuantSpec(3, 32)
    out = fake_quantize(w, spec)
    assert out.dtype == torch.float64
    assert torch.allclose(out, quantize_weight(w, spec).dequantize(torch.float64))


@pytest.mark.parametrize("kwargs", [dict(bits=5, group_size=128), dict(bits=4, group_size=0), dict(bits=4, group_size=-1)])
def test_bad_spec_is_a_clear_error(kwargs):
    with pytest.raises(ValueError, match="bits|group_size"):
        QuantSpec(**kwargs)


def test_artifact_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="do not match"):
        QuantizedWeights(torch.zeros(4, 8, dtype=torch.uint8), torch.ones(3, 1), torch.zeros(3, 1), 4, None)


def test_storage_bits_counts_scales_and_zeros():
    art = quantize_weight(torch.randn(4, 128), QuantSpec(4, 128))
    assert art.storage_bits_per_weight() == pytest.approx(4 + (16 + 4) / 128)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(7, 13), (64, 128), (1, 1), (0, 5)])
def test_codes_pack_at_their_bit_width_and_round_trip(bits, shape):
    from core.spec import pack_codes, unpack_codes

    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-codes.numel() * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, shape), codes)


def test_an_artifact_is_stored_at_its_bits_per_weight():
    """torch.save of an artifact (cache entries, a streamed run's artifact files) holds its codes packed: a 3-bit
    artifact takes 3/8 byte per weight plus its scales and zeros, and loads back equal."""
    import io

    from core.spec import QuantizedWeights, pack_codes

    gen = torch.Generator().manual_seed(0)
    art = QuantizedWeights(torch.randint(0, 8, (256, 1024), dtype=torch.uint8, generator=gen),
                           torch.rand(256, 8, generator=gen), torch.randint(0, 8, (256, 8), dtype=torch.uint8,
                                                                             generator=gen), 3, 128)
    buffer = io.BytesIO()
    torch.save(art, buffer)
    per_weight = len(buffer.getvalue()) / art.codes.numel()
    assert per_weight < 3 / 8 + (4 + 1) * 8 / 1024 + 0.01  # codes + fp32 scales + zeros + pickle overhead
    back = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert torch.equal(back.codes, art.codes) and torch.equal(back.scales, art.scales) and back.bits == 3
    with pytest.raises(ValueError, match="do not fit in 3 bits"):
        pack_codes(torch.tensor([8], dtype=torch.uint8), 3)


@pytest.mark.parametrize("group_size,inp", [(32, 96), (128, 576), (64, 200), (None, 72), (16, 8), (48, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_equals_the_per_column_formula(group_size, inp, dtype):
    """The in-place, broadcast dequantization gives exactly s[g(i)] * (code - z[g(i)]) per column, short last group
    and per-channel included."""
    torch.manual_seed(inp)
    art = quantize_weight(torch.randn(24, inp) * 3, QuantSpec(4, group_size))
    g = art.group_index()
    expected = ((art.codes.float() - art.zeros.float()[:, g]) * art.scales.float()[:, g]).to(dtype)
    out = art.dequantize(dtype)
    assert out.dtype == dtype and out.shape == (24, inp) and out.is_contiguous()
    assert torch.equal(out, expected)
