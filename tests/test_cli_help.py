"""Every command-line entry point of the project answers --help with its usage and exit status 0, and does nothing
else (issue 30, finding 6: `python -m analysis.compare --help` crashed on a '%' in a help text; three scripts took
'--help' for an output path or ignored it and ran: one of them regenerated the committed regression baseline).

The entry points are found, not listed: every tracked .py file with an `if __name__ == "__main__":` block and every
package with a __main__.py, so a new one cannot be forgotten. Each runs in a child forked from one interpreter that
has imported the heavy libraries once (a fresh interpreter per entry point takes ~5 s each on a 2-core machine), in
an empty working directory that must stay empty.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a child interpreter: import the heavy shared libraries once, then fork one child per entry point.
PROBE = r"""
import contextlib, io, json, os, runpy, sys
import numpy, pandas, scipy.stats, torch, transformers  # noqa: F401  (shared by most entry points; no thread starts)
root, entries = sys.argv[1], json.loads(sys.argv[2])
results = {}
for kind, target, shown in entries:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        out = os.fdopen(write, "w")
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        code = 0
        try:
            if kind == "module":
                sys.argv = [shown, "--help"]
                sys.path[0] = root
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                sys.argv = [target, "--help"]
                sys.path[0] = os.path.dirname(target)
                runpy.run_path(target, run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:  # noqa: BLE001 -- reported to the parent as a failure with its text
            print(f"{type(exc).__name__}: {exc}")
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    results[shown] = (os.waitstatus_to_exitcode(status), text)
print(json.dumps(results))
"""


def _has_main_block(path: Path) -> bool:
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and \
                isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__" and \
                any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators):
            return True
    return False


def entry_points() -> list[tuple[str, str, str]]:
    """(kind, target, how a person runs it): 'module' for a file inside a package or a package's __main__.py
    (python -m), 'path' for a script (python path/to/script.py)."""
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    found = []
    for rel in sorted(tracked):
        path = ROOT / rel
        if not path.is_file():
            continue
        package = (path.parent / "__init__.py").exists()
        if path.name == "__main__.py" and package:
            dotted = ".".join(path.parent.relative_to(ROOT).parts)
            found.append(("module", dotted, f"python -m {dotted}"))
        elif path.name != "__main__.py" and _has_main_block(path):
            if package:
                dotted = ".".join(path.with_suffix("").relative_to(ROOT).parts)
                found.append(("module", dotted, f"python -m {dotted}"))
            else:
                found.append(("path", str(path), f"python {rel}"))
    return found


def test_entry_points_are_found():
    shown = {s for _, _, s in entry_points()}
    for expected in ("python -m harness", "python -m harness.fetch_data", "python -m analysis.compare",
                     "python -m analysis.report", "python -m analysis.draws", "python -m analysis.regress",
                     "python -m analysis.robustness", "python benchmarks/interval_coverage.py",
                     "python scripts/produce/gptqmodel.py", "python tests/regression_suite.py"):
        assert expected in shown, sorted(shown)


def test_finding6_every_entry_point_answers_help_with_its_usage(tmp_path):
    entries = entry_points()
    done = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), json.dumps(entries)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    failed = {shown: (rc, text[-600:]) for shown, (rc, text) in results.items()
              if rc != 0 or not ("usage:" in text or "== Config ==" in text)}  # Hydra's help for python -m harness
    assert not failed, failed
    assert len(results) == len(entries)
    assert list(tmp_path.iterdir()) == []  # --help wrote nothing
