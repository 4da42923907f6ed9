"""hiflow_fast::flash_attention -- our tiled Triton flash attention as a torch custom op.

    flash_attention(q, k, v, scale=None, *, rope=None) -> out        all [B, S, H, D]
    flash_attention_with_lse(q, k, v, scale=None) -> (out, lse)       lse [B, S_q, H] fp32

The second (op `hiflow_fast::flash_attention_lse`) also returns the row log-sum-exp,
lse[b, s, h] = logsumexp_t(scale * q[b, s, h] . k[b, t, h]) (natural log), which ring attention
needs to merge the partial outputs of its K/V chunks (diffusers' TemplatedRingAttention):
    out = o1 - sigmoid(l2 - l1) * (o1 - o2),  lse = l1 - logsigmoid(l1 - l2).

Non-causal softmax attention with any scale (HiFlow's proportional attention), head dims 16 to
256, fp16/bf16 (fp32 for tests), optionally rotating q and k by RoPE first
(`rope=RopeSpec(ids, axes_dim, theta)`: one rotation pass into two new buffers, then attention;
see kernels/flash_attention.py for why not on load). Kernel: kernels/flash_attention.py; oracle:
hiflow_fast.ref.attention.attention. On a GPU the op is a `torch.library.triton_op`; under
Triton's CPU interpreter (TRITON_INTERPRET=1) an opaque `torch.library.custom_op` with a fake
implementation (see hiflow_fast.ops.registration). Import this module on its own; it registers
the op once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from hiflow_fast.errors import HiFlowInputError
from hiflow_fast.ops.head_tensors import check_head_tensor
from hiflow_fast.kernels.flash_attention import INTERPRET, check_launchable, launch_flash_attention
from hiflow_fast.ops.registration import kernel_launcher, kernel_op

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256
MAX_AXES = 3
MAX_INT32_OFFSET = 2**31


@dataclass(frozen=True)
class RopeSpec:
    """RoPE to apply inside the attention kernel: ids [S, n_axes] (one row per token of the
    joint sequence), the per-axis dims (sum = head dim) and theta (times the NTK factor)."""

    ids: torch.Tensor
    axes_dim: tuple[int, ...]
    theta: float = 10000.0


def _flash_attention_fake(q, k, v, scale, rope_ids=None, rope_axes_dim=None, rope_theta=10000.0):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@kernel_op("hiflow_fast::flash_attention", mutates_args=(), interpreted=INTERPRET, fake=_flash_attention_fake)
def _flash_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rope_ids: Optional[torch.Tensor] = None,
    rope_axes_dim: Optional[list[int]] = None,
    rope_theta: float = 10000.0,
) -> torch.Tensor:
    """softmax(scale q k^T) v on [B, S, H, D]; inputs validated by `flash_attention`."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    pairs = [0, 0, 0]
    if rope_ids is not None and rope_axes_dim is not None:
        pairs = [d // 2 for d in rope_axes_dim] + [0] * (MAX_AXES - len(rope_axes_dim))
    launch_flash_attention(
        q,
        k,
        v,
        out,
        scale,
        rope_ids,
        (pairs[0], pairs[1], pairs[2]),
        rope_theta,
        launcher=kernel_launcher(INTERPRET),
    )
    return out


def _flash_attention_lse_fake(q, k, v, scale):
    batch, seq_q, heads, _ = q.shape
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(batch, seq_q, heads, dtype=torch.float32, device=q.device))


