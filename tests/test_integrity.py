"""Nothing stale, nothing corrupt: every stored object the harness reuses is verified first (issue 19).

The corruption tests flip bytes inside real entries written by real runs on a tiny model, as a failing disk or an
interrupted copy would, and check that the re-run gives the numbers of a clean run, never the damaged ones.
"""
import json
import logging
import os
import subprocess
import sys
import threading

import pytest

from conftest import save_with_tokenizer, tiny_model, tiny_tokenizer
from analysis import integrity, results
from analysis.integrity import IntegrityError
from harness.models import weights_stamp
from harness.run import execute, run_dir
from harness.locks import lock_path, run_lock
from test_config import make_config
from test_run import tiny_run_overrides


def flip_bytes(path, count=4096):
    """Invert `count` bytes in the middle of a file (a damaged sector, not a truncation)."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - count // 2)
    for i in range(start, min(len(data), start + count)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path, keep=0.5):
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


def value(frame, metric, suite="ppl"):
    return frame[(frame.suite == suite) & (frame.metric == metric)]["value"].iloc[0]


def cached_flag(frame):
    return json.loads(frame[frame.metric == "quant_wall_s"]["detail"].iloc[0])["cached"]


def overrides(model_dir, text_file, tmp_path, results_name, *extra):
    return [*tiny_run_overrides(model_dir, text_file, tmp_path, *extra), f"results_dir={tmp_path / results_name}"]


def aside(directory, name_start):
    return [p for p in directory.iterdir() if p.name.startswith(name_start) and ".corrupt-" in p.name]


# --- the storage primitives ---------------------------------------------------------------------------------------

def test_sealed_file_round_trips_and_refuses_a_flipped_byte_or_no_seal(tmp_path):
    path = tmp_path / "entry.bin"
    integrity.write_sealed(path, b"payload" * 1000)
    assert integrity.read_sealed(path) == b"payload" * 1000
    flip_bytes(path, 1)
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        integrity.read_sealed(path)
    (tmp_path / "old.bin").write_bytes(b"PK\x03\x04 a zip written before checksums")
    with pytest.raises(IntegrityError, match="no checksum header"):
        integrity.read_sealed(tmp_path / "old.bin")


def test_manifest_catches_a_changed_missing_or_extra_file(tmp_path):
    d = tmp_path / "entry.d"
    (d / "sub").mkdir(parents=True)
    (d / "a.pt").write_bytes(b"a" * 100)
    (d / "sub" / "b.pt").write_bytes(b"b" * 100)
    integrity.write_manifest(d)
    assert integrity.verify_manifest(d) == d
    flip_bytes(d / "sub" / "b.pt", 1)
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        integrity.verify_manifest(d)
    integrity.write_manifest(d)
    (d / "c.pt").write_bytes(b"c")
    with pytest.raises(IntegrityError, match="not in the manifest"):
        integrity.verify_manifest(d)
    (d / "c.pt").unlink()
    (d / "a.pt").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        integrity.verify_manifest(d)


def test_damaged_entry_is_moved_aside_not_deleted(tmp_path, caplog):
    path = tmp_path / "entry.bin"
    integrity.write_sealed(path, b"x" * 100)
    flip_bytes(path, 1)
    with caplog.at_level(logging.WARNING):
        assert integrity.read_or_quarantine(path, lambda: integrity.read_sealed(path)) is None
    assert not path.exists() and len(aside(tmp_path, "entry.bin")) == 1
    assert str(path) in caplog.text and "moved aside" in caplog.text


# --- findings 1, 2, 9: cache entries -----------------------------------------------------------------------------

def test_finding1_flipped_bytes_in_a_quantization_cache_entry_are_recomputed(tiny_model_dir, text_file, tmp_path,
                                                                             caplog):
    args = ("method=gptq", "bits=3", "group_size=32", "eval.kld=false")
    clean = execute(make_config(*overrides(tiny_model_dir, text_file, tmp_path, "r1", *args)))
    [entry] = (tmp_path / "cache" / "quantized").glob("*.pt")
    flip_bytes(entry)
    with caplog.at_level(logging.WARNING):
        again = execute(make_config(*overrides(tiny_model_dir, text_file, tmp_path, "r2", *args)))
    assert value(again, "ppl") == value(clean, "ppl")  # the damaged weights were never evaluated
    assert cached_flag(again) is False  # recomputed, not reused
    assert str(entry) in caplog.text and len(aside(entry.parent, entry.name)) == 1
    third = execute(make_config(*overrides(tiny_model_dir, text_file, tmp_path, "r3", *args)))
    assert cached_flag(third) is True and value(third, "ppl") == value(clean, "ppl")  # the new entry serves


def test_finding2_flipped_bytes_in_a_baseline_cache_entry_are_recomputed(tiny_model_dir, text_file, tmp_path):
    clean = execute(make_config(*overrides(tiny_model_dir, text_file, tmp_path, "r1", "method=rtn", "group_size=32")))
    [entry] = (tmp_path / "cache" / "teacher").glob("*.pt")
    flip_bytes(entry)
    again = execute(make_config(*overrides(tiny_model_dir, text_file, tmp_path, "r2", "method=rtn", "group_size=32")))
    for metric in ("base_ppl", "ppl_ratio_vs_base", "kld"):
        assert value(again, metric) == value(clean, metric)
    assert len(aside(entry.parent, entry.name)) == 1


def test_finding9_a_truncated_cache_entry_is_named_and_recomputed(tiny_model_dir, text_file, tmp_path, caplog):
    args = ("method=rtn", "group_size=32", "eval.kld=false")
    clean = execute(make_config(*overrides(tiny_model_dir, text_file, tmp_path, "r1", *args)))
    [entry] = (tmp_path / "cache" / "quantized").glob("*.pt")
    truncate(entry)
    with caplog.at_level(logging.WARNING):
        again = execute(make_config(*overrides(tiny_model_dir, text_file, tmp_path, "r2", *args)))
    assert value(again, "ppl") == value(clean, "ppl") and cached_flag(again) is False
    assert str(entry) in caplog.text


def test_a_streamed_runs_directory_entry_is_verified_too(tiny_model_dir, text_file, tmp_path):
    args = ("method=rtn", "group_size=32", "eval.kld=false", "model.streaming=true")
    clean = execute(make_config(*overrides(tiny_model_dir, text_file, tmp_path, "r1", *args)))
    [entry] = (tmp_path / "cache" / "quantized").glob("*.d")
    artifact = sorted((entry / "artifacts").glob("*.pt"))[0]
    flip_bytes(artifact, 64)
    again = execute(make_config(*overrides(tiny_model_dir, text_file, tmp_path, "r2", *args)))
    assert value(again, "ppl") == value(clean, "ppl") and cached_flag(again) is False
    assert len(aside(entry.parent, entry.name)) == 1


# --- finding 3: a finished result belongs to the weights it measured ---------------------------------------------

def test_finding3_weights_saved_over_the_same_path_are_rerun(tiny_model_dir, text_file, tmp_path, caplog):
    args = overrides(tiny_model_dir, text_file, tmp_path, "r", "method=fp", "eval.kld=false")
    first = execute(make_config(*args))
    tiny_model("llama", seed=1).save_pretrained(tiny_model_dir)  # a fine-tuned checkpoint saved in place
    with caplog.at_level(logging.INFO):
        second = execute(make_config(*args))
    assert second["model_fingerprint"].iloc[0] != first["model_fingerprint"].iloc[0]
    assert value(second, "ppl") != value(first, "ppl")
    assert "weights changed" in caplog.text
    assert execute(make_config(*args))["started_at"].iloc[0] == second["started_at"].iloc[0]  # now it is reused


def test_touched_but_identical_weights_keep_the_finished_result(tiny_model_dir, text_file, tmp_path, caplog):
    args = overrides(tiny_model_dir, text_file, tmp_path, "r", "method=fp", "eval.kld=false")
    first = execute(make_config(*args))
    cfg = make_config(*args)
    before = weights_stamp(cfg.model)
    weights = tiny_model_dir / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # copied, touched
    assert weights_stamp(cfg.model) != before  # the cheap stamp sees the change ...
    with caplog.at_level(logging.INFO):
        again = execute(cfg)
    assert again["started_at"].iloc[0] == first["started_at"].iloc[0]  # ... the fingerprint says it is the same
    assert "the finished result stands" in caplog.text
    done = json.loads((run_dir(cfg) / results.DONE_FILE).read_text())
    assert done["weights_stamp"] == weights_stamp(cfg.model) and results.is_complete(run_dir(cfg))


def test_the_weights_stamp_changes_with_any_weight_file_and_not_without(tiny_model_dir):
    cfg = make_config("model=hf", f"model.path={tiny_model_dir}")
    stamp = weights_stamp(cfg.model)
    assert stamp == weights_stamp(cfg.model)
    tiny_tokenizer().save_pretrained(tiny_model_dir / "extra")
    assert weights_stamp(cfg.model) != stamp


# --- finding 8: a damaged finished run ---------------------------------------------------------------------------

def test_finding8_a_truncated_rows_file_is_rerun_and_skipped_by_readers(tiny_model_dir, text_file, tmp_path, caplog):
    args = overrides(tiny_model_dir, text_file, tmp_path, "r", "method=rtn", "group_size=32", "eval.kld=false")
    first = execute(make_config(*args))
    out = run_dir(make_config(*args))
    truncate(out / results.ROWS_FILE)
    assert results.check_run(out).state == "damaged" and not results.is_complete(out)
    with caplog.at_level(logging.WARNING):
        assert results.load_results(tmp_path / "r").empty  # skipped with a warning, not an ArrowInvalid
    assert "damaged" in caplog.text and str(out) in caplog.text
    again = execute(make_config(*args))  # no force=true needed, and the quantization cache serves it
    assert value(again, "ppl") == value(first, "ppl") and cached_flag(again) is True
    assert results.is_complete(out)
    [moved] = aside(out.parent, out.name)
    assert (moved / results.ROWS_FILE).exists() and (moved / f"{results.DONE_FILE}.corrupt").exists()
    assert results.find_run_dirs(tmp_path / "r") == [out]  # the set-aside copy is never read as a run


def test_a_run_finished_before_checksums_is_read_with_a_warning_and_rerun(tmp_path, caplog):
    frame = results.to_frame([{"run_id": "old", "suite": "ppl", "task": "wiki", "metric": "ppl", "value": 3.0}])
    results.write_run(tmp_path / "old", frame, "", {})
    done = tmp_path / "old" / results.DONE_FILE
    done.write_text(json.dumps({k: v for k, v in json.loads(done.read_text()).items() if k != "files"}))
    assert results.check_run(tmp_path / "old").state == "legacy"
    with caplog.at_level(logging.WARNING):
        assert results.load_results(tmp_path)["run_id"].tolist() == ["old"]
    assert "unverified" in caplog.text


def test_a_flipped_byte_in_any_file_of_a_run_makes_it_damaged(tmp_path):
    frame = results.to_frame([{"run_id": "r", "suite": "ppl", "task": "wiki", "metric": "ppl", "value": 3.0}])
    results.write_run(tmp_path / "r", frame, "bits: 4\n", {}, {"blocks.parquet": b"x" * 64})
    assert results.is_complete(tmp_path / "r")
    flip_bytes(tmp_path / "r" / "blocks.parquet", 1)
    check = results.check_run(tmp_path / "r")
    assert check.state == "damaged" and "blocks.parquet" in check.reason


# --- finding 10: a dead lock holder ------------------------------------------------------------------------------

def test_finding10_a_lock_whose_holder_died_on_this_host_is_taken_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    lock = lock_path(out)
    lock.mkdir(parents=True)
    import socket

    (lock / "owner.json").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": 0}))
    (lock / "heartbeat").touch()  # a fresh heartbeat: only the dead pid can tell
    got = threading.Event()

    def take():
        with run_lock(out, stale_s=3600):
            got.set()

    worker = threading.Thread(target=take, daemon=True)
    worker.start()
    worker.join(timeout=60)  # a bound for a broken implementation, not a timing claim
    assert got.is_set()


def test_a_live_holder_on_this_host_is_waited_for(tmp_path):
    out = tmp_path / "run"
    with run_lock(out):  # this very process holds it: alive
        from harness.locks import _dead_local_holder

        assert _dead_local_holder(lock_path(out)) is None


def test_the_same_weights_at_another_path_are_the_same_model(tiny_model_dir, tmp_path):
    import shutil

    from harness.models import load_model, model_fingerprint

    copy = tmp_path / "elsewhere" / "tiny"
    shutil.copytree(tiny_model_dir, copy)
    prints = [model_fingerprint(load_model(make_config("model=hf", f"model.path={p}").model, "cpu", tmp_path)[0])
              for p in (tiny_model_dir, copy)]
    assert prints[0] == prints[1]  # comparable, and one cache entry serves both
    other = save_with_tokenizer(tiny_model("llama", seed=1), tmp_path / "other")
    assert model_fingerprint(load_model(make_config("model=hf", f"model.path={other}").model, "cpu", tmp_path)[0]) \
        != prints[0]


# --- the quantization cache is keyed by the code its method imports (issue 20, item 4) ----------------------------

def _package(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_cache_key_follows_the_imports_through_a_rename(tmp_path):
    from harness.cache import code_fingerprint, module_closure

    _package(tmp_path, {"methods/__init__.py": "", "methods/mine.py": "from core.maths import q\n",
                        "core/__init__.py": "", "core/maths.py": "def q(w):\n    return w\n",
                        "core/unused.py": "X = 1\n"})
    before = code_fingerprint("methods.mine", tmp_path)
    assert set(module_closure("methods.mine", tmp_path)) == {"methods", "methods.mine", "core", "core.maths"}
    (tmp_path / "core" / "unused.py").write_text("X = 2\n")
    assert code_fingerprint("methods.mine", tmp_path) == before  # code the method never loads does not matter
    (tmp_path / "core" / "maths.py").rename(tmp_path / "core" / "rounding.py")  # a move, same bytes
    (tmp_path / "methods" / "mine.py").write_text("from core.rounding import q\n")
    renamed = code_fingerprint("methods.mine", tmp_path)
    assert renamed != before and "core.rounding" in module_closure("methods.mine", tmp_path)
    (tmp_path / "core" / "rounding.py").write_text("def q(w):\n    return 2 * w\n")
    assert code_fingerprint("methods.mine", tmp_path) != renamed  # an edit of the moved module still counts


def test_relative_imports_are_followed(tmp_path):
    from harness.cache import module_closure

    _package(tmp_path, {"methods/__init__.py": "", "methods/awq/__init__.py": "from .method import A\n",
                        "methods/awq/method.py": "from . import maths\nfrom ..base import B\n",
                        "methods/awq/maths.py": "", "methods/base.py": ""})
    assert set(module_closure("methods.awq.method", tmp_path)) == {
        "methods", "methods.awq", "methods.awq.method", "methods.awq.maths", "methods.base"}


def test_the_fingerprint_changes_with_any_weight_and_is_the_bytes_not_their_sums():
    """Swapping two weights keeps every sum and sum of squares (what the fingerprint hashed before), and must still
    change it; so must the smallest change of one value. The same weights in another tensor object do not."""
    import copy

    import torch

    from harness.models import model_fingerprint

    model = tiny_model("llama")
    base = model_fingerprint(model)
    assert model_fingerprint(copy.deepcopy(model)) == base
    swapped = copy.deepcopy(model)
    w = swapped.model.layers[0].mlp.down_proj.weight.data
    w[0, 0], w[0, 1] = w[0, 1].item(), w[0, 0].item()
    assert model_fingerprint(swapped) != base
    nudged = copy.deepcopy(model)
    v = nudged.model.layers[1].self_attn.q_proj.weight.data
    v[3, 5] = torch.nextafter(v[3, 5], torch.tensor(float("inf")))
    assert model_fingerprint(nudged) != base
