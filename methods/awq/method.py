"""AWQ (Lin et al., 2024): activation-aware per-channel scaling + weight clipping, then the AWQ quantizer.

Per decoder block, as in llm-awq / AutoAWQ:
1. run the full-precision block once, recording the inputs of its linears; that output feeds the next block;
2. for every scaling group of the architecture table, grid-search s over alpha (weights restored between
   trials); all groups are searched on the unscaled block, then folded together (prev op /= s, layers *= s);
3. search a clipping threshold per (output row, group) on the scaled weights and scaled inputs; clamp;
4. quantize every linear with the min/max quantizer.
The searched scales and clips form an `AWQSearch`, which can be saved and re-applied without searching.
"""
from __future__ import annotations

from methods.awq.apply import apply_search, folded_tensors
from methods.awq.config import AWQConfig, AWQGPTQConfig
from methods.awq.search import run_awq_search
from methods.awq.state import SEARCH_FILE, AWQSearch
from methods.base import Method, QuantizationResult, register_method
from methods.gptq import GPTQ
from methods.rtn import quantize_block


@register_method("awq", AWQConfig)
class AWQ(Method):
    """Searches (or loads) scales and clips, folds them into the model in place, returns min/max artifacts, the
    folded norms and biases, and the search itself (extras[SEARCH_FILE], re-appliable with method.load_search)."""

    needs_calibration = True

    def quantize_blocks(self, pipeline, spec, calib) -> QuantizationResult:
        layout = pipeline.layout
        stats, routing = {}, {}
        if self.config.load_search is not None:
            search, artifacts = load_search(self.config.load_search, pipeline, spec, on_block=lambda block, prefix:
                                            quantize_block(block, prefix, layout, spec, device=pipeline.device))
        else:
            search, artifacts, stats, routing = run_awq_search(
                pipeline, spec, calib, self.config,
                on_block=lambda ctx: quantize_block(ctx.block, ctx.prefix, layout, spec))
        return QuantizationResult(artifacts, modified=folded_tensors(pipeline, search), stats=stats,
                                  extras={SEARCH_FILE: search.to_state()}, routing=routing)


@register_method("awq_gptq", AWQGPTQConfig)
class AWQGPTQ(Method):
    """AWQ search (or a loaded one) applied over the whole model first, then a standard GPTQ pass over the
    transformed model (its blocks see quantized outputs, as GPTQ's do): the AWQ + GPTQ recipe of llm-awq."""

    needs_calibration = True

    def quantize_blocks(self, pipeline, spec, calib) -> QuantizationResult:
        awq_config = self.config.awq
        if awq_config.load_search is not None:
            search, _ = load_search(awq_config.load_search, pipeline, spec)
        else:
            search = run_awq_search(pipeline, spec, calib, awq_config, desc="awq_gptq: awq")[0]
        modified = folded_tensors(pipeline, search)  # GPTQ below changes linear weights only, which artifacts cover
        gptq = GPTQ(self.config.gptq).quantize_blocks(pipeline, spec, calib)
        return QuantizationResult(gptq.artifacts, modified=modified, stats=gptq.stats,
                                  extras={SEARCH_FILE: search.to_state()}, routing=gptq.routing)


def load_search(path: str, pipeline, spec, on_block=None) -> tuple[AWQSearch, dict]:
    """Read a saved search, check that it fits this model and spec, and apply it in place, block by block:
    (the search, the artifacts `on_block(block, prefix)` returned for each block after)."""
    search = AWQSearch.load(path)
    search.check_matches(pipeline.model, pipeline.layout, spec)
    return search, apply_search(pipeline, search, on_block)
