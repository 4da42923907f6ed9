"""Fused q/k RMSNorm + NTK-scaled RoPE (reference): the oracle of hiflow_fast::qk_norm_rope.

    y   = x * rsqrt(mean(x^2, -1) + eps) * w      (w = text weight on the first n_txt tokens)
    out = rope(y)                                 (hiflow_fast.ref.rope, float64 angles)

All math in fp32 with one rounding to the input dtype at the end (diffusers rounds after the
norm, after the weight and after the rotation). q and k are [B, S, H, D]; ids [S, n_axes].
`ids=None` skips the rotation (norm only).
"""

from __future__ import annotations

import torch

from .rope import apply_rope, ntk_rope_cos_sin


def rms_norm_tokens(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    weight_txt: torch.Tensor | None = None,
    n_txt: int = 0,
) -> torch.Tensor:
    """fp32 RMSNorm of [B, S, H, D] over D; the first n_txt tokens use `weight_txt`."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        w = weight.float().expand(x.shape[1], -1)
        if n_txt > 0:
            wt = (weight if weight_txt is None else weight_txt).float()
            w = torch.cat([wt.expand(n_txt, -1), w[n_txt:]], dim=0)
        y = y * w[None, :, None, :]
    return y


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    ids: torch.Tensor | None,
    axes_dim: list[int] | tuple[int, ...],
    theta: float = 10000.0,
    ntk_factor: float = 1.0,
    eps: float = 1e-6,
    q_weight_txt: torch.Tensor | None = None,
    k_weight_txt: torch.Tensor | None = None,
    n_txt: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) normalised and rotated, in the dtype of q and k."""
    qn = rms_norm_tokens(q, q_weight, eps, q_weight_txt, n_txt)
    kn = rms_norm_tokens(k, k_weight, eps, k_weight_txt, n_txt)
    if ids is not None:
        cos, sin = ntk_rope_cos_sin(ids, axes_dim, theta=theta, ntk_factor=ntk_factor)
        qn = apply_rope(qn, cos, sin)
        kn = apply_rope(kn, cos, sin)
    return qn.to(q.dtype), kn.to(k.dtype)
