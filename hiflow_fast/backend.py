"""Choice of the guidance-step backend, made once per call site.

    "triton"  the fused Triton kernels (hiflow_fast.ops); on a machine without CUDA they run
              through Triton's CPU interpreter (slow: for tests and conformance only)
    "native"  the C++/CUDA ops of csrc/ (hiflow_fast.native), built on first use into a per-user
              cache; for setups without a working Triton (and a CPU path ~2x faster than ref)
    "ref"     the plain-PyTorch reference (hiflow_fast.ref): the CPU path
    "auto"    per device:
              CUDA tensors: triton when Triton is installed; else native when an up-to-date
                            native CUDA build is already cached (never compiled by auto); else ref
              CPU tensors:  ref, always

The request comes from the `backend=` argument; when that is None the environment variable
HIFLOW_BACKEND is read; when that is unset too, "auto". A backend that is requested but cannot
run is a HiFlowInputError, never a silent fallback.

Why "auto" never picks native on a CPU, even when it is built: the guidance step is a small part
of a CPU run (the transformer dominates), and whether a build happens to sit in the cache is
hidden state: the same command would give results that differ in the last bits (native and ref
agree to ~1e-7, not bit for bit) depending on what ran before, and the conformance numbers of
`auto` would move with it. On a GPU without Triton there is no such trade: native is the only
fused path, so auto takes it when it is already built (a compile of a minute is never started
by auto; `python -m hiflow_fast.native` or one explicit `backend="native"` run builds it).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from .errors import HiFlowInputError
from .interpreter import use_triton_interpreter

ENV_VAR = "HIFLOW_BACKEND"
BACKENDS = ("auto", "triton", "native", "ref")


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
    """Return "triton", "native" or "ref" for a request ("auto", "triton", "native", "ref" or
    None = $HIFLOW_BACKEND or "auto"). `device` (optional) is where the tensors live: "auto"
    picks Triton (or a cached native build) only for CUDA tensors (or, with no device given,
    when CUDA is available). An explicit "native" builds and loads the native ops if needed.

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
        if not on_gpu:
            return "ref"
        if triton_available():
            return "triton"
        return "native" if _native_cuda_build_cached() else "ref"
    if name == "native":
        from .native import load_native_ops

        on_gpu = torch.cuda.is_available() if device_type is None else device_type == "cuda"
        load_native_ops(device_type="cuda" if on_gpu else device_type, field=source, requested=name)
        return "native"
    # Explicitly "triton".
    if not triton_available():
        raise HiFlowInputError(source, name, "'ref' or 'auto': the triton package is not installed")
    if device_type not in (None, "cpu", "cuda"):
        raise HiFlowInputError("device", device_type, "'cuda' or 'cpu' for the triton backend")
    load_triton_ops(interpret=device_type == "cpu" or not torch.cuda.is_available())
    return "triton"


def _native_cuda_build_cached() -> bool:
    """Whether auto may use native on a GPU: a CUDA build for these sources is cached (and is
    then loaded; no compiler runs)."""
    from .native import NativeUnavailable, is_built, load

    if not is_built("cuda"):
        return False
    try:
        load("cuda")
    except NativeUnavailable:
        return False
    return True


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

