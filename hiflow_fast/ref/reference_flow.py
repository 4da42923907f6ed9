"""The reference flow in latent space and the stage-entry re-noising (reference).

latent_reference: the previous stage's clean estimate x0 (packed, at its possibly padded size)
upsampled bicubically (PyTorch's align_corners=False, A = -0.75, clamped borders) to the
current latent grid. renoise: sigma * noise + (1 - sigma) * latents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..latents import unpack


def latent_reference(ref_packed: torch.Tensor, ref_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """[B, N_ref, 4C] packed at latent size ref_hw -> [B, C, h, w] bicubic (fp32)."""
    ref = unpack(ref_packed, *ref_hw).float()
    return F.interpolate(ref, size=tuple(hw), mode="bicubic", align_corners=False)


def renoise(latents: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """Flow-matching forward process at sigma: sigma * noise + (1 - sigma) * latents."""
    return sigma * noise + (1.0 - sigma) * latents
