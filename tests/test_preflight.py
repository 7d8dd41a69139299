"""The preflight: bad input fails before any expensive work, as one `config error` line (exit 2), writing nothing."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import random_text, tiny_model
from harness.config import ConfigError
from harness.run import cache_dir_of, preflight
from test_config import make_config
from test_run import tiny_run_overrides

ROOT = Path(__file__).resolve().parent.parent


def check(*overrides: str) -> None:
    cfg = make_config(*overrides)
    preflight(cfg, cache_dir_of(cfg), torch.device("cpu"))


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True, env=env)


def one_config_error(proc) -> str:
    """The run exited 2 with exactly one `config error` line and no traceback; that line."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if "config error" in line]
    assert len(lines) == 1, out[-3000:]
    return lines[0]


@pytest.fixture
def file_in_the_way(tmp_path):
    """A regular file: a directory under it cannot be created, not even by root."""
    path = tmp_path / "a_regular_file"
    path.write_text("x")
    return path


# -- 11: results_dir and cache_dir must be writable ------------------------------------------------------------------


def test_results_dir_under_a_file_is_one_line_and_writes_nothing(tiny_model_dir, text_file, tmp_path, file_in_the_way):
    args = [a for a in tiny_run_overrides(tiny_model_dir, text_file, tmp_path) if not a.startswith("results_dir=")]
    line = one_config_error(_cli(*args, f"results_dir={file_in_the_way / 'sub'}", f"hydra.run.dir={tmp_path / 'out'}"))
    assert "results_dir=" in line and "a_regular_file" in line and "not a directory" in line
    assert not (tmp_path / "cache").exists()


def test_cache_dir_under_a_file_fails_in_the_preflight(tiny_model_dir, text_file, tmp_path, file_in_the_way):
    args = [a for a in tiny_run_overrides(tiny_model_dir, text_file, tmp_path) if not a.startswith("cache_dir=")]
    with pytest.raises(ConfigError, match="cache_dir=.*a_regular_file.*allowed values: a writable directory"):
        check(*args, f"cache_dir={file_in_the_way / 'cache'}")


def test_a_directory_without_write_permission_is_refused(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """Root may write anywhere, so the denial is simulated there; a normal user gets a real read-only directory."""
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    if os.geteuid() == 0:
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == read_only else real_access(p, mode))
    else:
        read_only.chmod(0o500)
    args = [a for a in tiny_run_overrides(tiny_model_dir, text_file, tmp_path) if not a.startswith("results_dir=")]
    try:
        with pytest.raises(ConfigError, match="results_dir=.*read_only.*is not writable"):
            check(*args, f"results_dir={read_only / 'results'}")
    finally:
        read_only.chmod(0o700)


def test_a_failing_write_probe_is_refused(tmp_path, monkeypatch):
    """A read-only mount: os.access may say yes (root), the probe file cannot be created."""
    import tempfile

    from harness.preflight import check_writable

    def read_only_fs(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only_fs)
    with pytest.raises(ConfigError, match="cache_dir=.*Read-only file system"):
        check_writable("cache_dir", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


# -- 12: the text must hold what eval and calibration need -----------------------------------------------------------


def short_corpus(tmp_path, n_words: int) -> Path:
    path = tmp_path / "short.txt"
    path.write_text(random_text(n_words))
    return path


def test_eval_split_shorter_than_one_window_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path):
    corpus = short_corpus(tmp_path, 300)
    args = tiny_run_overrides(tiny_model_dir, corpus, tmp_path, "eval.seqlen=256", f"hydra.run.dir={tmp_path / 'out'}")
    line = one_config_error(_cli(*args))
    assert "eval.seqlen=256" in line and "data.sources.textfile" in line
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "cache").exists() or not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_calibration_split_shorter_than_calib_seqlen_fails_in_the_preflight(tiny_model_dir, tmp_path):
    corpus = short_corpus(tmp_path, 300)
    args = tiny_run_overrides(tiny_model_dir, corpus, tmp_path, "eval.seqlen=8", "method=gptq", "calib.seqlen=400")
    with pytest.raises(ConfigError, match=r"calib.seqlen=400 needs more than 400 tokens .*calib.source='textfile'"):
        check(*args)
    check(*args[:-1], "calib.seqlen=100")  # this one fits


def test_more_windows_than_the_text_holds_is_a_warning(tiny_model_dir, tmp_path, caplog, monkeypatch):
    import harness.preflight

    monkeypatch.setattr(harness.preflight, "_WARNED", set())  # warned once per process
    corpus = short_corpus(tmp_path, 300)
    with caplog.at_level(logging.WARNING, logger="harness.preflight"):
        check(*tiny_run_overrides(tiny_model_dir, corpus, tmp_path, "eval.seqlen=8", "eval.max_windows=1000"))
    assert "eval.max_windows=1000 asks for more windows" in caplog.text


