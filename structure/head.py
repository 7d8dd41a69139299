"""The output end of a causal LM, taken apart: the input of the output layer (lm_head) and its logits in chunks of
positions.

One window's full logits are positions x vocabulary: 2048 x 262144 fp32 is 2 GiB for the Gemma 3 family, and a
log-softmax copies them. Evaluators capture the lm_head input instead (positions x hidden) and turn it into logits a
chunk of positions at a time, so their memory is the weights plus one chunk, whatever the vocabulary.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

# Elements of one chunk of logits (64 MiB in fp32): small enough to stay near the cache, large enough that the
# lm_head product runs at full speed. A window whose logits fit is one chunk: the same product as the model's own.
CHUNK_ELEMENTS = 1 << 24
# Elements of the logits the per-token statistics handle at once (8 MiB in fp32: cache-sized pieces of a chunk measured
# ~0.3 s per 2048-token window faster than whole chunks with SmolLM2's 49k vocabulary).
STATS_ELEMENTS = 1 << 21


class _Captured(Exception):
    """Raised by the lm_head pre-hook: the logits of the whole window are never computed."""


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


@torch.no_grad()
def lm_head_inputs(model: nn.Module, ids: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """The input of `model`'s output layer on ids [batch, L] -> [batch, L, hidden] (the final norm's output; at least
    fp32). The model's own forward produces it (with `forward_kwargs`, e.g. a custom attention mask and positions),
    so every family's pre- and post-processing is the model's own."""
    found: list[torch.Tensor] = []

    def capture(module, args):
        found.append(at_least_fp32(args[0].detach()))
        raise _Captured

    handle = model.get_output_embeddings().register_forward_pre_hook(capture)
    try:
        model(ids, use_cache=False, **forward_kwargs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not found:
        raise RuntimeError(f"{type(model).__name__}: the forward never reached its output layer")
    return found[0]


def lm_head_input(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """lm_head_inputs of one sequence: ids [1, L] -> [L, hidden]."""
    return lm_head_inputs(model, ids)[0]


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (at least fp32) of lm_head inputs [n, hidden] through `model`'s output layer and its final logit
    soft-capping (Gemma 2/3), as the model's own forward computes them."""
    head = model.get_output_embeddings()
    logits = head(hidden.to(head.weight.device, head.weight.dtype)[None])[0]
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return at_least_fp32(logits)


def position_chunks(length: int, vocab: int, elements: int | None = None) -> Iterator[slice]:
    """Slices of `length` positions, each holding at most `elements` (default CHUNK_ELEMENTS) logits, at least one
    position."""
    step = max(1, (elements or CHUNK_ELEMENTS) // max(1, vocab))
    for start in range(0, length, step):
        yield slice(start, min(length, start + step))


def stats_pieces(length: int, vocab: int) -> Iterator[slice]:
    """Slices of a chunk's `length` positions for the per-token statistics (STATS_ELEMENTS logits each)."""
    return position_chunks(length, vocab, STATS_ELEMENTS)
