"""VAE round trips of HiFlow: the stage-entry guidance latents and the pixel-space reference.

Both go latents -> image -> bicubic resize -> sharpen -> latents, with the official details:
no clamping of the decoded image, bicubic with align_corners=False, the encoder's distribution
mode (no sampling), and Flux's latent normalisation (z - shift) * scale.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from . import latents as L
from .ref.sharpen import sharpen


def decode(vae, packed: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Packed latents on the latent grid `hw` -> image [B, 3, 8h, 8w] in [-1, 1] (not clamped)."""
    z = L.unpack(packed, *hw)
    z = z / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(z.to(vae.dtype), return_dict=False)[0]


def encode(vae, image: torch.Tensor) -> torch.Tensor:
    """Image [B, 3, H, W] -> packed, normalised latents (distribution mode)."""
    z = vae.encode(image.to(vae.dtype)).latent_dist.mode()
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    return L.pack(z)


def resample_and_sharpen(
    image: torch.Tensor, size: tuple[int, int], sigma: float, kernel_size: int, amount: float
) -> torch.Tensor:
    """Bicubic resize to `size` (pixels) followed by unsharp masking."""
    resized = F.interpolate(image, size=size, mode="bicubic", align_corners=False)
    return sharpen(resized, sigma, kernel_size, amount)


def guidance_latents(
    vae,
    packed: torch.Tensor,
    hw: tuple[int, int],
    size: tuple[int, int],
    *,
    sigma: float,
    kernel_size: int = 3,
    amount: float = 1.0,
    image: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initialization alignment: the previous stage's latents, decoded, resized to `size`,
    sharpened and encoded. Returns (guidance latents packed at size/8, the decoded image), so the
    caller can keep the image as the previous stage's result without decoding twice."""
    if image is None:
        image = decode(vae, packed, hw)
    sharpened = resample_and_sharpen(image, size, sigma, kernel_size, amount)
    return encode(vae, sharpened), image


def pixel_reference(
    vae,
    ref_packed: torch.Tensor,
    ref_hw: tuple[int, int],
    hw: tuple[int, int],
    *,
    sigma: float,
    kernel_size: int = 3,
    amount: float = 1.0,
) -> torch.Tensor:
    """The "pixel" reference flow: the previous stage's x0 decoded, resized to the current
    (possibly swin-padded) grid, sharpened and encoded; packed at `hw`."""
    image = decode(vae, ref_packed, ref_hw)
    size = (hw[0] * L.VAE_DOWNSAMPLE, hw[1] * L.VAE_DOWNSAMPLE)
    return encode(vae, resample_and_sharpen(image, size, sigma, kernel_size, amount))


@contextlib.contextmanager
def vae_tiling(vae, enabled: bool) -> Iterator[None]:
    """Set the VAE's tiling flag for the duration (the official pipeline enables tiling after the
    base stage and never restores it; here the user's setting comes back)."""
    had = hasattr(vae, "use_tiling")
    before = getattr(vae, "use_tiling", False)
    if had:
        vae.use_tiling = enabled
    try:
        yield
    finally:
        if had:
            vae.use_tiling = before
