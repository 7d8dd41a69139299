"""Config composition: typos and bad values fail before any model loads, naming key and allowed values."""
import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from harness.config import ConfigError, RunConfig, register_configs

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
register_configs()


def make_config(*overrides: str) -> RunConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def test_defaults_compose():
    cfg = make_config()
    assert cfg.model.name == "smollm2_135m" and cfg.method.name == "rtn"
    assert (cfg.bits, cfg.group_size, cfg.symmetric) == (4, 128, False)
    assert cfg.eval.ppl_sets == ["wiki", "code", "prose"]


@pytest.mark.parametrize("method", ["fp", "rtn"])
def test_methods_compose(method):
    assert make_config(f"method={method}").method.name == method


def test_minus_one_is_per_channel():
    assert make_config("group_size=-1").group_size is None
    assert make_config("group_size=null").group_size is None


@pytest.mark.parametrize("override, key", [
    ("bits=5", "bits"), ("group_size=0", "group_size"), ("device=tpu", "device"),
    ("eval.ppl_sets=[wiki,nope]", "eval.ppl_sets"), ("calib.source=nope", "calib.source"),
    ("calib.n_samples=0", "calib.n_samples"), ("eval.max_windows=0", "eval.max_windows"),
    ("model.dtype=int8", "model.dtype"), ("method.range_rule=absmax", "method.range_rule"),
    ("kernel=cuda_magic", "kernel"),
])
def test_bad_values_name_the_key_and_allowed_values(override, key):
    with pytest.raises(ValueError, match=rf"{key}=.*allowed values"):  # ConfigError or a method's own
        make_config(override)


def test_hf_model_needs_a_path():
    with pytest.raises(ConfigError, match="model.path"):
        make_config("model=hf")


def test_textfile_source_needs_a_path_when_used():
    with pytest.raises(ConfigError, match="data.sources.textfile.path"):
        make_config("eval.ppl_sets=[textfile]")


@pytest.mark.parametrize("override", ["bitz=3", "method.damp=0.1", "eval.windows=3", "bits=four"])
def test_typos_and_wrong_types_fail_at_compose_time(override):
    with pytest.raises(ConfigCompositionException):
        make_config(override)


def test_unknown_method_lists_available():
    with pytest.raises(ConfigCompositionException, match="rtn"):
        make_config("method=magic")


def test_calib_seed_is_the_draw_and_nothing_else():
    """calib.seed draws the calibration windows only: runs that differ in it share `replicate_of` (one configuration,
    several draws) and differ in their run id; calib.seed=null is the run's seed and keeps older run ids."""
    from harness.identity import config_hash, replicate_of, run_id

    base = make_config("method=gptq")
    draws = [make_config("method=gptq", f"calib.seed={k}") for k in (0, 1, 2)]
    assert base.calib_seed == 0 and [c.calib_seed for c in draws] == [0, 1, 2]
    assert len({run_id(c) for c in draws}) == 3
    assert len({replicate_of(c) for c in [base, *draws]}) == 1
    assert replicate_of(make_config("method=gptq", "bits=3")) != replicate_of(base)
    assert make_config("method=gptq", "seed=7").calib_seed == 7
    # the hash of a config that leaves calib.seed unset is the one it had before calib.seed existed
    assert config_hash(base) == config_hash(make_config("method=gptq", "calib.seed=null"))
    with pytest.raises(ConfigError, match="calib.seed=.*allowed values"):
        make_config("calib.seed=-1")
