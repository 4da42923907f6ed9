"""NTK-scaled rotary position embedding for Flux (reference).

Flux splits the head dim over three position axes (axes_dim, e.g. 16/56/56 for FLUX.1-dev) and
rotates pairs (2i, 2i+1) of q and k by pos * freq_i, freq_i = (theta * ntk)^(-2i / axis_dim).
HiFlow multiplies theta by the stage's `ntk_factor` on every axis. Frequencies are computed in
float64, as diffusers' Flux RoPE does (where the device supports it).
"""

from __future__ import annotations

import torch


def ntk_rope_cos_sin(
    ids: torch.Tensor, axes_dim: list[int] | tuple[int, ...], theta: float = 10000.0, ntk_factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [S, sum(axes_dim)] (float32) for position ids [S, n_axes], each value
    repeated for the two members of a rotated pair."""
    freqs_dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    pos = ids.float()
    cos_out, sin_out = [], []
    for axis, dim in enumerate(axes_dim):
        exponent = torch.arange(0, dim, 2, dtype=freqs_dtype, device=ids.device)[: dim // 2] / dim
        freqs = 1.0 / ((theta * ntk_factor) ** exponent)
        angles = torch.outer(pos[:, axis].to(freqs_dtype), freqs)
        cos_out.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin_out.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos_out, dim=-1), torch.cat(sin_out, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, H, D] by tables [S, D]: out = x * cos + rot(x) * sin in fp32, where
    rot(x)[2i] = -x[2i+1] and rot(x)[2i+1] = x[2i]."""
    x_pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    real, imag = x_pairs.unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    out = x.float() * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.to(x.dtype)
