"""Direction + acceleration alignment and the Euler step of the "v_theta" flow (reference).

With x the current latent, x0g the direction-aligned clean estimate and ref the upsampled
reference clean estimate (all [B, C, h, w]):

    v     = (x - x0g) / (sigma + 1e-6)
    v_ref = (x - ref) / (sigma + 1e-6)
    v    <- v + beta * ((v_prev - v_ref_prev) - (v - v_ref))     from a stage's second step on
    x'    = x + (sigma_next - sigma) * v

The 1e-6 is the official code's: v is rescaled slightly even when alpha = 0. The written state
is (v, v_ref); v_prev is the previous step's *final* v (the recursion is the official one).
"""

from __future__ import annotations

import torch

# The official velocity formula's epsilon, kept for conformance.
VELOCITY_EPS = 1e-6


def guided_velocity_update(
    x: torch.Tensor,
    x0_guided: torch.Tensor,
    ref: torch.Tensor,
    sigma: float,
    sigma_next: float,
    beta: float,
    v_prev: torch.Tensor | None = None,
    v_ref_prev: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (x_next, v, v_ref) in fp32."""
    x = x.float()
    denom = sigma + VELOCITY_EPS
    v = (x - x0_guided.float()) / denom
    v_ref = (x - ref.float()) / denom
    if v_prev is not None:
        if v_ref_prev is None:
            raise ValueError("v_ref_prev is required with v_prev")
        v = v + beta * ((v_prev.float() - v_ref_prev.float()) - (v - v_ref))
    x_next = x + (sigma_next - sigma) * v
    return x_next, v, v_ref
