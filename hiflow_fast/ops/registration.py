"""How every `hiflow_fast::*` op is registered with torch and how it launches its Triton kernel.

Compiled Triton (a GPU): the op is a `torch.library.triton_op` and launches its kernels through
`torch.library.wrap_triton`, so torch.compile traces into the kernels and Inductor schedules them;
the fake (meta) implementation is derived from the function itself.

Triton's CPU interpreter (TRITON_INTERPRET=1): the kernels are `InterpretedFunction`s, which
cannot run on fake tensors and which torch 2.11's `wrap_triton` refuses outright ("wrap_triton
only works on functions annotated with triton.jit or triton.autotune"; 2.13 accepts them). So
there the op is an opaque `torch.library.custom_op` with an explicit fake implementation, and
its kernels are launched directly. torch.compile(fullgraph=True) captures the op whole either way.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.library import triton_op, wrap_triton

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - every supported triton has it
    InterpretedFunction = ()


def is_interpreted(kernel: Any) -> bool:
    """Whether a @triton.jit kernel (or an autotuner around one) was defined under the interpreter."""
    while not isinstance(kernel, InterpretedFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn  # Autotuner / Heuristics wrap the jitted function in .fn
    return isinstance(kernel, InterpretedFunction)


def kernel_op(name: str, *, mutates_args, interpreted: bool, fake: Callable[..., Any]):
    """Decorator registering `fn` as the custom op `name`: a triton_op on compiled Triton, else an
    opaque custom_op whose fake implementation is `fake` (same signature as `fn`)."""

    def register(fn):
        if interpreted:
            op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
            op.register_fake(fake)
            return op
        return triton_op(name, fn, mutates_args=mutates_args)

    return register


def _launch_directly(kernel):
    return kernel


def kernel_launcher(interpreted: bool) -> Callable[[Any], Any]:
    """What an op's body wraps each kernel in before `kernel[grid](...)`: wrap_triton inside a
    triton_op, the kernel itself under the interpreter (see the module docstring)."""
    return _launch_directly if interpreted else wrap_triton


def no_output(*args, **kwargs) -> None:
    """Fake implementation of an op that only mutates preallocated outputs."""
    return None