def test_a_valid_run_passes_the_preflight_and_writes_nothing(tiny_model_dir, text_file, tmp_path):
    check(*tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=gptq", "calib.seqlen=32"))
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


# -- 13: one line instead of a traceback -----------------------------------------------------------------------------


def test_cuda_without_a_gpu_is_a_config_error(monkeypatch):
    from harness.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device='cuda' .*allowed values: cpu, auto"):
        resolve_device("cuda")


def test_unreachable_hub_id_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
               HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there: as offline as it gets, at once
    proc = _cli("model=hf", "model.path=nobody/no-such-model", "device=cpu", "eval.ppl_sets=[code]",
                f"results_dir={tmp_path / 'results'}", f"cache_dir={tmp_path / 'cache'}",
                f"hydra.run.dir={tmp_path / 'out'}", env=env)
    line = one_config_error(proc)
    assert "model.path='nobody/no-such-model'" in line and "fetching its config.json from the hub failed" in line
    assert not (tmp_path / "results").exists()


def test_corrupt_config_json_is_named(tiny_model_dir, text_file, tmp_path):
    (tiny_model_dir / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ConfigError, match=r"config.json is not a valid config.json"):
        check(*tiny_run_overrides(tiny_model_dir, text_file, tmp_path))


def test_truncated_safetensors_is_named(tiny_model_dir, text_file, tmp_path):
    weights = tiny_model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1000])
    with pytest.raises(ConfigError, match=r"model.safetensors is truncated: .* bytes where its header needs"):
        check(*tiny_run_overrides(tiny_model_dir, text_file, tmp_path))
    weights.write_bytes(data[:5])
    with pytest.raises(ConfigError, match="shorter than the 8-byte header length"):
        check(*tiny_run_overrides(tiny_model_dir, text_file, tmp_path))


def test_sharded_checkpoint_shards_are_checked(tmp_path, text_file):
    from conftest import tiny_tokenizer

    model_dir = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(model_dir, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(model_dir)
    shards = sorted(set(json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) > 1
    args = tiny_run_overrides(model_dir, text_file, tmp_path)
    check(*args)  # complete: passes
    last = model_dir / shards[-1]
    data = last.read_bytes()
    last.write_bytes(data[:-10])
    with pytest.raises(ConfigError, match=f"{shards[-1]} is truncated"):
        check(*args)
    last.unlink()
    with pytest.raises(ConfigError, match=f"names the shard {shards[-1]}, which is missing"):
        check(*args)


def test_header_check_reads_no_tensor_data(tmp_path):
    """A file whose tensor data is a hole (never written) passes: only the header and the size are read."""
    from harness.preflight import safetensors_problem

    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 4 << 20]}}).encode()
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + (4 << 20))
    assert safetensors_problem(path) is None


def test_an_added_key_is_one_line_not_a_traceback(tmp_path):
    line = one_config_error(_cli("+bitz=3", f"results_dir={tmp_path / 'results'}", f"hydra.run.dir={tmp_path / 'out'}"))
    assert "bitz=3 is not a config key" in line and "'bits'" in line


@pytest.mark.parametrize("override, key", [("+bitz=3", "bitz"), ("+eval.windows=3", "eval.windows"),
                                           ("+data.sources.wiki.colour=red", "data.sources.wiki.colour")])
def test_added_keys_are_named_with_the_allowed_ones(override, key):
    from hydra import compose, initialize_config_dir

    from harness.preflight import to_run_config
    from test_config import CONF

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[override])
    with pytest.raises(ConfigError, match=rf"^{key}=.* is not a config key .*allowed keys here"):
        to_run_config(cfg)


# -- 14: a one-line file, a non-UTF-8 file ---------------------------------------------------------------------------


def test_non_utf8_textfile_names_file_and_key(tiny_model_dir, tmp_path):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes(random_text(3000).replace("quick", "qu\xefck").encode("latin-1"))
    with pytest.raises(ConfigError, match=r"data.sources.textfile.path: .*latin1.txt is not UTF-8 text"):
        check(*tiny_run_overrides(tiny_model_dir, corpus, tmp_path))


# -- 15: a sweep checks every job before it runs any -----------------------------------------------------------------


