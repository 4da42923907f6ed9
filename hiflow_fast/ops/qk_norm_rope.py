"""hiflow_fast::qk_norm_rope -- fused q/k RMSNorm + NTK-scaled RoPE as a torch custom op.

    qk_norm_rope(q, k, q_weight, k_weight, ids, axes_dim, theta, ntk_factor, eps, ...)
        -> (q_out, k_out)            [B, S, H, D], in the layout the attention backends take

The op writes into preallocated outputs declared as mutated (`q_out`, `k_out`); they may be
q and k themselves (`inplace=True`: no extra memory). Kernel: kernels/qk_norm_rope.py; oracle:
hiflow_fast.ref.qk_norm_rope. On a GPU the op is a `torch.library.triton_op` (torch.compile
traces into the kernel); under Triton's CPU interpreter (TRITON_INTERPRET=1) it is an opaque
`torch.library.custom_op` with a fake implementation (see hiflow_fast.ops.registration).
Import this module on its own; it registers the op once.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from hiflow_fast.errors import HiFlowInputError
from hiflow_fast.ops.head_tensors import check_head_tensor
from hiflow_fast.kernels.qk_norm_rope import INTERPRET, fp32_split, launch_qk_norm_rope
from hiflow_fast.ops.registration import kernel_launcher, kernel_op, no_output

MAX_HEAD_DIM = 512
MAX_AXES = 3


@kernel_op("hiflow_fast::qk_norm_rope", mutates_args={"q_out", "k_out"}, interpreted=INTERPRET, fake=no_output)
def _qk_norm_rope_op(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    q_weight_txt: Optional[torch.Tensor],
    k_weight_txt: Optional[torch.Tensor],
    ids: Optional[torch.Tensor],
    axes_dim: list[int],
    theta: float,
    eps: float,
    n_txt: int,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
) -> None:
    """q_out, k_out <- rope(rmsnorm(q)), rope(rmsnorm(k)). `theta` already includes the NTK
    factor; ids None = norm only. Inputs are validated by `qk_norm_rope`."""
    pairs = [d // 2 for d in axes_dim] + [0] * (MAX_AXES - len(axes_dim))
    log_theta_hi, log_theta_lo = fp32_split(math.log(theta))
    launch_qk_norm_rope(
        q,
        k,
        q_out,
        k_out,
        q_weight,
        k_weight,
        q_weight_txt if q_weight_txt is not None else q_weight,
        k_weight_txt if k_weight_txt is not None else k_weight,
        ids,
        (pairs[0], pairs[1], pairs[2]),
        log_theta_hi,
        log_theta_lo,
        eps,
        n_txt,
        apply_rope=ids is not None,
        launcher=kernel_launcher(INTERPRET),
    )


def _check_inputs(q, k, q_weight, k_weight, q_weight_txt, k_weight_txt, ids, axes_dim, n_txt) -> None:
    for name, t in (("q", q), ("k", k)):
        check_head_tensor(name, t, interpreted=INTERPRET)
    if k.shape != q.shape:
        raise HiFlowInputError("k.shape", tuple(k.shape), f"the shape of q, {tuple(q.shape)}")
    if k.dtype != q.dtype or k.device != q.device:
        raise HiFlowInputError("k.dtype/device", (k.dtype, k.device), f"those of q, {(q.dtype, q.device)}")
    head_dim, seq_len = q.shape[-1], q.shape[1]
    if head_dim % 2 or not 2 <= head_dim <= MAX_HEAD_DIM:
        raise HiFlowInputError("head_dim", head_dim, f"an even number from 2 to {MAX_HEAD_DIM}")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight), ("q_weight_txt", q_weight_txt), ("k_weight_txt", k_weight_txt)):
        if w is not None and (w.shape != (head_dim,) or w.device != q.device):
            raise HiFlowInputError(f"{name}.shape", tuple(w.shape), f"({head_dim},) on {q.device}")
    if (q_weight is None) != (k_weight is None):
        raise HiFlowInputError("k_weight", None if k_weight is None else "tensor", "given exactly when q_weight is")
    if not 0 <= n_txt <= seq_len:
        raise HiFlowInputError("n_txt", n_txt, f"0 to the sequence length {seq_len}")
    if ids is not None:
        axes = list(axes_dim or [])
        if not 1 <= len(axes) <= MAX_AXES or any(d <= 0 or d % 2 for d in axes) or sum(axes) != head_dim:
            raise HiFlowInputError(
                "axes_dim", axes_dim, f"1 to {MAX_AXES} positive even sizes that sum to the head dim {head_dim}"
            )
        if ids.dim() != 2 or ids.shape[0] != seq_len or ids.shape[1] != len(axes):
            raise HiFlowInputError("ids.shape", tuple(ids.shape), f"({seq_len}, {len(axes)}): one row per token")
        if ids.device != q.device:
            raise HiFlowInputError("ids.device", ids.device, f"the device of q, {q.device}")


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
    axes_dim: list[int] | tuple[int, ...] | None = None,
    theta: float = 10000.0,
    ntk_factor: float = 1.0,
    eps: float = 1e-6,
    *,
    q_weight_txt: torch.Tensor | None = None,
    k_weight_txt: torch.Tensor | None = None,
    n_txt: int = 0,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm q and k over the head dim, then rotate them by NTK-scaled RoPE (ids [S, n_axes],
    theta * ntk_factor on every axis). q, k: [B, S, H, D] fp16/bf16/fp32, head dim unit-stride.
    The first `n_txt` tokens use the `*_weight_txt` norm weights (Flux's joint text + image
    sequence). `inplace=True` overwrites q and k and returns them."""
    _check_inputs(q, k, q_weight, k_weight, q_weight_txt, k_weight_txt, ids, axes_dim, n_txt)
    if inplace:
        q_out, k_out = q, k
    else:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    ids32 = ids.float() if ids is not None else None
    torch.ops.hiflow_fast.qk_norm_rope(
        q,
        k,
        q_weight,
        k_weight,
        q_weight_txt,
        k_weight_txt,
        ids32,
        list(axes_dim) if ids is not None else [],
        float(theta) * float(ntk_factor),
        float(eps),
        int(n_txt),
        q_out,
        k_out,
    )
    return q_out, k_out
