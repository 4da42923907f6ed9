"""Choice of the guidance-step backend, made once per call site.

    "triton"  the fused Triton kernels (hiflow_fast.ops); on a machine without CUDA they run
              through Triton's CPU interpreter (slow: for tests and conformance only)
    "ref"     the plain-PyTorch reference (hiflow_fast.ref): the CPU path
    "auto"    triton when CUDA and Triton are available (and the tensors are on a GPU), else ref

The request comes from the `backend=` argument; when that is None the environment variable
HIFLOW_BACKEND is read; when that is unset too, "auto". A backend that is requested but cannot
run is a HiFlowInputError, never a silent fallback.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from .errors import HiFlowInputError
from .interpreter import use_triton_interpreter

ENV_VAR = "HIFLOW_BACKEND"
BACKENDS = ("auto", "triton", "ref")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _normalise(requested: str | None, field: str = "backend") -> tuple[str, str]:
    """(backend name, where it came from) after applying the argument > env > default order."""
    if requested is not None:
        source, value = field, requested
    elif os.environ.get(ENV_VAR):
        source, value = ENV_VAR, os.environ[ENV_VAR]
    else:
        source, value = "default", "auto"
    if not isinstance(value, str) or value.strip().lower() not in BACKENDS:
        raise HiFlowInputError(source, value, f"one of {', '.join(BACKENDS)}")
    return value.strip().lower(), source


def resolve_backend(requested: str | None, *, device: torch.device | str | None = None, field: str = "backend") -> str:
    """Return "triton" or "ref" for a request ("auto", "triton", "ref" or None = $HIFLOW_BACKEND
    or "auto"). `device` (optional) is where the tensors live: "auto" picks Triton only for
    CUDA tensors (or, with no device given, when CUDA is available).

    Under torch.compile the answer is a trace-time constant (no graph break, nothing on the
    compiled hot path)."""
    device_type = torch.device(device).type if device is not None else None
    return _resolve(requested, device_type, field)


def _resolve(requested: str | None, device_type: str | None, field: str) -> str:
    name, source = _normalise(requested, field)
    if name == "ref":
        return "ref"
    if name == "auto":
        on_gpu = torch.cuda.is_available() if device_type is None else device_type == "cuda"
        return "triton" if on_gpu and triton_available() else "ref"
    # Explicitly "triton".
    if not triton_available():
        raise HiFlowInputError(source, name, "'ref' or 'auto': the triton package is not installed")
    if device_type not in (None, "cpu", "cuda"):
        raise HiFlowInputError("device", device_type, "'cuda' or 'cpu' for the triton backend")
    load_triton_ops(interpret=device_type == "cpu" or not torch.cuda.is_available())
    return "triton"


# A trace-time constant under torch.compile: what `torch.compiler.assume_constant_result` does
# (it sets this attribute), without calling it, because it imports torch._dynamo, which imports
# triton, and importing this module must leave entry points free to switch Triton to its
# interpreter first. tests/test_interpreter.py checks the attribute is still the decorator's.
_DYNAMO_CONSTANT_MARK = "_dynamo_marked_constant"
setattr(_resolve, _DYNAMO_CONSTANT_MARK, True)


def load_triton_ops(*, interpret: bool | None = None):
    """Import hiflow_fast.ops.guidance_ops (registering the hiflow_fast:: ops) and return it.

    On a machine without CUDA (or `interpret=True`) Triton must run its interpreter, which is
    decided when a kernel is *defined*: TRITON_INTERPRET=1 is set here if no kernel module was
    imported yet, and an error names the fix if they were imported compiled."""
    if interpret is None:
        interpret = not torch.cuda.is_available()
    if interpret:
        use_triton_interpreter()
    return importlib.import_module("hiflow_fast.ops.guidance_ops")

