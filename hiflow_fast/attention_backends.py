"""Attention backends for the HiFlow transformer, chosen by name.

Every backend takes q, k, v as [B, S, H, D] and a softmax scale and returns [B, S, H, D].
Selection: the `attention=` argument, else the environment variable HIFLOW_ATTENTION, else
"sdpa". Availability is decided once; asking for a backend that is missing is an error.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import HiFlowInputError

ENV_VAR = "HIFLOW_ATTENTION"
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


_BACKENDS: dict[str, AttentionFn] = {"sdpa": _sdpa}


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_attention_backend(name: str | None = None) -> tuple[str, AttentionFn]:
    """Resolve a backend name (argument, then $HIFLOW_ATTENTION, then 'sdpa')."""
    chosen = name or os.environ.get(ENV_VAR) or "sdpa"
    if chosen not in _BACKENDS:
        raise HiFlowInputError("attention", chosen, f"one of the available backends: {', '.join(available_backends())}")
    return chosen, _BACKENDS[chosen]