@kernel_op("hiflow_fast::flash_attention_lse", mutates_args=(), interpreted=INTERPRET, fake=_flash_attention_lse_fake)
def _flash_attention_lse_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(scale q k^T) v, logsumexp(scale q k^T)) on [B, S, H, D]; inputs validated by
    `flash_attention_with_lse`."""
    batch, seq_q, heads, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, seq_q, heads, dtype=torch.float32, device=q.device)
    launch_flash_attention(q, k, v, out, scale, lse=lse, launcher=kernel_launcher(INTERPRET))
    return out, lse


def check_flash_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: RopeSpec | None = None) -> None:
    """HiFlowInputError (field, value, allowed values) for anything the kernel cannot take."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_head_tensor(name, t, interpreted=INTERPRET)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise HiFlowInputError("k.dtype/v.dtype", (k.dtype, v.dtype), f"the dtype of q, {q.dtype}")
    if k.device != q.device or v.device != q.device:
        raise HiFlowInputError("k.device/v.device", (k.device, v.device), f"the device of q, {q.device}")
    batch, _, heads, head_dim = q.shape
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise HiFlowInputError("head_dim", head_dim, f"{MIN_HEAD_DIM} to {MAX_HEAD_DIM}")
    if not INTERPRET:
        try:
            check_launchable(head_dim, q.element_size())
        except ValueError as exc:  # no tile of this head dim and dtype fits this GPU's shared memory
            raise HiFlowInputError("head_dim/dtype", (head_dim, q.dtype), f"a smaller head dim or dtype: {exc}") from None
    if k.shape[0] != batch or k.shape[2] != heads or k.shape[3] != head_dim:
        raise HiFlowInputError("k.shape", tuple(k.shape), f"[{batch}, S_k, {heads}, {head_dim}] (q is {tuple(q.shape)})")
    if v.shape != k.shape:
        raise HiFlowInputError("v.shape", tuple(v.shape), f"the shape of k, {tuple(k.shape)}")
    for name, t in (("k", k), ("v", v)):
        # The kernel offsets K/V rows within one (batch, head) in 32 bits.
        if t.shape[1] * t.stride(1) >= MAX_INT32_OFFSET:
            raise HiFlowInputError(f"{name}.shape[1] * {name}.stride(1)", t.shape[1] * t.stride(1), f"below {MAX_INT32_OFFSET}")
    if rope is not None:
        axes = list(rope.axes_dim)
        if not 1 <= len(axes) <= MAX_AXES or any(d <= 0 or d % 2 for d in axes) or sum(axes) != head_dim:
            raise HiFlowInputError(
                "rope.axes_dim", rope.axes_dim, f"1 to {MAX_AXES} positive even sizes that sum to the head dim {head_dim}"
            )
        if q.shape[1] != k.shape[1]:
            raise HiFlowInputError("k.shape[1]", k.shape[1], f"the query length {q.shape[1]} (RoPE needs one id row per token)")
        if rope.ids.dim() != 2 or rope.ids.shape != (q.shape[1], len(axes)) or rope.ids.device != q.device:
            raise HiFlowInputError(
                "rope.ids.shape", tuple(rope.ids.shape), f"({q.shape[1]}, {len(axes)}) on {q.device}: one row per token"
            )
        if not rope.theta > 0:
            raise HiFlowInputError("rope.theta", rope.theta, "a positive number")


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *, rope: RopeSpec | None = None
) -> torch.Tensor:
    """softmax(scale * q k^T) v for q [B, S_q, H, D], k and v [B, S_k, H, D] (non-causal);
    scale defaults to 1/sqrt(D). With `rope`, q and k are rotated (into new buffers) first."""
    check_flash_attention_inputs(q, k, v, rope)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if rope is None:
        return torch.ops.hiflow_fast.flash_attention(q, k, v, float(scale))
    return torch.ops.hiflow_fast.flash_attention(
        q, k, v, float(scale), rope.ids.float(), list(rope.axes_dim), float(rope.theta)
    )


def flash_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) for q [B, S_q, H, D], k and v [B, S_k, H, D] (non-causal): out as
    `flash_attention` (q's dtype), lse [B, S_q, H] fp32 the natural-log log-sum-exp of each
    query row's scaled scores, logsumexp_t(scale * q_s . k_t). scale defaults to 1/sqrt(D).
    No RoPE here: rotate q and k first (ops.qk_norm_rope), as the Flux blocks do."""
    check_flash_attention_inputs(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.ops.hiflow_fast.flash_attention_lse(q, k, v, float(scale))
