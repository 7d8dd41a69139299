"""The packaged model, end to end on a few short windows (the real checkpoint, real data)."""
import pytest

from harness.run import execute
from test_config import make_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def packaged_ppl(tmp_path_factory):
    results_dir = tmp_path_factory.mktemp("results")

    def ppl(*overrides):
        cfg = make_config("eval.seqlen=256", "eval.max_windows=4", "eval.ppl_sets=[wiki,code]", "device=cpu",
                          f"results_dir={results_dir}", *overrides)
        frame = execute(cfg)
        rows = frame[(frame.suite == "ppl") & (frame.metric == "ppl")]
        return dict(zip(rows.task, rows.value))

    return ppl


def test_packaged_model_quality_orders_fp_w4_w3(packaged_ppl):
    fp = packaged_ppl("method=fp")
    w4 = packaged_ppl("method=rtn", "bits=4", "group_size=128")
    w3 = packaged_ppl("method=rtn", "bits=3", "group_size=128")
    for name in ("wiki", "code"):
        assert 1 < fp[name] < w4[name] < w3[name], (name, fp, w4, w3)
    assert fp["wiki"] < 60  # a working language model on Wikipedia text, not a random one (vocab 49152)
