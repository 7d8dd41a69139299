"""Log-likelihood requests of lm-eval, scored with one forward of each document's context.

A multiple-choice document asks for log P(choice | context) for every choice. lm-eval's HFLM runs context + choice
once per choice and turns every position of the padded batch into full-vocabulary log-probabilities. Here, the
requests that share a context are packed into one sequence, the context followed by every choice:

    tokens     c0 c1 c2 c3 | a0 a1 | b0 b1 b2        (the last token of each choice is predicted, never input)
    positions   0  1  2  3 |  4  5 |  4  5  6
    attends to  the context causally; a choice sees the context and its own earlier tokens, never another choice

so each choice's positions get exactly the hidden states they would get on their own (masked keys weigh exactly
0), the context is computed once instead of once per choice (about half the tokens of the quick eval's tasks),
and the output layer runs only at the positions whose next token is scored (a third of them). The results equal
lm-eval's to float tolerance, and every run checks that on its first shared document against the plain forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from structure.head import head_logits, lm_head_inputs, position_chunks

# The first shared document is scored both ways; its log-likelihoods must agree within this (batching alone moves
# them ~2e-5 on SmolLM2; a model whose forward ignores the custom mask or the positions is off by whole nats).
SELF_CHECK_ATOL = 1e-3

# Attention implementations whose custom 4D masks we know how to write: a boolean mask (True attends) for SDPA, an
# additive one for the eager path.
MASK_KINDS = ("sdpa", "eager")


class SharedContextMismatch(RuntimeError):
    """The packed forward disagrees with the plain one on this model; lm_eval.share_context=false avoids it."""


@dataclass
class _Packed:
    """One context with the requests that continue it, laid out as one sequence."""

    context: list[int]
    requests: list[int]          # indices into the request list, in packing order
    continuations: list[list[int]]

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)

    def layout(self) -> tuple[list[int], list[int], list[int], list[list[int]]]:
        """(tokens, positions, segment of each token (0: context), rows whose output scores each request)."""
        tokens, positions, segments = list(self.context), list(range(len(self.context))), [0] * len(self.context)
        rows = []
        for seg, cont in enumerate(self.continuations, start=1):
            start = len(tokens)
            tokens += cont[:-1]
            positions += range(len(self.context), len(self.context) + len(cont) - 1)
            segments += [seg] * (len(cont) - 1)
            rows.append([len(self.context) - 1, *range(start, len(tokens))])
        return tokens, positions, segments, rows


def pack_requests(requests: list[tuple], max_length: int) -> list[_Packed]:
    """Group (request, context tokens, continuation tokens) by context, as lm-eval truncates them (from the left, to
    max_length + 1 tokens of context + continuation), into packed sequences of at most max_length tokens."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (_, context, continuation) in enumerate(requests):
        if not context or not continuation or len(continuation) > max_length:
            raise ValueError(f"log-likelihood request {i}: context of {len(context)} and continuation of "
                             f"{len(continuation)} tokens (both must be non-empty, the continuation <= {max_length})")
        whole = (context + continuation)[-(max_length + 1):]
        by_context.setdefault(tuple(whole[:-len(continuation)]), []).append(i)
    packs = []
    for context, members in by_context.items():
        pack = _Packed(list(context), [], [])
        for i in members:
            continuation = requests[i][2]
            if pack.requests and pack.length + len(continuation) - 1 > max_length:
                packs.append(pack)
                pack = _Packed(list(context), [], [])
            pack.requests.append(i)
            pack.continuations.append(continuation)
        packs.append(pack)
    return packs


def batch_inputs(packs: list[_Packed], mask_kind: str | None, dtype: torch.dtype, device: torch.device):
    """(ids [B, T], position_ids [B, T], 4D attention mask [B, 1, T, T], rows per pack) of packed sequences, right
    padded. Padding positions attend only to themselves (no row of the mask is empty). Without a mask kind: ids and
    rows only (positions and mask None), for the plain causal forward."""
    layouts = [p.layout() for p in packs]
    width = max(len(tokens) for tokens, *_ in layouts)
    ids = torch.zeros(len(packs), width, dtype=torch.long)
    positions = torch.zeros(len(packs), width, dtype=torch.long)
    segments = torch.full((len(packs), width), -1, dtype=torch.long)
    for b, (tokens, pos, seg, _) in enumerate(layouts):
        ids[b, :len(tokens)] = torch.tensor(tokens)
        positions[b, :len(tokens)] = torch.tensor(pos)
        segments[b, :len(tokens)] = torch.tensor(seg)
    rows = [rows for *_, rows in layouts]
    if mask_kind is None:
        return ids.to(device), None, None, rows
    q, k = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(width, dtype=torch.bool) & (q < 0)
    mask = allowed[:, None]
    if mask_kind == "eager":
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    return ids.to(device), positions.to(device), mask.to(device), rows


