"""The packaged model, end to end on a few short windows (the real checkpoint, real data)."""
import pytest

from harness.run import execute
from test_config import make_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def packaged_ppl(tmp_path_factory):
    results_dir = tmp_path_factory.mktemp("results")

    def ppl(*overrides):
        cfg = make_config("eval=ppl", "eval.seqlen=256", "eval.max_windows=4", "eval.ppl_sets=[wiki,code]", "device=cpu",
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


def test_packed_cpu_int4_model_matches_fake_quant_perplexity(packaged_ppl):
    """The packed model end to end: 210 QuantLinear layers on torch's int4 kernel (bf16 activations)."""
    fake = packaged_ppl("method=rtn", "bits=4", "group_size=128")
    packed = packaged_ppl("method=rtn", "bits=4", "group_size=128", "kernel=cpu_int4")
    for name in fake:
        assert packed[name] == pytest.approx(fake[name], rel=0.01), (name, fake, packed)


def test_the_packaged_gguf_judged_as_a_checkpoint_is_its_own_base_model(packaged_ppl, tmp_path):
    """The real llama.cpp file the packaged model comes from, read by the GGUF reader (q/k rows permuted back, its
    Q4_1 linears carried dequantized, its Q8_0 embedding table): the same weights as the converted base model, so
    the same perplexity to the last bit."""
    from harness.models import packaged_gguf_path

    fp = packaged_ppl("method=fp")
    gguf = packaged_ppl("method=checkpoint", f"method.path={packaged_gguf_path()}")
    assert gguf == fp
