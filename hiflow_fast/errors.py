"""Errors raised for bad input.

Every message names the field, the value it got and what is allowed, so a user never has to
read a traceback from inside a kernel to find out what they passed wrong.
"""

from __future__ import annotations

from typing import Any


class HiFlowInputError(ValueError):
    """A user-supplied setting or tensor is not acceptable."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        shown = repr(value)
        if len(shown) > 200:
            shown = shown[:197] + "..."
        super().__init__(f"{field}={shown} is not allowed: {allowed}")


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
