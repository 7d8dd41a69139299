"""A whole run on a tiny local model: rows, files, provenance, resume, the CLI and its errors."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis import results
from harness.config import ConfigError
from harness.models import weights_stamp
from harness.run import execute, run_dir
from test_config import make_config

ROOT = Path(__file__).resolve().parent.parent


def tiny_run_overrides(model_dir, text_file, tmp_path, *extra):
    return [
        "model=hf", f"model.path={model_dir}", "model.name=tiny", "device=cpu",
        f"data.sources.textfile.path={text_file}", "calib.source=textfile", "eval.ppl_sets=[textfile]",
        "eval.seqlen=32", "eval.max_windows=3", "eval.lm_eval=null", f"results_dir={tmp_path / 'results'}",
        f"cache_dir={tmp_path / 'cache'}", *extra,
    ]


def test_rtn_run_writes_tidy_rows_with_provenance(tiny_model_dir, text_file, tmp_path):
    cfg = make_config(*tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=rtn", "bits=3", "group_size=48"))
    frame = execute(cfg)
    assert list(frame.columns) == results.COLUMNS
    ppl = frame[(frame.suite == "ppl") & (frame.metric == "ppl")]
    assert len(ppl) == 1 and ppl["value"].iloc[0] > 1 and ppl["n"].iloc[0] == 3 * 31
    quant = frame[frame.suite == "quant"].set_index("metric")["value"]
    assert quant["quantized_layers"] == 14
    assert quant["short_group_layers"] == 14  # in_features 64 and 160 are not multiples of 48
    row = frame.iloc[0]
    assert row.model == "tiny" and row.method == "rtn" and row.bits == 3 and row.group_size == 48
    assert row.git_sha and json.loads(row.versions)["torch"] and row.device.startswith("cpu")
    assert row.model_fingerprint and "eval:textfile" in json.loads(row.data_fingerprint)
    out = run_dir(cfg)
    assert results.is_complete(out) and (out / results.CONFIG_FILE).exists()
    pd.testing.assert_frame_equal(results.load_results(out), frame)


def test_finished_run_is_skipped_and_force_reruns(tiny_model_dir, text_file, tmp_path):
    overrides = tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=fp")
    first = execute(make_config(*overrides))
    again = execute(make_config(*overrides))
    assert again["started_at"].iloc[0] == first["started_at"].iloc[0]  # read back, not recomputed
    done = run_dir(make_config(*overrides)) / results.DONE_FILE
    before = done.stat().st_mtime_ns
    forced = execute(make_config(*overrides, "force=true"))
    assert done.stat().st_mtime_ns != before  # really re-ran and rewrote the run
    ppl = lambda f: f[f.metric == "ppl"]["value"].tolist()  # noqa: E731
    assert ppl(forced) == ppl(first)  # deterministic
    assert len(results.find_run_dirs(tmp_path / "results")) == 1


def test_quantization_hurts_and_lower_bits_hurt_more(tiny_model_dir, text_file, tmp_path):
    def ppl(*extra):
        frame = execute(make_config(*tiny_run_overrides(tiny_model_dir, text_file, tmp_path, *extra)))
        return frame[(frame.suite == "ppl") & (frame.metric == "ppl")]["value"].iloc[0]

    fp, w4, w2 = ppl("method=fp"), ppl("method=rtn", "bits=4", "group_size=32"), ppl("method=rtn", "bits=2", "group_size=32")
    assert fp != w4 and abs(w2 - fp) > abs(w4 - fp)


def test_strict_groups_rejects_a_group_size_that_does_not_divide(tiny_model_dir, text_file, tmp_path):
    cfg = make_config(*tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=rtn", "group_size=48",
                                          "strict_groups=true"))
    with pytest.raises(ValueError, match="strict_groups"):
        execute(cfg)


def _never_load(monkeypatch):
    """Make any model load fail loudly: the errors under test must come from the preflight."""
    import harness.run

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(harness.run, "load_model", refuse)


def test_missing_data_fails_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    _never_load(monkeypatch)
    cfg = make_config("model=hf", f"model.path={tiny_model_dir}", "eval.ppl_sets=[textfile]",
                      f"data.sources.textfile.path={tmp_path / 'missing.txt'}", f"results_dir={tmp_path}")
    with pytest.raises(ConfigError, match="missing.txt"):
        execute(cfg)


def test_missing_local_model_path_is_named(tmp_path, monkeypatch):
    _never_load(monkeypatch)
    cfg = make_config("model=hf", f"model.path={tmp_path / 'no-such-model'}", "eval.ppl_sets=[code]",
                      f"results_dir={tmp_path}")
    with pytest.raises(ConfigError, match="no-such-model'?: no such local directory"):
        execute(cfg)


def test_triton_kernel_without_cuda_is_a_config_error(tiny_model_dir, tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: kernel=triton is valid here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import kernels.triton_w4a16 as triton_w4a16

    if triton_w4a16.is_interpreted():
        monkeypatch.setattr(triton_w4a16, "is_interpreted", lambda: False)
    _never_load(monkeypatch)
    cfg = make_config("model=hf", f"model.path={tiny_model_dir}", "eval.ppl_sets=[code]", "device=cpu",
                      "kernel=triton", f"results_dir={tmp_path}")
    with pytest.raises(ConfigError, match="kernel='triton' cannot run on device cpu"):
        execute(cfg)


def test_one_sentence_per_line_file_is_split_by_size(tiny_model_dir, tmp_path):
    from conftest import WORDS

    corpus = tmp_path / "lines.txt"
    corpus.write_text("\n".join(" ".join(WORDS[i % 7:i % 7 + 8]) + "." for i in range(1500)) + "\n")
    frame = execute(make_config(*tiny_run_overrides(tiny_model_dir, corpus, tmp_path, "method=rtn", "group_size=32")))
    assert frame[frame.metric == "ppl"]["value"].iloc[0] > 1


def test_a_file_that_cannot_be_split_fails_in_the_preflight(tiny_model_dir, tmp_path, monkeypatch):
    _never_load(monkeypatch)
    corpus = tmp_path / "one.txt"
    corpus.write_text("just one short line\n")
    with pytest.raises(ConfigError, match="1 document"):
        execute(make_config(*tiny_run_overrides(tiny_model_dir, corpus, tmp_path, "method=rtn")))


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_sweep_writes_runs_and_a_summary(tiny_model_dir, text_file, tmp_path):
    args = tiny_run_overrides(tiny_model_dir, text_file, tmp_path)
    proc = _cli("-m", *args, "method=fp,rtn", "bits=4", "group_size=32,64", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    frame = results.load_results(tmp_path / "results")
    # fp does not depend on bits/group size: its two sweep points share one run
    assert sorted(frame.drop_duplicates("run_id")["method"]) == ["fp", "rtn", "rtn"]
    assert "sweep summary (3 runs" in proc.stdout + proc.stderr


def test_cli_missing_textfile_exits_2_in_one_line(tiny_model_dir, tmp_path):
    proc = _cli("model=hf", f"model.path={tiny_model_dir}", "eval.ppl_sets=[textfile]", "device=cpu",
                f"data.sources.textfile.path={tmp_path / 'missing.txt'}", f"results_dir={tmp_path}",
                f"hydra.run.dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert "config error" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def test_cli_unknown_method_lists_only_methods(tmp_path):
    proc = _cli("method=foo", f"results_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'out'}")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "rtn" in out and "gptq" in out and "_schema" not in out


def test_cli_bad_value_exits_2_with_the_key_named(tmp_path):
    proc = _cli("bits=5", f"results_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert "bits=5 is invalid; allowed values: [2, 3, 4, 8]" in proc.stdout + proc.stderr
    assert not any(tmp_path.glob("*-rtn-*"))


def test_eval_only_change_reuses_quantized_weights(tiny_model_dir, text_file, tmp_path):
    base = tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=rtn", "bits=3", "group_size=32")
    first = execute(make_config(*base))
    second = execute(make_config(*base, "eval.max_windows=2"))  # new run (eval differs), same quantization
    cached = lambda f: json.loads(f[f.metric == "quant_wall_s"]["detail"].iloc[0])["cached"]  # noqa: E731
    assert cached(first) is False and cached(second) is True
    ppl = lambda f: f[f.metric == "ppl"]["value"].iloc[0]  # noqa: E731
    third = execute(make_config(*base, "eval.max_windows=2", "force=true"))  # force bypasses the cache too
    assert cached(third) is False and ppl(third) == ppl(second)
    other = execute(make_config(*base[:-1], "group_size=16", "eval.max_windows=2"))  # spec change: new entry
    assert cached(other) is False


def test_a_run_directory_does_not_depend_on_cache_state(tiny_model_dir, text_file, tmp_path):
    """AWQ's search travels in the method's result, so a cache hit writes awq_search.pt too, with the same bytes."""
    import torch

    base = tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=awq", "group_size=32",
                              "method.n_grid=2", "method.clip_grid=4", "calib.n_samples=2", "calib.seqlen=16")
    first = execute(make_config(*base))
    second = execute(make_config(*base, "eval.max_windows=2"))  # another run, the same quantization: a cache hit
    assert json.loads(second[second.metric == "quant_wall_s"]["detail"].iloc[0])["cached"] is True
    files = [run_dir(make_config(*base)) / "awq_search.pt", run_dir(make_config(*base, "eval.max_windows=2")) /
             "awq_search.pt"]
    states = [torch.load(f, weights_only=True) for f in files]
    assert states[0]["blocks"].keys() == states[1]["blocks"].keys()
    for prefix, block in states[0]["blocks"].items():
        for a, b in zip(block["scales"], states[1]["blocks"][prefix]["scales"]):
            assert torch.equal(a["s"], b["s"])
    ppl = lambda f: f[f.metric == "ppl"]["value"].iloc[0]  # noqa: E731
    assert ppl(first) > 1 and ppl(second) > 1


def test_gptq_statistics_become_quant_rows(tiny_model_dir, text_file, tmp_path):
    frame = execute(make_config(*tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=gptq",
                                                    "group_size=32", "calib.n_samples=2", "calib.seqlen=16")))
    quant = frame[frame.suite == "quant"].set_index("metric")
    assert {"stat_damp_retries", "stat_loss", "stat_n_dead", "stat_damp_percent", "stat_n_tokens"} <= set(quant.index)
    assert quant.loc["stat_damp_retries", "value"] == 0 and quant.loc["stat_loss", "value"] > 0
    assert quant.loc["stat_n_tokens", "value"] == 2 * 16  # every layer saw every calibration token
    assert json.loads(quant.loc["stat_loss", "detail"])["layers"] == 14


def test_cache_entry_with_a_different_key_is_never_reused(tmp_path):
    import torch

    from harness import cache

    path = tmp_path / "entry.pt"
    from methods.base import QuantizationResult

    cache.save_entry(path, {"code": "a"}, QuantizationResult({"x": torch.zeros(1)}), {"quant_wall_s": 1.0})
    assert cache.load_entry(path, {"code": "a"}) is not None
    assert cache.load_entry(path, {"code": "b"}) is None


def test_submitit_local_launcher_runs_the_sweep(tiny_model_dir, text_file, tmp_path):
    """The cluster path (submitit) with its local executor: each job in its own process."""
    args = tiny_run_overrides(tiny_model_dir, text_file, tmp_path)
    proc = _cli("-m", "hydra/launcher=submitit_local", *args, "method=fp,rtn", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(results.load_results(tmp_path / "results").drop_duplicates("run_id")["method"]) == ["fp", "rtn"]


def test_packed_reference_kernel_matches_fake_quant_perplexity(tiny_model_dir, text_file, tmp_path):
    base = tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=rtn", "bits=4", "group_size=32")
    ppl = lambda f: f[f.metric == "ppl"]["value"].iloc[0]  # noqa: E731
    fake, packed = execute(make_config(*base)), execute(make_config(*base, "kernel=reference"))
    assert ppl(packed) == pytest.approx(ppl(fake), rel=1e-4)
    row = packed[packed.metric == "kernel_fallback_layers"].iloc[0]
    assert row.value == 0 and json.loads(row.detail)["kernel"] == "reference"
    ratio = packed[packed.metric == "packed_ppl_ratio"]["value"].iloc[0]
    assert ratio == pytest.approx(1.0, rel=1e-4)


def test_a_packed_model_that_disagrees_with_fake_quant_writes_no_result(tiny_model_dir, text_file, tmp_path,
                                                                       monkeypatch):
    """Layers that pass their own check can still be wired wrongly; the model-level probe catches it."""
    import kernels.quant_linear as ql
    from harness.perplexity import DisagreementError

    real = ql.QuantLinear.forward
    monkeypatch.setattr(ql, "verify_packed", lambda *args, **kwargs: 0.0)
    monkeypatch.setattr(ql.QuantLinear, "forward", lambda self, x: real(self, x) * 1.5)
    cfg = make_config(*tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=rtn", "bits=4",
                                          "group_size=32", "kernel=reference"))
    with pytest.raises(DisagreementError, match="fake-quantized"):
        execute(cfg)
    assert not results.is_complete(run_dir(cfg))


def test_timing_rows_compare_packed_model_with_baseline(tiny_model_dir, text_file, tmp_path):
    frame = execute(make_config(*tiny_run_overrides(
        tiny_model_dir, text_file, tmp_path, "method=rtn", "bits=4", "group_size=32", "kernel=reference",
        "+eval/timing=default", "eval.timing.prompt_len=8", "eval.timing.decode_tokens=2", "eval.timing.repeats=1",
        "eval.timing.warmup=0")))
    timing = frame[frame.suite == "timing"]
    metrics = set(timing.metric)
    assert {"prefill_tokens_per_s", "decode_tokens_per_s", "baseline_decode_tokens_per_s",
            "decode_speedup_vs_baseline"} <= metrics
    assert (timing.value > 0).all()
    quant = timing.set_index("metric")["value"]
    assert quant["decode_speedup_vs_baseline"] == pytest.approx(
        quant["decode_tokens_per_s"] / quant["baseline_decode_tokens_per_s"])


def test_lm_eval_rows_join_the_same_table(tiny_model_dir, text_file, tmp_path):
    args = [a for a in tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=rtn") if a != "eval.lm_eval=null"]
    frame = execute(make_config(*args, "eval.lm_eval.tasks=[arc_easy]", "eval.lm_eval.limit=3"))
    acc = frame[(frame.suite == "lm_eval") & (frame.metric == "acc")]
    assert len(acc) == 1 and acc.task.iloc[0] == "arc_easy" and 0 <= acc.value.iloc[0] <= 1
    assert acc.n.iloc[0] == 3 and acc.stderr.notna().all()
    assert set(frame.suite) == {"quant", "ppl", "lm_eval", "stage"}
    stages = frame[frame.suite == "stage"].set_index("metric")["value"]
    assert set(stages.index) == {"plan_s", "load_s", "fingerprint_s", "baseline_s", "quantize_s", "ppl_s",
                                 "lm_eval_s"}
    assert (stages > 0).all() and stages.sum() <= frame.wall_s.iloc[0]


def test_unknown_task_fails_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    _never_load(monkeypatch)
    cfg = make_config("model=hf", f"model.path={tiny_model_dir}", "eval.ppl_sets=[code]",
                      "eval.lm_eval.tasks=[no_such_task]", "eval.lm_eval.passthrough=false", f"results_dir={tmp_path}")
    with pytest.raises(ValueError, match="no_such_task"):
        execute(cfg)


def test_a_run_in_progress_elsewhere_is_waited_for_not_recomputed(tiny_model_dir, text_file, tmp_path):
    import threading

    from harness.locks import run_lock

    cfg = make_config(*tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=fp"))
    out = run_dir(cfg)
    got = {}
    with run_lock(out):  # another job is computing this run
        worker = threading.Thread(target=lambda: got.setdefault("frame", execute(cfg)))
        worker.start()
        worker.join(timeout=2)
        assert worker.is_alive()  # it waits instead of computing the same rows
        results.write_run(out, results.to_frame([{"run_id": "other", "suite": "ppl", "task": "textfile",
                                                  "metric": "ppl", "value": 1.0}]), "",
                          {"weights_stamp": weights_stamp(cfg.model)})
    worker.join(timeout=60)
    assert got["frame"]["run_id"].tolist() == ["other"]  # it read the finished run


_RACER = """
import sys, time
from pathlib import Path
from harness.locks import run_lock
out, log = Path(sys.argv[1]), Path(sys.argv[2])
with run_lock(out, heartbeat_s=0.2, stale_s=5, poll_s=0.05) as waited:
    if not (out / "DONE").exists():
        with open(log, "a") as f:
            f.write("computed" + chr(10))
        time.sleep(1.0)
        out.mkdir(parents=True, exist_ok=True)
        (out / "DONE").write_text("x")
