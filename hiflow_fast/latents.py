"""Flux latent layouts: packing, swin padding and position ids.

Packed latents are [B, N, 4C]: token n is row-major over the (h/2) x (w/2) grid of 2x2 latent
patches and feature 4c + 2dy + dx holds channel c of patch pixel (dy, dx). Unpacked latents are
[B, C, h, w] with h = image_height / 8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Image pixels per latent pixel (the VAE downsamples 8x) and latent pixels per token side.
VAE_DOWNSAMPLE = 8
PATCH = 2
# One swin pad adds one latent pixel on each side: 2 latent pixels = 16 image pixels per side.
SWIN_PAD_PIXELS = 2 * VAE_DOWNSAMPLE


def latent_hw(height: int, width: int) -> tuple[int, int]:
    """Unpacked latent size of an image size in pixels."""
    return height // VAE_DOWNSAMPLE, width // VAE_DOWNSAMPLE


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, (h/2)(w/2), 4C] -> [B, C, h, w]; h, w are the latent (not image) size."""
    b, n, f = latents.shape
    if n != (h // PATCH) * (w // PATCH):
        raise ValueError(f"packed latents have {n} tokens, a {h}x{w} latent grid needs {(h // 2) * (w // 2)}")
    x = latents.view(b, h // PATCH, w // PATCH, f // (PATCH * PATCH), PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, f // (PATCH * PATCH), h, w)


def swin_pad(latents: torch.Tensor) -> torch.Tensor:
    """Zero-pad an unpacked latent by one latent pixel on every side (shifts the patch grid)."""
    return F.pad(latents, (1, 1, 1, 1), mode="constant", value=0.0)


def swin_crop(latents: torch.Tensor) -> torch.Tensor:
    """Undo `swin_pad`: drop the one-pixel border of an unpacked latent."""
    return latents[:, :, 1:-1, 1:-1]


def swin_pad_packed(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Pad packed latents on an (h, w) latent grid to (h + 2, w + 2)."""
    return pack(swin_pad(unpack(latents, h, w)))


def swin_crop_packed(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Crop packed latents on a padded (h, w) latent grid to (h - 2, w - 2)."""
    return pack(swin_crop(unpack(latents, h, w)).contiguous())


def image_ids(h: int, w: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Flux image position ids [(h/2)(w/2), 3] = (0, row, column) of each token."""
    rows = torch.arange(h // PATCH, device=device, dtype=dtype)
    cols = torch.arange(w // PATCH, device=device, dtype=dtype)
    ids = torch.zeros(h // PATCH, w // PATCH, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


def text_ids(length: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Flux text position ids: all zeros."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


def check_finite(latents: torch.Tensor, where: str) -> None:
    """Raise NonFiniteLatentsError when the latents hold NaN or Inf (one host sync)."""
    from .errors import NonFiniteLatentsError

    if not bool(torch.isfinite(latents).all()):
        raise NonFiniteLatentsError(where)
