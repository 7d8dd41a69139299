"""Bit-packing between the common artifact (core.spec.QuantizedWeights) and the packed layouts. Torch only.

Layouts (all words are int32 holding unsigned bit patterns; K = in_features, N = out_features, G = group size):

- GPTQ (IST-DASLab/gptq, AutoGPTQ, GPTQModel): the codes of one output column, read along K, form a
  little-endian bit stream cut into 32-bit words: qweight int32 [ceil(K*bits/32), N]. For 2/4/8 bits a word
  holds 32/bits consecutive input rows; for 3 bits 32 rows fill 3 words and values cross word boundaries,
  exactly as AutoGPTQ's pack loop does. qzeros int32 [n_groups, ceil(N*bits/32)] is the same stream along N
  and stores (zeros - 1) mod 2^bits (the reference's off-by-one; masking keeps zero=0 from corrupting its
  neighbours). scales [n_groups, N]; g_idx int32 [K]. When K*bits (or N*bits) is not a multiple of 32 the
  stream is padded with zero bits; unpacking trims back to len(g_idx) rows and scales.shape[1] columns.
- AWQ GEMM (AutoAWQ): qweight int32 [K, N/8]; word c of row k holds output columns 8c..8c+7 with nibble i
  holding column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]; qzeros int32 [K/G, N/8] same order (zeros stored as is);
  scales fp16 [K/G, N]. 4-bit only; G must divide K and 8 must divide N (the reference asserts both).
- Triton W4A16 (kernels/triton_w4a16.py): the GPTQ 4-bit stream along K, with K zero-padded up to
  Kp = a multiple of the kernel group size; scales and zeros fp16 [Kp/G, N] (zeros as fp16 integers, exact).
- CPU int4 (torch's aten._weight_int4pack_mm_for_cpu): see `pack_cpu_int4`.
- compressed-tensors `pack-quantized`: see `pack_compressed`. Its 0.18+ dense stream is the GPTQ one (along K per
  output row, along N for the zero points); up to 0.17 it packed 32 // bits whole values per word instead
  (`unpack_aligned`): the same bytes at 2, 4 and 8 bits, another layout (and width) at 3, 5, 6 and 7.

Padding K never changes the result: padded codes sit at input columns >= K, which the kernels either mask
(Triton) or multiply by zero-padded activations (CPU int4).
"""
from __future__ import annotations

import torch

from core.spec import QuantizedWeights, group_index

GPTQ_BITS = (2, 3, 4, 8)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AutoAWQ word holds column AWQ_ORDER[i] of its 8
CPU_INT4_GROUP_SIZES = (256, 128, 64, 32)  # what aten._weight_int4pack_mm_for_cpu accepts, largest first
_MASK32 = 0xFFFFFFFF


