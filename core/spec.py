"""The shared vocabulary: what to quantize to (QuantSpec) and what every method returns per layer (QuantizedWeights).

Evaluation, export and the packed kernels consume the artifact alone, so none of them needs to know which
method produced it. Torch only; imports nothing of the project.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def group_index(in_features: int, group_size: int | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 [in]: the contiguous group of each input column (column i -> i // group_size; all 0 per-channel).
    The one definition of contiguous grouping; the last group is shorter when group_size does not divide."""
    if group_size is None:
        return torch.zeros(in_features, dtype=torch.long, device=device)
    return torch.arange(in_features, device=device) // group_size


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize to: bit-width, group size (None = one group per output row) and symmetry."""

    bits: int
    group_size: int | None
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; allowed values: {list(SUPPORTED_BITS)}")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size} must be a positive integer or None (per-channel)")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def n_groups(self, in_features: int) -> int:
        """Number of groups along the input dimension; the last one is shorter when it does not divide."""
        return 1 if self.group_size is None else -(-in_features // self.group_size)

    def has_short_group(self, in_features: int) -> bool:
        return self.group_size is not None and in_features % self.group_size != 0

    def tag(self) -> str:
        """Short human label, e.g. 'w4g128', 'w3gC' (per-channel), with an 's' suffix when symmetric."""
        g = "C" if self.group_size is None else str(self.group_size)
        return f"w{self.bits}g{g}" + ("s" if self.symmetric else "")


@dataclass
class QuantizedWeights:
    """The per-layer artifact every method returns.

    W_hat[o, i] = (codes[o, i] - zeros[o, g(i)]) * scales[o, g(i)], with g = group_index().

    codes:  uint8 [out, in], values in [0, 2^bits - 1]
    scales: float32 [out, n_groups]
    zeros:  uint8 [out, n_groups], integer zero points in [0, 2^bits - 1]
    g_idx:  int32 [in] or None; None means contiguous groups, column i in group i // group_size
            (act-order GPTQ records an explicit g_idx).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int | None
    symmetric: bool = False
    g_idx: torch.Tensor | None = None
    # Bits per weight as a checkpoint's format stores this layer (GGUF Q4_0: 4.5, one fp16 scale per 32 and no zero);
    # None: our own layout, storage_bits_per_weight()'s count.
    stored_bits: float | None = None

    def __post_init__(self) -> None:
        out, inp = self.codes.shape
        if self.scales.shape != self.zeros.shape or self.scales.shape[0] != out:
            raise ValueError(f"scales {tuple(self.scales.shape)} / zeros {tuple(self.zeros.shape)} do not match codes {(out, inp)}")
        if self.g_idx is not None and self.g_idx.shape != (inp,):
            raise ValueError(f"g_idx has shape {tuple(self.g_idx.shape)}, expected ({inp},)")

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def has_short_group(self) -> bool:
        return self.group_size is not None and self.in_features % self.group_size != 0

    def group_index(self) -> torch.Tensor:
        """int64 [in]: the group of each input column."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return group_index(self.in_features, self.group_size, self.codes.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in] weights in `dtype` (the fake-quantized weight every evaluation uses): s * (code - z) in fp32.

        Contiguous groups broadcast their scale and zero over a [out, groups, width] view of one fp32 buffer,
        in place: one [out, in] allocation instead of five (a streamed 13B block is 317M weights)."""
        w = self.codes.float()
        zeros, scales = self.zeros.float(), self.scales.float()
        if self.g_idx is not None:
            g = self.g_idx.long()
            w.sub_(zeros[:, g]).mul_(scales[:, g])
            return w.to(dtype)
        width = self.in_features if self.group_size is None else self.group_size
        n_full = self.in_features // width
        if n_full:
            full = w[:, :n_full * width].unflatten(1, (n_full, width))
            full.sub_(zeros[:, :n_full, None]).mul_(scales[:, :n_full, None])
        if n_full * width < self.in_features:  # the short last group
            w[:, n_full * width:].sub_(zeros[:, n_full:]).mul_(scales[:, n_full:])
        return w.to(dtype)

    def storage_bits_per_weight(self, scale_bits: int = 16) -> float:
        """Average bits per weight including one fp16 scale and one `bits`-wide zero per group (or what the
        checkpoint this artifact was read from stores, `stored_bits`)."""
        if self.stored_bits is not None:
            return self.stored_bits
        per_group = scale_bits + self.bits
        return self.bits + per_group * self.n_groups / self.in_features

    def to(self, device: torch.device | str) -> "QuantizedWeights":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeights(move(self.codes), move(self.scales), move(self.zeros), self.bits,
                                self.group_size, self.symmetric, move(self.g_idx), self.stored_bits)

    def __getstate__(self) -> dict:
        """Pickled (torch.save: cache entries, a streamed run's artifact files) with the codes packed at `bits` bits
        each, not one byte: a 3-bit artifact of 317M weights is 119 MB on disk instead of 317 MB."""
        state = dict(self.__dict__)
        state["codes"] = (pack_codes(self.codes.cpu(), self.bits), tuple(self.codes.shape))
        return state

    def __setstate__(self, state: dict) -> None:
        packed, shape = state["codes"]
        self.__dict__.update(state, codes=unpack_codes(packed, state["bits"], shape))


@dataclass
class DequantizedWeights:
    """A checkpoint's layer whose format has no codes/scales/zeros form (GGUF Q4_1's float minimum, a K-quant's
    two-level scales): carried as its dequantized weight, with the format's name and what it stores per weight.
    Fake-quant evaluates it like any artifact; packed kernels and export refuse it, naming the format.

    weight: float32 [out, in], exactly what the format's own dequantization gives.
    bits, group_size: the format's nominal code width and block size (Q4_K: 4 and 32), for labels only.
    """

    weight: torch.Tensor
    format: str
    stored_bits: float
    bits: int
    group_size: int | None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype)

    def storage_bits_per_weight(self) -> float:
        return self.stored_bits

    def to(self, device: torch.device | str) -> "DequantizedWeights":
        return DequantizedWeights(self.weight.to(device), self.format, self.stored_bits, self.bits, self.group_size)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (each < 2^bits) -> a uint8 stream of ceil(numel * bits / 8) bytes, little-endian bit order."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    if flat.numel() and int(flat.max()) >> bits:
        raise ValueError(f"codes do not fit in {bits} bits (max {int(flat.max())})")
    if 8 % bits == 0:  # 2 or 4 bits: whole codes per byte
        per = 8 // bits
        flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % per)).view(-1, per)
        out = torch.zeros(flat.shape[0], dtype=torch.uint8)
        for k in range(per):
            out |= flat[:, k] << (bits * k)
        return out
    import numpy as np  # 3 bits: a bit stream

    planes = (flat[:, None] >> torch.arange(bits, dtype=torch.uint8)) & 1
    return torch.from_numpy(np.packbits(planes.numpy().reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of pack_codes: uint8 codes of `shape`."""
    numel = math.prod(shape)
    if bits == 8:
        return packed.reshape(shape).clone()
    if 8 % bits == 0:
        per = 8 // bits
        parts = [(packed >> (bits * k)) & (2**bits - 1) for k in range(per)]
        return torch.stack(parts, dim=1).reshape(-1)[:numel].reshape(shape).contiguous()
    import numpy as np

    planes = np.unpackbits(packed.numpy(), bitorder="little")[:numel * bits].reshape(numel, bits)
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    return torch.from_numpy((planes * weights).sum(axis=1, dtype=np.uint8)).reshape(shape)
