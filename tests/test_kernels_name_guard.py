"""Our top-level `kernels` package shares its name with the PyPI package `kernels` that transformers
probes for; transformers must never take ours for it (it would route GGUF and other loads through it)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_our_kernels_package_is_the_one_on_the_path():
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and Path(spec.origin).resolve().parent == ROOT / "kernels"


def test_transformers_does_not_mistake_it_for_hub_kernels():
    from transformers.utils import import_utils

    import_utils.is_kernels_available.cache_clear() if hasattr(import_utils.is_kernels_available, "cache_clear") else None
    assert import_utils.is_kernels_available() is False
    _, version = import_utils._is_package_available("kernels", return_version=True)
    # Installed editable, our `kernels` maps to this project's distribution, so transformers reads our version. It
    # must stay outside transformers' accepted hub-kernels range, or transformers would route loads through us.
    from packaging.version import Version

    assert version == "N/A" or not (Version(import_utils.KERNELS_MIN_VERSION) <= Version(version)
                                    < Version(import_utils.KERNELS_MAX_VERSION)), version


def test_kernels_package_import_is_cheap_and_has_no_version():
    import subprocess
    import sys

    probe = "import sys, kernels; print(hasattr(kernels, '__version__'), 'triton' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    has_version, imported_triton, _ = out.split()
    assert has_version == "False"  # transformers reads __version__ to decide it is hub kernels
    assert imported_triton == "False"  # the probe imports our package: it must not pull triton in
