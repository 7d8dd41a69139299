"""The import contract: imports point down the layers only (core <- structure <- methods, kernels <- checkpoints <-
harness), and the analysis of finished runs stands apart: it imports no other project package and no torch, so
compare, report and regress can never run a model.

Reads every import statement of the project's packages with ast, including imports inside functions, so a lazy
import cannot hide an upward dependency."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> the project packages it may import (itself included)
ALLOWED = {
    "core": {"core"},
    "structure": {"core", "structure"},
    "methods": {"core", "structure", "methods"},
    "kernels": {"core", "kernels"},
    "checkpoints": {"core", "structure", "methods", "kernels", "checkpoints"},
    "harness": {"core", "structure", "methods", "kernels", "checkpoints", "harness", "analysis"},
    "analysis": {"analysis"},
}
# Libraries the analysis never imports: it reads results/ only.
MODEL_LIBRARIES = {"torch", "transformers", "triton", "lm_eval", "accelerate", "safetensors"}


def project_imports(path: Path, packages=ALLOWED) -> list[tuple[int, str]]:
    """(line, top-level package) of every import of one of `packages` (default: the project's) in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in packages]
    return found


def violations(package: str) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {target}"
            for path in sorted((ROOT / package).rglob("*.py"))
            for line, target in project_imports(path) if target not in ALLOWED[package]]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down_the_layers(package):
    assert violations(package) == []


def test_the_analysis_never_imports_torch_or_the_model_libraries():
    found = [f"{path.relative_to(ROOT)}:{line} imports {target}" for path in sorted((ROOT / "analysis").rglob("*.py"))
             for line, target in project_imports(path, MODEL_LIBRARIES)]
    assert found == []


def test_the_contract_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from harness.run import execute\n    import methods.gptq\n")
    assert [target for _, target in project_imports(bad)] == ["harness", "methods"]


def test_every_package_of_the_project_is_in_the_contract():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages == set(ALLOWED)


def test_methods_never_import_streaming():
    """A method is per-block maths: where weights live is the block pipeline's business (structure/pipeline.py)."""
    found = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in sorted((ROOT / "methods").rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, (ast.Import, ast.ImportFrom))
             and any("streaming" in name for name in ([a.name for a in node.names] + [getattr(node, "module", "")
                                                                                       or ""]))]
    assert found == []


def test_the_block_pipeline_holds_the_one_block_loop():
    """Blocks are materialized in one place, BlockPipeline.walk: no other module asks a residency for a block (the
    checker sees `<...>residency.block(...)` calls)."""
    found = [f"{path.relative_to(ROOT)}:{node.lineno}"
             for package in ALLOWED for path in sorted((ROOT / package).rglob("*.py"))
             if path != ROOT / "structure" / "pipeline.py" and path != ROOT / "structure" / "streaming.py"
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("residency.block")]
    assert found == []


def test_the_launcher_plugin_sits_on_top_of_the_harness():
    """hydra_plugins/ (a namespace Hydra instantiates launchers from) holds thin classes over harness/launcher.py: it
    may import the harness, nothing below it directly."""
    found = [f"{path.relative_to(ROOT)}:{line} imports {target}"
             for path in sorted((ROOT / "hydra_plugins").rglob("*.py"))
             for line, target in project_imports(path) if target != "harness"]
    assert found == []
