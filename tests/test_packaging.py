"""kernels/ is installed as hiflow_fast.kernels and never resolves as a top-level `kernels`."""

import os
import subprocess
import sys

from conftest import REPO_DIR


def _python(code: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_hiflow_fast_kernels_maps_to_the_kernels_folder(tmp_path):
    code = "import hiflow_fast.kernels as k, os; print(os.path.realpath(list(k.__path__)[0]))"
    result = _python(code, str(tmp_path))
    assert result.returncode == 0, result.stderr
    folder = result.stdout.strip()
    # An editable (strict) install links the files, a regular install copies them.
    assert os.path.basename(folder) == "kernels"
    assert os.path.isfile(os.path.join(REPO_DIR, "kernels", "README.md"))


def test_top_level_kernels_never_resolves_into_the_repository(tmp_path):
    code = (
        "import importlib.util, os\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "locs = [] if spec is None else list(spec.submodule_search_locations or [spec.origin])\n"
        f"print(any(os.path.realpath(str(p)).startswith(os.path.realpath({REPO_DIR!r})) for p in locs))"
    )
    assert _python(code, str(tmp_path)).stdout.strip() == "False"


def test_diffusers_imports_from_the_repository_root():
    # From the repository root the folder is at most a PEP 420 namespace portion, which the
    # `kernels` probes of transformers/diffusers treat as absent (an __init__.py would break them).
    assert not os.path.exists(os.path.join(REPO_DIR, "kernels", "__init__.py"))
    code = "from diffusers import FluxTransformer2DModel; import kernels; print(getattr(kernels, '__file__', None))"
    result = _python(code, REPO_DIR)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None" or REPO_DIR not in result.stdout


def test_source_tree_maps_kernels_and_bench():
    # From the repository root (`python -m pytest`, `python -m hiflow_fast.conformance`) the source
    # folder hiflow_fast/ is imported; it maps exactly hiflow_fast.kernels and hiflow_fast.bench.
    code = (
        "import os, hiflow_fast, hiflow_fast.kernels.flash_attention as fa, hiflow_fast.bench.common as bc\n"
        "import importlib.util\n"
        "print(os.path.realpath(hiflow_fast.__file__))\n"
        "print(os.path.realpath(fa.__file__))\n"
        "print(os.path.realpath(bc.__file__))\n"
        "print(importlib.util.find_spec('hiflow_fast.tests') is None)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_DIR, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr
    package, kernel, bench, nothing_else = result.stdout.split()
    root = os.path.realpath(REPO_DIR)
    assert package == os.path.join(root, "hiflow_fast", "__init__.py")
    assert kernel == os.path.join(root, "kernels", "flash_attention.py")
    assert bench == os.path.join(root, "bench", "common.py")
    assert nothing_else == "True"