def _check_bits(bits: int, allowed: tuple[int, ...], what: str) -> None:
    if bits not in allowed:
        raise ValueError(f"{what}: bits={bits} is not supported; allowed values: {list(allowed)}")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits (two's complement wrap)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _to_uint32(words: torch.Tensor) -> torch.Tensor:
    """int32 words -> int64 holding the same 32 bits as a non-negative number."""
    return words.to(torch.int64) & _MASK32


def pack_bit_stream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack values [R, C] (ints in [0, 2^bits)) down dim 0 as little-endian bitstream -> int32 [ceil(R*bits/32), C]."""
    R, C = values.shape
    n_words = -(-R * bits // 32)
    offset = torch.arange(R, device=values.device) * bits
    word, shift = offset // 32, offset % 32
    # Bits of different values never overlap, so summing shifted values equals OR-ing them; a value that
    # crosses a word boundary lands above bit 31 of its word and is carried into the next word below.
    acc = torch.zeros(n_words + 1, C, dtype=torch.int64, device=values.device)
    acc.index_add_(0, word, values.to(torch.int64) << shift[:, None])
    low, carry = acc & _MASK32, acc >> 32
    words = low[:n_words].clone()
    words[1:] |= carry[: n_words - 1]
    return _to_int32(words)


def unpack_bit_stream(words: torch.Tensor, bits: int, n_values: int) -> torch.Tensor:
    """Inverse of pack_bit_stream: int32 [W, C] -> int64 [n_values, C] in [0, 2^bits)."""
    if words.shape[0] * 32 < n_values * bits:
        raise ValueError(f"{words.shape[0]} words cannot hold {n_values} values of {bits} bits")
    w = _to_uint32(words)
    w = torch.cat([w, torch.zeros_like(w[:1])])  # a zero word so w[word + 1] always exists
    offset = torch.arange(n_values, device=words.device) * bits
    word, shift = offset // 32, offset % 32
    both = w[word] | (w[word + 1] << 32)  # 64 bits starting at the value's word: covers boundary crossers
    return (both >> shift[:, None]) & (2**bits - 1)


def stream_words(n_values: int, bits: int) -> int:
    """int32 words of a dense bit stream of n_values values of `bits` bits (pack_bit_stream's length)."""
    return -(-n_values * bits // 32)


def aligned_words(n_values: int, bits: int) -> int:
    """int32 words when each word holds 32 // bits whole values and none crosses a word (unpack_aligned's layout)."""
    return -(-n_values // (32 // bits))


def unpack_aligned(words: torch.Tensor, bits: int, n_values: int) -> torch.Tensor:
    """Word-aligned packing (compressed-tensors up to 0.17): int32 [W, C], value i of a column in word i // (32 // bits)
    at bit (i % (32 // bits)) * bits, the top 32 % bits bits unused -> int64 [n_values, C]. For 2, 4 and 8 bits it is
    the dense stream itself."""
    per_word = 32 // bits
    if words.shape[0] * per_word < n_values:
        raise ValueError(f"{words.shape[0]} words cannot hold {n_values} values of {bits} bits, {per_word} per word")
    index = torch.arange(n_values, device=words.device)
    shift = (index % per_word) * bits
    return (_to_uint32(words)[index // per_word] >> shift[:, None]) & (2**bits - 1)


def contiguous_g_idx(in_features: int, group_size: int | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """int32 [in]: column i -> group i // group_size (all zeros when per-channel)."""
    return group_index(in_features, group_size, device).to(torch.int32)


# ----------------------------------------------------------------------------------------------- GPTQ
def pack_gptq(art: QuantizedWeights, scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Artifact -> GPTQ tensors {qweight int32 [ceil(K*b/32), N], qzeros int32 [groups, ceil(N*b/32)],
    scales `scale_dtype` [groups, N], g_idx int32 [K]}. fp16 scales match checkpoints; float32 keeps them exact."""
    _check_bits(art.bits, GPTQ_BITS, "pack_gptq")
    g_idx = art.g_idx.to(torch.int32) if art.g_idx is not None else contiguous_g_idx(
        art.in_features, art.group_size, art.codes.device)
    stored_zeros = (art.zeros.to(torch.int64) - 1) & (2**art.bits - 1)
    return {
        "qweight": pack_bit_stream(art.codes.t(), art.bits),
        "qzeros": pack_bit_stream(stored_zeros, art.bits).t().contiguous(),  # stream along N
        "scales": art.scales.t().to(scale_dtype).contiguous(),
        "g_idx": g_idx.contiguous(),
    }


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int, group_size: int | None,
                zeros_minus_one: bool = True) -> QuantizedWeights:
    """GPTQ tensors (see pack_gptq) -> artifact with fp32 scales; g_idx kept only when it is not the contiguous one.
    zeros_minus_one: qzeros holds zero - 1 (v1, what pack_gptq writes); False: the zero itself (GPTQModel's v2)."""
    _check_bits(bits, GPTQ_BITS, "unpack_gptq")
    missing = {"qweight", "qzeros", "scales", "g_idx"} - set(tensors)
    if missing:
        raise ValueError(f"unpack_gptq: tensors lacks keys {sorted(missing)}; expected qweight, qzeros, scales, g_idx")
    scales = tensors["scales"].float()
    n_groups, N = scales.shape
    g_idx = tensors["g_idx"].to(torch.int32)
    K = g_idx.shape[0]
    codes = unpack_bit_stream(tensors["qweight"], bits, K).t()
    zeros = (unpack_bit_stream(tensors["qzeros"].t(), bits, N).t() + int(zeros_minus_one)) & (2**bits - 1)
    expected_groups = 1 if group_size is None else -(-K // group_size)
    if n_groups != expected_groups:
        raise ValueError(f"unpack_gptq: {n_groups} scale groups do not match in={K} with group_size={group_size}")
    contiguous = contiguous_g_idx(K, group_size, g_idx.device)
    return QuantizedWeights(codes=codes.to(torch.uint8).contiguous(), scales=scales.t().contiguous(),
                            zeros=zeros.t().to(torch.uint8).contiguous(), bits=bits, group_size=group_size,
                            g_idx=None if torch.equal(g_idx, contiguous) else g_idx)


# ------------------------------------------------------------------------------------------------ AWQ
def _awq_interleave(values: torch.Tensor) -> torch.Tensor:
    """[R, N] ints in [0, 16) -> int32 [R, N/8] in AutoAWQ's nibble order."""
    R, N = values.shape
    grouped = values.to(torch.int64).reshape(R, N // 8, 8)[:, :, list(AWQ_ORDER)]
    shifts = 4 * torch.arange(8, device=values.device)
    return _to_int32((grouped << shifts).sum(dim=-1))


def _awq_deinterleave(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] in AutoAWQ's nibble order -> int64 [R, N]."""
    R, C = words.shape
    shifts = 4 * torch.arange(8, device=words.device)
    nibbles = (_to_uint32(words)[:, :, None] >> shifts) & 15  # nibble i = column AWQ_ORDER[i]
    inverse = [AWQ_ORDER.index(j) for j in range(8)]
    return nibbles[:, :, inverse].reshape(R, C * 8)


def pack_awq_gemm(art: QuantizedWeights) -> dict[str, torch.Tensor]:
    """Artifact -> AutoAWQ GEMM tensors {qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales fp16 [K/G, N]}."""
    _check_bits(art.bits, (4,), "pack_awq_gemm")
    if art.g_idx is not None:
        raise ValueError("pack_awq_gemm: act-order g_idx cannot be stored in the AWQ GEMM layout "
                         "(contiguous groups only)")
    if art.group_size is None or art.in_features % art.group_size:
        raise ValueError(f"pack_awq_gemm: group_size={art.group_size} must be an int dividing "
                         f"in_features={art.in_features}")
    if art.out_features % 8:
        raise ValueError(f"pack_awq_gemm: out_features={art.out_features} must be a multiple of 8")
    return {
        "qweight": _awq_interleave(art.codes.t()),
        "qzeros": _awq_interleave(art.zeros.t()),
        "scales": art.scales.t().to(torch.float16).contiguous(),
    }


def unpack_awq_gemm(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> QuantizedWeights:
    """AutoAWQ GEMM tensors (see pack_awq_gemm) -> artifact (fp32 scales, contiguous groups)."""
    _check_bits(bits, (4,), "unpack_awq_gemm")
    K = tensors["qweight"].shape[0]
    if group_size is None or K % group_size:
        raise ValueError(f"unpack_awq_gemm: group_size={group_size} must be an int dividing in_features={K}")
    codes = _awq_deinterleave(tensors["qweight"])
    zeros = _awq_deinterleave(tensors["qzeros"])
    if zeros.shape[0] != K // group_size:
        raise ValueError(f"unpack_awq_gemm: qzeros has {zeros.shape[0]} groups, expected {K // group_size}")
    return QuantizedWeights(codes=codes.t().to(torch.uint8).contiguous(),
                            scales=tensors["scales"].float().t().contiguous(),
                            zeros=zeros.t().to(torch.uint8).contiguous(), bits=bits, group_size=group_size)


# ------------------------------------------------------------------------------------ compressed-tensors
def pack_compressed(art: QuantizedWeights, scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Artifact -> compressed-tensors `pack-quantized` tensors {weight_packed int32 [N, ceil(K*b/32)],
    weight_scale [N, groups], weight_shape int64 [2], weight_zero_point int32 [ceil(N*b/32), groups] unless
    symmetric, weight_g_idx int32 [K] under act-order}. compressed-tensors stores each signed code q as
    q + 2^(b-1) in a dense little-endian bit stream (codes along K, zero points along N): with our unsigned codes
    and zeros, q = code - 2^(b-1) and zp = zero - 2^(b-1), so both are stored as they are. Symmetric means zp = 0."""
    _check_bits(art.bits, tuple(range(1, 9)), "pack_compressed")
    offset = 1 << (art.bits - 1)
    tensors = {"weight_packed": pack_bit_stream(art.codes.t(), art.bits).t().contiguous(),
               "weight_scale": art.scales.to(scale_dtype).contiguous(),
               "weight_shape": torch.tensor([art.out_features, art.in_features], dtype=torch.int64)}
    if art.symmetric:
        if not bool((art.zeros == offset).all()):
            raise ValueError(f"pack_compressed: a symmetric artifact must have zeros {offset} (compressed-tensors "
                             "stores no zero point then)")
    else:
        tensors["weight_zero_point"] = pack_bit_stream(art.zeros, art.bits).contiguous()
    if art.g_idx is not None:
        tensors["weight_g_idx"] = art.g_idx.to(torch.int32).contiguous()
    return tensors


def unpack_compressed(tensors: dict[str, torch.Tensor], bits: int, group_size: int | None,
                      symmetric: bool, aligned: bool = False) -> QuantizedWeights:
    """compressed-tensors `pack-quantized` tensors (see pack_compressed) -> artifact with fp32 scales.
    aligned: the words hold 32 // bits whole values each (compressed-tensors up to 0.17, unpack_aligned), not the
    dense stream (0.18 on, and pack_compressed)."""
    out, inp = (int(v) for v in tensors["weight_shape"].tolist())
    unpack = unpack_aligned if aligned else unpack_bit_stream
    codes = unpack(tensors["weight_packed"].t(), bits, inp).t()
    scales = tensors["weight_scale"].float().reshape(out, -1)
    if "weight_zero_point" in tensors:
        zeros = unpack(tensors["weight_zero_point"], bits, out)
    else:
        zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.int64)
    g_idx = tensors.get("weight_g_idx")
    return QuantizedWeights(codes.to(torch.uint8).contiguous(), scales.contiguous(), zeros.to(torch.uint8).contiguous(),
                            bits, group_size, symmetric=symmetric, g_idx=None if g_idx is None else g_idx.to(torch.int32))


# --------------------------------------------------------------------------------------------- Triton
def triton_group_size(art: QuantizedWeights) -> int | None:
    """The kernel's group size for this artifact (a multiple of 16), or None when the layout cannot express it."""
    if art.bits != 4 or art.g_idx is not None:
        return None
    if art.group_size is None:  # per-channel: one group spanning the 16-padded K
        return -(-art.in_features // 16) * 16
    return art.group_size if art.group_size % 16 == 0 else None


def pack_triton_w4(art: QuantizedWeights) -> dict[str, torch.Tensor]:
    """Artifact -> {qweight int32 [Kp/8, N], scales fp16 [Kp/G, N], zeros fp16 [Kp/G, N]}; Kp = K padded to G."""
    G = triton_group_size(art)
    if G is None:
        raise ValueError(f"pack_triton_w4: needs bits=4, no act-order g_idx and group_size a multiple of 16 or None; "
                         f"got bits={art.bits}, group_size={art.group_size}, "
                         f"g_idx={'set' if art.g_idx is not None else None}")
    K, n_groups = art.in_features, -(-art.in_features // G)
    Kp = n_groups * G
    codes = torch.nn.functional.pad(art.codes.t(), (0, 0, 0, Kp - K))  # padded rows: code 0 (masked in the kernel)
    scales = art.scales.t().to(torch.float16)
    if not torch.isfinite(scales).all():
        raise ValueError("pack_triton_w4: a scale overflows fp16")
    return {"qweight": pack_bit_stream(codes, 4), "scales": scales.contiguous(),
            "zeros": art.zeros.t().to(torch.float16).contiguous()}


# -------------------------------------------------------------------------------------------- CPU int4
def cpu_int4_group_size(art: QuantizedWeights) -> int | None:
    """Kernel group size g for torch's CPU int4 op, or None when it cannot run this artifact (see pack_cpu_int4).

    g must divide our group size G so that no kernel group straddles two of ours. Among those, the largest that
    also divides in_features is preferred: then K needs no padding, so activations are not padded every call
    (e.g. SmolLM2's K=576 at G=128 runs as g=64, not as g=128 over a K padded to 640).
    """
    if art.bits != 4 or art.g_idx is not None or art.out_features % 16:
        return None
    G = art.group_size
    candidates = [g for g in CPU_INT4_GROUP_SIZES if G is None or G % g == 0]
    if not candidates:
        return None
    K = art.in_features
    return next((g for g in candidates if K % g == 0), candidates[-1] if G is None else candidates[0])


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Our own 4-bit layout: codes uint8 [N, K] in [0, 16) -> uint8 [N, ceil(K/2)], byte j = q[2j] | q[2j+1] << 4."""
    N, K = codes.shape
    padded = torch.nn.functional.pad(codes.to(torch.uint8), (0, K % 2))
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of pack_nibbles: uint8 [N, ceil(K/2)] -> uint8 [N, K]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)[:, :in_features]


def pack_cpu_int4(art: QuantizedWeights, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Artifact -> torch's opaque int4 pack for its op, plus the artifact itself in our own layout.

    {qweight uint8 (torch's pack of [N, Kp]; its byte layout depends on the CPU kernel family and is never read
    back), scales_and_zeros `dtype` [Kp/g, N, 2] (the op's parameters), codes uint8 [N, ceil(K/2)] (pack_nibbles),
    scales fp32 [N, n_groups], zeros uint8 [N, n_groups] (the artifact's, exact: the dense path dequantizes them)}.

    torch's op computes W = (q - 8) * scale + zero with a float zero, so our integer zero point z maps
    exactly (up to one rounding in `dtype`) to zero = (8 - z) * scale. Each kernel group of size g
    (cpu_int4_group_size) takes the parameters of the group of ours it lies in (also how per-channel is
    expressed); K is zero-padded to a multiple of g only when g does not divide it (the matching activations
    are then zero-padded at run time).
    bf16 is the dtype with a fast kernel on CPU (fp32/fp16 inputs take a slow path); fp32 is exact.
    """
    g = cpu_int4_group_size(art)
    if g is None:
        raise ValueError(f"pack_cpu_int4: needs bits=4, no act-order g_idx, out_features % 16 == 0 and group_size a "
                         f"multiple of one of {list(CPU_INT4_GROUP_SIZES)} (or None); got bits={art.bits}, "
                         f"group_size={art.group_size}, out_features={art.out_features}")
    K = art.in_features
    Kp = -(-K // g) * g
    codes = torch.nn.functional.pad(art.codes.to(torch.int32), (0, Kp - K))
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    scale = art.scales.float()
    zero = (8 - art.zeros.float()) * scale
    ours = (torch.arange(Kp // g) * g) // (art.group_size or Kp)  # our group of each kernel group
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1)[ours]
    # Kp = 2 * qweight.shape[1] and g = Kp / scales_and_zeros.shape[0]: both recoverable, so not stored
    return {"qweight": weight, "scales_and_zeros": scales_and_zeros.to(dtype).contiguous(),
            "codes": pack_nibbles(art.codes), "scales": scale.contiguous(), "zeros": art.zeros.to(torch.uint8).contiguous()}
