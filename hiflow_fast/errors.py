"""Errors raised for bad input, bad model files and failures that can only show up mid-run.

Every message names the field, the value it got and what is allowed, so a user never has to
read a traceback from inside a kernel to find out what they passed wrong. The command line
prints the message as its one `error:` line, with the field renamed to the flag the user typed.
"""

from __future__ import annotations

from typing import Any

import torch


class HiFlowInputError(ValueError):
    """A user-supplied setting or tensor is not acceptable.

    `field` names the argument (an API field such as ``stages[0].alpha``, or a command-line
    flag), `value` is what it got, `allowed` says what is accepted and `where` (optional) says
    which part of a list the value came from, e.g. "high-res stage 1 of 2"."""

    def __init__(self, field: str, value: Any, allowed: str, *, where: str | None = None):
        self.field = field
        self.value = value
        self.allowed = allowed
        self.where = where
        shown = repr(value)
        if len(shown) > 200:
            shown = shown[:197] + "..."
        place = f" ({where})" if where else ""
        super().__init__(f"{field}={shown}{place} is not allowed: {allowed}")

    def renamed(
        self, field: str, *, value: Any = ..., where: str | None = ..., allowed: str | None = None
    ) -> "HiFlowInputError":
        """The same error under another name (the command line's flag for an API field)."""
        return HiFlowInputError(
            field,
            self.value if value is ... else value,
            self.allowed if allowed is None else allowed,
            where=self.where if where is ... else where,
        )


class HiFlowModelError(RuntimeError):
    """A model folder is missing, incomplete or corrupt."""


class NonFiniteLatentsError(FloatingPointError):
    """NaN or Inf appeared in the latents; the image would be silently wrong."""

    def __init__(self, where: str):
        self.where = where
        super().__init__(
            f"non-finite values (NaN/Inf) in the latents {where}; the model, its dtype or the "
            "settings produce invalid values (try float32 or bfloat16 instead of float16)"
        )


class StageOutOfMemoryError(MemoryError):
    """The device ran out of memory in a named stage of a generation."""

    def __init__(self, stage: str, device: Any, detail: str):
        self.stage = stage
        self.device = device
        super().__init__(
            f"out of memory in {stage} on {device} ({detail}); pass --memory-budget (memory_budget=) "
            "to stream the blocks that do not fit (see `hiflow-fast plan`), or try a smaller size, "
            "fewer images, bfloat16, or another attention backend"
        )


# Out of memory raised as a plain RuntimeError: the CPU allocator, cuBLAS and cuDNN workspaces.
_OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure (torch's OutOfMemoryError, MemoryError, or the
    RuntimeErrors the CPU allocator, cuBLAS and cuDNN raise)."""
    if isinstance(exc, StageOutOfMemoryError):
        return True
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = (str(exc).strip().splitlines() or [""])[0]
    return isinstance(exc, RuntimeError) and any(s in message for s in _OUT_OF_MEMORY_MESSAGES)


class ParallelDivergenceError(RuntimeError):
    """Under context parallelism, the ranks' latents differ after a stage; they must be
    replicated bit for bit (hiflow_fast.parallel.check_replicated)."""