def test_sweep_with_one_bad_job_runs_none(tiny_model_dir, text_file, tmp_path):
    args = tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=rtn", "group_size=32")
    proc = _cli("-m", *args, "bits=3,5", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    line = one_config_error(proc)
    assert line.startswith("config error: sweep job 1 (bits=5): bits=5 is invalid")
    assert not (tmp_path / "results").exists()  # bits=3 did not run first


def test_sweep_jobs_are_each_preflighted(tiny_model_dir, text_file, tmp_path):
    args = tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=rtn", "group_size=32")
    proc = _cli("-m", *args, "eval.seqlen=16,1024,2048", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out
    assert "sweep job 1 (eval.seqlen=1024): eval.seqlen=1024 is longer than" in out
    assert "sweep job 2 (eval.seqlen=2048)" in out and "sweep job 0" not in out
    assert not (tmp_path / "results").exists()


# -- 16: seqlens the model cannot hold -------------------------------------------------------------------------------


def test_eval_seqlen_beyond_max_position_embeddings(tiny_model_dir, text_file, tmp_path):
    with pytest.raises(ConfigError, match=r"eval.seqlen=1024 is longer than the model's max_position_embeddings=512"):
        check(*tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "eval.seqlen=1024"))


def test_calib_seqlen_beyond_max_position_embeddings(tiny_model_dir, text_file, tmp_path):
    with pytest.raises(ConfigError, match=r"calib.seqlen=600 is longer than the model's max_position_embeddings=512"):
        check(*tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=awq", "calib.seqlen=600"))


def test_packaged_model_limit_is_known_before_its_conversion(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.seqlen=16384 .*max_position_embeddings=8192 \(the packaged"):
        check("eval.seqlen=16384", "eval.ppl_sets=[code]", "eval.lm_eval=null", f"cache_dir={tmp_path / 'cache'}",
              f"results_dir={tmp_path / 'results'}")
    assert not (tmp_path / "cache").exists()  # not converted for this


def test_packaged_model_once_converted_checks_text_with_its_tokenizer(tiny_model_dir, tmp_path):
    import shutil

    from analysis.integrity import file_sha256
    from harness.models import packaged_gguf_path

    converted = tmp_path / "cache" / "models" / f"smollm2_135m-{file_sha256(packaged_gguf_path())[:12]}"
    shutil.copytree(tiny_model_dir, converted)  # stands in for the converted copy (config, weights, tokenizer)
    corpus = short_corpus(tmp_path, 300)
    args = [f"data.sources.textfile.path={corpus}", "eval.ppl_sets=[textfile]", "eval.lm_eval=null",
            f"cache_dir={tmp_path / 'cache'}", f"results_dir={tmp_path / 'results'}"]
    with pytest.raises(ConfigError, match=r"eval.seqlen=256 is longer than the eval split of data.sources.textfile"):
        check(*args, "eval.seqlen=256")
    with pytest.raises(ConfigError, match=r"max_position_embeddings=512 \(config.json\)"):  # read from the copy
        check(*args, "eval.seqlen=1024")


# -- issue 30, finding 5: an export the model's shapes cannot hold is refused before quantizing -----------------------


def test_finding5_awq_gemm_at_a_group_size_not_dividing_a_layer_is_refused_in_the_preflight(tiny_model_dir, text_file,
                                                                                           tmp_path):
    """The tiny Llama's down_proj has 160 inputs: AutoAWQ's layout cannot hold group 64 there. Before, the preflight
    passed, the run quantized, then pack_awq_gemm raised a ValueError traceback (rc 1) and left an empty run
    directory."""
    args = tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=rtn", "group_size=64", "export=awq_gemm")
    line = one_config_error(_cli(*args, f"hydra.run.dir={tmp_path / 'out'}"))
    assert "export=awq_gemm: awq_gemm needs group_size to divide every quantized layer's input features" in line
    assert "group_size=64 does not divide 2 of them (e.g. model.layers.0.mlp.down_proj: 160)" in line
    assert "allowed values here: group_size in [32, 16]" in line
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("extra, match", [
    (("method=gptq", "method.desc_act=true", "group_size=32", "export=awq_gemm"), "not act-order g_idx"),
    (("method=rtn", "group_size=32", "bits=8", "export=awq_gemm"), "4-bit asymmetric grouped weights only"),
])
def test_finding5_every_export_constraint_is_a_preflight_refusal(tiny_model_dir, text_file, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        check(*tiny_run_overrides(tiny_model_dir, text_file, tmp_path, *extra))


def test_finding5_a_model_not_yet_on_the_machine_is_checked_as_soon_as_it_loads(tiny_model_dir, text_file, tmp_path,
                                                                               monkeypatch):
    """When the preflight cannot see the model's shapes (the packaged model before its first conversion), the run
    refuses right after loading, before the baseline or any quantization."""
    import harness.run as run

    monkeypatch.setattr(run, "preflight", lambda *a, **k: None)
    monkeypatch.setattr(run, "quantize_stage", lambda *a, **k: pytest.fail("quantized before the export check"))
    cfg = make_config(*tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=rtn", "group_size=64",
                                          "export=awq_gemm"))
    with pytest.raises(ConfigError, match="group_size=64 does not divide"):
        run.execute(cfg)


# -- issue 30, finding 7: a value of the wrong type is one line, rc 2, single run and sweep ---------------------------


@pytest.mark.parametrize("args, expected", [
    (("calib.seed=abc",), "calib.seed=abc is invalid: Value 'abc' of type 'str' could not be converted to Integer; "
                          "allowed values: an integer or null (calib.seed is Optional[int])"),
    (("calib.seed=1.5",), "calib.seed=1.5 is invalid: Value '1.5' of type 'float' could not be converted to Integer; "
                          "allowed values: an integer or null"),
    (("method=rtn", "method.path=/x"), "method.path=/x is not a config key of method=rtn; allowed keys here: "
                                       "['name', 'range_rule']"),
    (("bits=four",), "bits=four is invalid: Value 'four' of type 'str' could not be converted to Integer; allowed "
                     "values: an integer (bits is int)"),
    (("method=magic",), "method=magic is invalid: no such option; allowed values: ['awq', 'awq_gptq', 'checkpoint', "
                        "'fp', 'gptq', 'rtn']"),
    (("-m", "calib.seed=abc"), "calib.seed=abc is invalid: Value 'abc' of type 'str'"),  # a sweep's own compose
])
def test_finding7_type_errors_are_one_config_error_line_with_rc_2(tmp_path, args, expected):
    """Hydra raises these while composing, before the task function runs: they printed Hydra's multi-line report and
    exited 1."""
    line = one_config_error(_cli(*args, f"results_dir={tmp_path / 'results'}", f"hydra.run.dir={tmp_path / 'out'}",
                                 f"hydra.sweep.dir={tmp_path / 'sweep'}"))
    assert line.startswith("config error: ") and expected in line


def test_finding7_a_sweep_job_of_the_wrong_type_is_named_with_its_type(tiny_model_dir, text_file, tmp_path):
    args = tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=rtn", "group_size=32")
    line = one_config_error(_cli("-m", *args, "calib.seed=0,abc", f"hydra.sweep.dir={tmp_path / 'sweep'}"))
    assert line.startswith("config error: sweep job 1 (calib.seed=abc): calib.seed=abc is invalid: Value 'abc' of "
                           "type 'str' could not be converted to Integer; allowed values: an integer or null")
    assert not (tmp_path / "results").exists()


# -- issue 30, finding 11: keys a checkpoint does not use are refused, config.yaml records what was measured ----------


def test_finding11_spec_keys_set_for_a_checkpoint_are_refused(tiny_model_dir, text_file, tmp_path):
    gguf = Path(__file__).parent / "golden" / "checkpoints" / "gguf" / "tiny-Q4_0.gguf"
    args = tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=checkpoint", f"method.path={gguf}")
    line = one_config_error(_cli(*args, "bits=3", "group_size=64", f"hydra.run.dir={tmp_path / 'out'}"))
    assert "bits=3 group_size=64: bits, group_size do not apply to method=checkpoint, which measures the " \
           "checkpoint's own bits, group size and symmetry" in line
    assert not (tmp_path / "results").exists()
    swept = _cli("-m", *args, "bits=3,4", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert swept.returncode == 2 and "sweep job 0 (bits=3): bits=3: bits do not apply" in swept.stderr


def test_finding11_a_checkpoint_run_records_the_spec_it_measured(tiny_model_dir, text_file, tmp_path):
    """The defaults bits=4 group_size=128 are not refused (nobody set them) and config.yaml records the checkpoint's
    own spec (Q4_0: 4 bits, blocks of 32, symmetric), as its rows do; before, it recorded group_size 128."""
    import yaml

    gguf = Path(__file__).parent / "golden" / "checkpoints" / "gguf" / "tiny-Q4_0.gguf"
    args = tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=checkpoint", f"method.path={gguf}",
                              "eval.kld=false")
    proc = _cli(*args, f"hydra.run.dir={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run] = [d for d in (tmp_path / "results").iterdir() if not d.name.startswith(".")]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["bits"], config["group_size"], config["symmetric"]) == (4, 32, True)