"""


def test_processes_racing_for_one_run_compute_it_once(tmp_path):
    """Two processes start the same run at once: one computes, the other waits and finds it done."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(out), str(log)]) for _ in range(2)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert log.read_text().splitlines() == ["computed"]


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    import os
    import time

    from harness.locks import HEARTBEAT, lock_path, run_lock

    out, log = tmp_path / "run", tmp_path / "log.txt"
    holder = subprocess.Popen([sys.executable, "-c", _RACER.replace("time.sleep(1.0)", "time.sleep(600)"),
                               str(out), str(log)])
    deadline = time.time() + 30
    while not log.exists() and time.time() < deadline:
        time.sleep(0.05)
    holder.kill()  # dies holding the lock; its heartbeat stops
    holder.wait()
    assert lock_path(out).is_dir() and not out.exists()  # beside the run, not in it
    old = time.time() - 3600
    os.utime(lock_path(out) / HEARTBEAT, (old, old))  # as if it had died an hour ago
    start = time.time()
    with run_lock(out, stale_s=60, poll_s=0.05) as waited:
        assert waited is False and time.time() - start < 5  # taken over at once, not waited for
    assert not lock_path(out).exists()


def test_huge_pages_are_asked_for_streamed_runs_only(monkeypatch):
    """torch's THP_MEM_ALLOC_ENABLE: set for a streamed run (block-sized temporaries, churned per block), left alone
    for a model in memory (huge pages only add compaction stalls there), and a value the user set always wins."""
    import os

    from harness.plan import huge_pages_for

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    huge_pages_for(False)
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ
    huge_pages_for(True)
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    huge_pages_for(True)
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


def test_finding5_a_run_that_crashes_mid_way_leaves_no_run_directory(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """The run directory appears only when the run writes its results: a crash after quantizing leaves nothing that
    looks like a run (before, the lock made an empty results/<run_id>/), and no lock."""
    import harness.run as run

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash in the perplexity stage")

    monkeypatch.setattr(run, "evaluate_perplexity", crash)
    cfg = make_config(*tiny_run_overrides(tiny_model_dir, text_file, tmp_path, "method=rtn", "group_size=32"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run.execute(cfg)
    assert not run_dir(cfg).exists()
    assert list((tmp_path / "results").iterdir()) == []  # the lock went with the run
    monkeypatch.undo()
    execute(cfg)  # the next attempt runs it
    assert results.is_complete(run_dir(cfg))
