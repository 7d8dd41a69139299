"""The configs of `method=awq` and `method=awq_gptq` (Hydra schemas; checked when the run config is built)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from methods.base import min_tokens
from methods.gptq import GPTQConfig


@dataclass(frozen=True)
class AWQConfig:
    """`method=awq`. Defaults are AutoAWQ 0.2.9's.

    n_grid: alpha grid {0, 1/n_grid, ..., (n_grid-1)/n_grid} for the scale search.
    duo_scaling: True = AutoAWQ's s = x_mean^a / w_mean^(1-a); False = llm-awq's activation-only s = x_mean^a.
    auto_scale / auto_clip: run the scale search / the clip search.
    clip_grid, clip_max_shrink: clip candidates max_val = amax * (1 - i/clip_grid), i < clip_grid * clip_max_shrink.
    clip_n_tokens: tokens subsampled (evenly strided) for the clip loss; None = all calibration tokens.
    batch_size: calibration samples per forward inside the searches (memory knob; results do not depend on it).
    load_search: path of a saved awq_search.pt to re-apply instead of searching (calibration data is then unused).
    moe_min_tokens: a routed expert whose inputs hold fewer calibration tokens than this ("0.5%" of them, or a count
        such as "64"; null: "0.5%") gets no scale or clip search of its own and is rounded to nearest after the experts' shared
        gate/up scale (counted in the rows, warned about).
    scale_router: fold the experts' shared gate/up scale into the router's input columns too, so the routing of the
        folded model is the original's (null or true, the default). False reproduces AutoAWQ's Mixtral, which leaves the router
        unscaled: it then sees x / s and routes differently (docs/awq.md).
    """

    name: str = "awq"
    n_grid: int = 20
    duo_scaling: bool = True
    auto_scale: bool = True
    auto_clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_n_tokens: Optional[int] = 512
    batch_size: int = 8
    load_search: Optional[str] = None
    moe_min_tokens: Optional[str] = None
    scale_router: Optional[bool] = None

    def __post_init__(self) -> None:
        for key in ("n_grid", "clip_grid", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"method.{key}={value!r} must be an integer >= 1")
        if not 0.0 <= self.clip_max_shrink < 1.0:
            raise ValueError(f"method.clip_max_shrink={self.clip_max_shrink!r} must be in [0, 1) "
                             "(1 would clip weights to zero)")
        if self.clip_n_tokens is not None and (not isinstance(self.clip_n_tokens, int) or self.clip_n_tokens < 1):
            raise ValueError(f"method.clip_n_tokens={self.clip_n_tokens!r} must be an integer >= 1 "
                             "or None (all tokens)")
        min_tokens(self.moe_min_tokens, 1)  # the value parses
        if self.load_search is not None and not str(self.load_search).strip():
            raise ValueError("method.load_search is an empty string; give a path to awq_search.pt or leave it None")


def _gptq_half() -> GPTQConfig:
    # AWQ's quantizer range, the one the clip thresholds were searched for ("minmax_zero" = GPTQ's own)
    return GPTQConfig(range_rule="minmax")


@dataclass(frozen=True)
class AWQGPTQConfig:
    """`method=awq_gptq`: AWQ's scale + clip search (and fold), then GPTQ instead of round-to-nearest.

    `awq` and `gptq` are the two methods' own configs (method.awq.n_grid=..., method.gptq.desc_act=...);
    the GPTQ half defaults to AWQ's "minmax" quantizer range.
    """

    name: str = "awq_gptq"
    awq: AWQConfig = field(default_factory=AWQConfig)
    gptq: GPTQConfig = field(default_factory=_gptq_half)
