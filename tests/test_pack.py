"""Packing layouts: round trips, and bit-for-bit agreement with loop transcriptions of the reference packers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.pack import (
    AWQ_ORDER, cpu_int4_group_size, pack_awq_gemm, pack_bit_stream, pack_cpu_int4, pack_gptq, pack_triton_w4,
    pack_nibbles, triton_group_size, unpack_awq_gemm, unpack_bit_stream, unpack_gptq, unpack_nibbles,
)
from kernels.reference import dequantize_gptq, dequantize_triton_w4
from core.spec import QuantizedWeights, QuantSpec
from core.quant import quantize_weight


def random_art(out: int, inp: int, bits: int, group_size: int | None, seed: int = 0, act_order: bool = False,
               min_zero: int = 0) -> QuantizedWeights:
    """Uniformly random codes/zeros (every bit pattern exercised) with positive scales."""
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if group_size is None else -(-inp // group_size)
    maxq = 2**bits - 1
    g_idx = None
    if act_order:  # a permuted assignment of columns to groups, as GPTQ's desc_act records
        g_idx = (torch.randperm(inp, generator=g) // (group_size or inp)).to(torch.int32)
    return QuantizedWeights(
        codes=torch.randint(0, maxq + 1, (out, inp), generator=g).to(torch.uint8),
        scales=0.01 + torch.rand(out, n_groups, generator=g),
        zeros=torch.randint(min_zero, maxq + 1, (out, n_groups), generator=g).to(torch.uint8),
        bits=bits, group_size=group_size, g_idx=g_idx)


def assert_same_artifact(a: QuantizedWeights, b: QuantizedWeights) -> None:
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.zeros, b.zeros)
    assert torch.equal(a.scales, b.scales)
    assert (a.bits, a.group_size) == (b.bits, b.group_size)
    assert (a.g_idx is None) == (b.g_idx is None)
    if a.g_idx is not None:
        assert torch.equal(a.g_idx, b.g_idx)


# ---- loop transcriptions of the reference packers (AutoGPTQ QuantLinear.pack, AutoAWQ WQLinear_GEMM.from_linear)
def autogptq_pack_qweight(intweight: np.ndarray, bits: int) -> np.ndarray:
    """intweight uint32 [in, out] -> uint32 [in*bits/32, out], transcribed from AutoGPTQ's pack loop."""
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 32 values over 3 words
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight


def autogptq_pack_qzeros(zeros: np.ndarray, bits: int) -> np.ndarray:
    """zeros uint32 [groups, out] (already minus 1) -> uint32 [groups, out*bits/32], AutoGPTQ's loop (transposed)."""
    return autogptq_pack_qweight(zeros.T.copy(), bits).T


