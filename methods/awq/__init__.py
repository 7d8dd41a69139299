"""AWQ (`method=awq`) and AWQ + GPTQ (`method=awq_gptq`), one job per module:

- `maths`: pure tensor maths of the two searches (scale formulas, clip search, folding into a norm);
- `config`: the two methods' configs;
- `state`: the searched parameters (AWQSearch) and their file format (awq_search.pt);
- `apply`: folding scales and clamping clips into a model in place;
- `search`: the block-by-block search driver;
- `method`: the registered methods, read as numbered steps.
"""
from methods.awq.apply import apply_clips, apply_scales, apply_search, folded_tensors
from methods.awq.config import AWQConfig, AWQGPTQConfig
from methods.awq.method import AWQ, AWQGPTQ
from methods.awq.state import SEARCH_FILE, AWQSearch, BlockSearch, GroupScale

__all__ = ["AWQ", "AWQGPTQ", "AWQConfig", "AWQGPTQConfig", "AWQSearch", "BlockSearch", "GroupScale", "SEARCH_FILE",
           "apply_clips", "apply_scales", "apply_search", "folded_tensors"]
