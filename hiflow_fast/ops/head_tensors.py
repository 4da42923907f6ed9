"""The input check the attention-side ops share: a q, k or v in the [B, S, H, D] layout."""

from __future__ import annotations

import torch

from hiflow_fast.errors import HiFlowInputError

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_head_tensor(name: str, t, *, interpreted: bool) -> None:
    """HiFlowInputError (field, value, allowed values) unless `t` is a 4-D [B, S, H, D] tensor of a
    supported dtype with the head dim unit-stride (the kernels load rows of D), on a CUDA device
    -- or on any device when the kernels run under Triton's interpreter (`interpreted`)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        raise HiFlowInputError(f"{name}.shape", getattr(t, "shape", t), "a 4-D tensor [B, S, H, D]")
    if t.dtype not in SUPPORTED_DTYPES:
        raise HiFlowInputError(f"{name}.dtype", t.dtype, "torch.float16, torch.bfloat16 or torch.float32")
    if t.stride(-1) != 1:
        raise HiFlowInputError(f"{name}.stride(-1)", t.stride(-1), "1 (the head dim contiguous)")
    if t.device.type != "cuda" and not interpreted:
        raise HiFlowInputError(
            f"{name}.device", t.device, "a CUDA device (or TRITON_INTERPRET=1 for Triton's CPU interpreter)"
        )
