"""Switching Triton to its CPU interpreter, early enough to take effect.

Triton decides between compiling and interpreting when a @triton.jit function is *defined*:
its own standard library when `triton` is imported, our kernels when their modules are. So the
switch (TRITON_INTERPRET=1) must happen before triton is imported, and diffusers, torch.compile's
machinery and our backend module all import it. This module imports neither, so entry points
(the CLI, the conformance runner) can call `prepare_interpreter` first thing.
"""

from __future__ import annotations

import os
import sys

import torch

from .errors import HiFlowInputError

# Every Triton kernel of the package lives under this module prefix (kernels/ is installed there).
_KERNEL_PACKAGE = "hiflow_fast.kernels."
# The environment variables that name a backend; None in `prepare_interpreter` stands for them.
_BACKEND_ENV_VARS = ("HIFLOW_BACKEND", "HIFLOW_ATTENTION")


def use_triton_interpreter() -> None:
    """Set TRITON_INTERPRET=1, or raise HiFlowInputError naming the fix when triton (or one of
    our kernel modules) was already imported compiled, instead of failing inside a kernel."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules or any(name.startswith(_KERNEL_PACKAGE) for name in sys.modules):
        raise HiFlowInputError(
            "TRITON_INTERPRET",
            os.environ.get("TRITON_INTERPRET"),
            "'1' in the environment before triton is imported (diffusers imports it), to run the "
            "triton backend on a CPU: e.g. `TRITON_INTERPRET=1 python ...`",
        )
    os.environ["TRITON_INTERPRET"] = "1"


def prepare_interpreter(backend: str | None, attention: str | None) -> None:
    """For entry points, before diffusers is imported: when the guidance/kernel backend or the
    attention backend is "triton" (arguments, else $HIFLOW_BACKEND / $HIFLOW_ATTENTION) and there
    is no CUDA device, switch Triton to its interpreter while that is still possible."""
    names = [value if value is not None else os.environ.get(var, "") for value, var in zip((backend, attention), _BACKEND_ENV_VARS)]
    if any(str(name).strip().lower() == "triton" for name in names) and not torch.cuda.is_available():
        use_triton_interpreter()