class SharedContextLM(HFLM):
    """HFLM whose log-likelihood requests share one forward per context (module docstring). Seq2seq models, mixed
    precision, automatic batch sizes and attention implementations other than SDPA and eager go through HFLM's
    own loop. batch_size counts packed contexts (documents) per forward."""

    checked = False

    def _mask_kind(self) -> str | None:
        kind = getattr(self.model.config, "_attn_implementation", None)
        usable = (self.backend == "causal" and self.mixed_precision_dtype is None and self.batch_size != "auto"
                  and kind in MASK_KINDS)
        return kind if usable else None

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        mask_kind = self._mask_kind()
        if mask_kind is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        packs = sorted(pack_requests(requests, self.max_length), key=lambda p: -p.length)
        if not self.checked and (shared := next((p for p in packs if len(p.requests) > 1), None)) is not None:
            self._self_check(requests, shared, mask_kind)
        size = int(override_bs or self.batch_size)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="loglikelihood (shared contexts)")
        for start in range(0, len(packs), size):
            batch = packs[start:start + size]
            for i, answer in self._score(requests, batch, mask_kind):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(sum(len(p.requests) for p in batch))
        bar.close()
        return results

    def _score(self, requests, batch: list[_Packed], mask_kind: str) -> list[tuple[int, tuple[float, bool]]]:
        """(request index, (log-likelihood, greedy)) of every request in the packed batch."""
        # nothing shared (rolling windows): the plain causal forward on right-padded ids, no T x T mask to build
        shared = any(len(p.requests) > 1 for p in batch)
        ids, positions, mask, rows = batch_inputs(batch, mask_kind if shared else None, self.model.dtype, self.device)
        packing = {"position_ids": positions, "attention_mask": mask} if shared else {}
        hidden = lm_head_inputs(self.model, ids, **packing)
        picked, targets, owners = [], [], []
        for b, (pack, pack_rows) in enumerate(zip(batch, rows)):
            for i, cont, at in zip(pack.requests, pack.continuations, pack_rows):
                picked.append(hidden[b, at])
                targets += cont
                owners.append((i, len(cont)))
        return self._answers(torch.cat(picked), torch.tensor(targets, device=hidden.device), owners)

    def _answers(self, hidden: torch.Tensor, targets: torch.Tensor, owners: list[tuple[int, int]]):
        """Per request: the sum of its tokens' log-probabilities and whether every token was the argmax, from the
        output layer on the scored rows only, a chunk of rows at a time."""
        vocab = self.model.get_output_embeddings().weight.shape[0]
        logprob = torch.empty(len(targets), dtype=torch.float64)
        greedy = torch.empty(len(targets), dtype=torch.bool)
        for chunk in position_chunks(len(targets), vocab):
            logits = F.log_softmax(head_logits(self.model, hidden[chunk]), dim=-1, dtype=self.softmax_dtype)
            target = targets[chunk, None]
            logprob[chunk] = logits.gather(-1, target)[:, 0].double().cpu()
            greedy[chunk] = (logits.argmax(-1, keepdim=True) == target)[:, 0].cpu()
        answers, offset = [], 0
        for i, n in owners:
            answers.append((i, (float(logprob[offset:offset + n].sum()), bool(greedy[offset:offset + n].all()))))
            offset += n
        return answers

    def _self_check(self, requests, pack: _Packed, mask_kind: str) -> None:
        """Score one shared context packed and each of its requests on its own (plain causal forward); they must
        agree, or this model's forward does not honour the custom mask and positions."""
        packed = dict(self._score(requests, [pack], mask_kind))
        for i, cont in zip(pack.requests, pack.continuations):
            ids = torch.tensor([pack.context + cont[:-1]], device=self.device)
            hidden = lm_head_inputs(self.model, ids)[0, len(pack.context) - 1:]
            (_, (alone, _)), = self._answers(hidden, torch.tensor(cont, device=hidden.device), [(i, len(cont))])
            if not abs(packed[i][0] - alone) <= SELF_CHECK_ATOL:
                raise SharedContextMismatch(
                    f"{type(self.model).__name__}: a choice scored inside its document's shared forward has "
                    f"log-likelihood {packed[i][0]:.6g}, on its own {alone:.6g} (allowed difference "
                    f"{SELF_CHECK_ATOL:g}); this model's forward does not honour a custom attention mask and "
                    "positions: run with lm_eval.share_context=false")
        self.checked = True