def autoawq_pack(intweight: np.ndarray) -> np.ndarray:
    """intweight uint32 [rows, out] -> uint32 [rows, out/8], AutoAWQ's GEMM pack loop."""
    q = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            q[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
    return q


def as_uint32(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint32)


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows", [1, 7, 32, 45])
def test_bit_stream_round_trip(bits, rows):
    values = torch.randint(0, 2**bits, (rows, 5), generator=torch.Generator().manual_seed(rows))
    words = pack_bit_stream(values, bits)
    assert words.dtype == torch.int32 and words.shape == (-(-rows * bits // 32), 5)
    assert torch.equal(unpack_bit_stream(words, bits, rows), values)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_matches_reference_pack_loop(bits):
    art = random_art(out=64, inp=96, bits=bits, group_size=32, seed=bits, min_zero=1)
    packed = pack_gptq(art)
    want_qweight = autogptq_pack_qweight(art.codes.t().numpy().astype(np.uint32), bits)
    want_qzeros = autogptq_pack_qzeros(art.zeros.t().numpy().astype(np.uint32) - 1, bits)
    assert packed["qweight"].shape == (96 * bits // 32, 64)
    assert packed["qzeros"].shape == (3, 64 * bits // 32)
    np.testing.assert_array_equal(as_uint32(packed["qweight"]), want_qweight)
    np.testing.assert_array_equal(as_uint32(packed["qzeros"]), want_qzeros)
    assert packed["scales"].dtype == torch.float16 and packed["scales"].shape == (3, 64)
    assert torch.equal(packed["g_idx"], torch.arange(96, dtype=torch.int32) // 32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32, 128])
def test_gptq_round_trip_ragged(bits, group_size):
    art = random_art(out=40, inp=200, bits=bits, group_size=group_size, seed=bits)  # 200 = 128 + a short 72
    back = unpack_gptq(pack_gptq(art, scale_dtype=torch.float32), bits, group_size)
    assert_same_artifact(art, back)


def test_gptq_round_trip_act_order_and_zero_point_zero():
    art = random_art(out=16, inp=64, bits=4, group_size=16, act_order=True)
    art.zeros[0, 0] = 0  # stored as (0 - 1) mod 16: must not spill into its neighbours
    back = unpack_gptq(pack_gptq(art, scale_dtype=torch.float32), 4, 16)
    assert_same_artifact(art, back)
    assert torch.equal(dequantize_gptq(pack_gptq(art, torch.float32), 4, 16), art.dequantize())


def test_gptq_fp16_scales_are_rounded_not_garbled():
    art = random_art(out=8, inp=64, bits=4, group_size=32)
    back = unpack_gptq(pack_gptq(art), 4, 32)
    assert torch.equal(back.scales, art.scales.half().float())
    assert torch.equal(back.codes, art.codes)


def test_gptq_from_real_quantizer_dequantizes_identically():
    w = torch.randn(24, 200, generator=torch.Generator().manual_seed(1))
    art = quantize_weight(w, QuantSpec(3, 64))
    assert torch.equal(dequantize_gptq(pack_gptq(art, torch.float32), 3, 64), art.dequantize())


def test_awq_gemm_matches_reference_pack_loop_and_round_trips():
    art = random_art(out=32, inp=128, bits=4, group_size=64)
    packed = pack_awq_gemm(art)
    assert packed["qweight"].shape == (128, 4) and packed["qzeros"].shape == (2, 4)
    np.testing.assert_array_equal(as_uint32(packed["qweight"]), autoawq_pack(art.codes.t().numpy().astype(np.uint32)))
    np.testing.assert_array_equal(as_uint32(packed["qzeros"]), autoawq_pack(art.zeros.t().numpy().astype(np.uint32)))
    assert packed["scales"].dtype == torch.float16 and packed["scales"].shape == (2, 32)
    back = unpack_awq_gemm(packed, 4, 64)
    assert torch.equal(back.codes, art.codes) and torch.equal(back.zeros, art.zeros)
    assert torch.equal(back.scales, art.scales.half().float())


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=3, group_size=64), "bits=3"),
    (dict(bits=4, group_size=48), "group_size=48"),
    (dict(bits=4, group_size=None), "group_size=None"),
])
def test_awq_gemm_rejects_what_the_layout_cannot_hold(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pack_awq_gemm(random_art(out=32, inp=128, **kwargs))


def test_awq_gemm_rejects_out_not_multiple_of_8_and_act_order():
    with pytest.raises(ValueError, match="out_features=12"):
        pack_awq_gemm(random_art(out=12, inp=128, bits=4, group_size=64))
    with pytest.raises(ValueError, match="act-order"):
        pack_awq_gemm(random_art(out=16, inp=128, bits=4, group_size=64, act_order=True))


def test_unpack_rejects_bad_bits():
    with pytest.raises(ValueError, match="allowed values"):
        unpack_gptq({}, 5, 128)
    with pytest.raises(ValueError, match="lacks keys"):
        unpack_gptq({"qweight": torch.zeros(1, 1, dtype=torch.int32)}, 4, 128)
    packed = pack_gptq(random_art(out=8, inp=64, bits=4, group_size=32))
    with pytest.raises(ValueError, match="2 scale groups"):
        unpack_gptq(packed, 4, 16)  # the caller's group size disagrees with the stored scales


@pytest.mark.parametrize("group_size, inp", [(32, 96), (128, 200), (None, 200), (48, 100)])
def test_triton_layout_pads_k_and_dequantizes(group_size, inp):
    art = random_art(out=24, inp=inp, bits=4, group_size=group_size)
    G = triton_group_size(art)
    packed = pack_triton_w4(art)
    Kp = packed["qweight"].shape[0] * 8
    assert Kp % G == 0 and Kp - G < inp <= Kp and packed["scales"].shape == (Kp // G, 24)
    half_scales = QuantizedWeights(art.codes, art.scales.half().float(), art.zeros, 4, group_size)
    assert torch.equal(dequantize_triton_w4(packed["qweight"], packed["scales"], packed["zeros"], inp),
                       half_scales.dequantize())


def test_triton_layout_rejects_unsupported():
    assert triton_group_size(random_art(8, 64, 4, 8)) is None
    with pytest.raises(ValueError, match="bits=3"):
        pack_triton_w4(random_art(8, 64, 3, 32))
    with pytest.raises(ValueError, match="g_idx=set"):
        pack_triton_w4(random_art(8, 64, 4, 32, act_order=True))


@pytest.mark.parametrize("group_size, inp, want_g", [(32, 64, 32), (128, 576, 64), (128, 640, 128), (128, 200, 128),
                                                     (512, 1024, 256), (None, 200, 32), (None, 576, 64),
                                                     (None, 256, 256), (96, 192, 32), (16, 64, None)])
def test_cpu_int4_group_size_choice(group_size, inp, want_g):
    art = random_art(out=16, inp=inp, bits=4, group_size=group_size)
    assert cpu_int4_group_size(art) == want_g
    if want_g is None:
        with pytest.raises(ValueError, match="group_size=16"):
            pack_cpu_int4(art)
        return
    packed = pack_cpu_int4(art, dtype=torch.float32)
    Kp = packed["qweight"].shape[1] * 2
    assert Kp == -(-inp // want_g) * want_g  # padded only as far as the kernel group needs
    assert packed["scales_and_zeros"].shape == (Kp // want_g, 16, 2)
    # the float zero encodes the integer one exactly enough: (q - 8) * s + (8 - z) * s == (q - z) * s
    s, zero = packed["scales_and_zeros"][..., 0], packed["scales_and_zeros"][..., 1]
    first = s[0] * 8 - zero[0]  # = z * s for group 0
    torch.testing.assert_close(first, art.zeros[:, 0].float() * art.scales[:, 0])


def test_cpu_int4_rejects_out_not_multiple_of_16():
    assert cpu_int4_group_size(random_art(out=24, inp=64, bits=4, group_size=32)) is None


@pytest.mark.parametrize("out, inp", [(32, 128), (48, 64), (16, 33), (80, 200)])
def test_cpu_int4_pack_holds_our_artifact(out, inp):
    """The dense path reads our own copy of the artifact (never torch's opaque pack, whose layout depends on the CPU
    kernel family): codes in our nibble layout, fp32 scales and integer zeros exactly as the artifact has them."""
    art = random_art(out=out, inp=inp, bits=4, group_size=32)
    packed = pack_cpu_int4(art)
    assert packed["codes"].shape == (out, -(-inp // 2))
    assert torch.equal(unpack_nibbles(packed["codes"], inp), art.codes)
    assert torch.equal(packed["scales"], art.scales) and torch.equal(packed["zeros"], art.zeros)


def test_nibble_layout_is_ours_and_round_trips():
    codes = torch.tensor([[1, 2, 3], [15, 0, 7]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x03], [0x0F, 0x07]]  # byte j = q[2j] | q[2j + 1] << 4; odd K padded with 0
    assert torch.equal(unpack_nibbles(packed, 3), codes)
