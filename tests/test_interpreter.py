"""Triton on a CPU: entry points switch to the interpreter before diffusers imports triton, and
a switch that comes too late is a clear error, not a failure inside a kernel.

Runs in subprocesses without TRITON_INTERPRET (this test process has it set by conftest)."""

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")

FAST = ["--size", "128x128", "--steps", "2", "--target-sizes", "192x192", "--highres-steps", "1",
        "--highres-guidance", "4.5", "--filter-ratio", "0.2", "--alphas", "1.0", "--betas", "0.5", "--ntk", "10", "--quiet"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HIFLOW_BACKEND", "HIFLOW_ATTENTION")}
    return env


def test_cli_runs_triton_kernels_and_attention_on_cpu(tmp_path):
    cmd = [sys.executable, "-m", "hiflow_fast.cli", "generate", *FAST, "--backend", "triton", "--attention", "triton", "--seed", "1"]
    result = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "hiflow.png").exists()


def test_switching_after_triton_was_imported_is_a_clear_error(tmp_path):
    code = (
        "import diffusers, triton\n"
        "from hiflow_fast.backend import resolve_backend\n"
        "from hiflow_fast.errors import HiFlowInputError\n"
        "try:\n"
        "    resolve_backend('triton', device='cpu')\n"
        "except HiFlowInputError as e:\n"
        "    print('ERROR', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert "ERROR TRITON_INTERPRET" in result.stdout and "TRITON_INTERPRET=1 python" in result.stdout, result.stderr[-2000:]


def test_entry_point_modules_do_not_import_triton(tmp_path):
    code = "import sys, hiflow_fast.interpreter, hiflow_fast.cli, hiflow_fast.conformance; print('triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "False", result.stderr[-2000:]


def test_backend_module_marks_resolution_constant_as_torch_compiler_would():
    """hiflow_fast.backend marks `_resolve` a trace-time constant by the attribute that
    torch.compiler.assume_constant_result sets (calling the decorator would import triton at
    import time); if torch renames it, this fails instead of compiled steps graph-breaking."""
    from hiflow_fast import backend

    def probe():
        return None

    marked = torch.compiler.assume_constant_result(probe)
    assert getattr(marked, backend._DYNAMO_CONSTANT_MARK, False) is True
    assert getattr(backend._resolve, backend._DYNAMO_CONSTANT_MARK) is True


def test_importing_the_guidance_step_leaves_triton_unimported():
    """Entry points may switch Triton to its interpreter after importing hiflow_fast.guidance and
    the guidance benchmark (they must not import triton, directly or through torch._dynamo)."""
    import subprocess
    import sys

    code = ("import sys, hiflow_fast.guidance, hiflow_fast.bench.bench_guidance, hiflow_fast.bench.bench_transformer; "
            "print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "False"
