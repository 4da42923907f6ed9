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


# ---- fast layout copies (the CPU guidance step) ---------------------------------------------
# `pack`/`unpack`/`swin_pad_packed` above are the plain definitions; these write into a given
# buffer and are arranged for a CPU, where a permuted copy with a short inner loop costs several
# times a plain one. Each equals its plain counterpart bit for bit (tests/test_latents.py).


def _split(unpacked: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] (any strides) as a view [B, C, h/2, 2, w/2, 2]."""
    b, c, h, w = unpacked.shape
    return unpacked.view(b, c, h // 2, 2, w // 2, 2)


# An integer dtype as wide as two elements of a float dtype: a 2x2 patch row (dx = 0, 1) moves as
# one element, which halves the element count of the transposing copy.
_PAIR_DTYPE = {torch.float32: torch.int64, torch.float16: torch.int32, torch.bfloat16: torch.int32}


def unpack_into(out: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Copy packed [B, (h/2)(w/2), 4C] (contiguous, out's dtype) into the contiguous [B, C, h, w]
    tensor `out`, the (dx = 0, 1) pairs moved as single wide elements: ~2x faster on a CPU than a
    6-D permuted copy, and faster than reading the packed tensor through a strided view."""
    b, c, h, w = out.shape
    pair = _PAIR_DTYPE[out.dtype]
    source = packed.view(b, h // 2, w // 2, c, 2, 2).view(pair).squeeze(-1)  # [B, h/2, w/2, C, dy]
    out.view(b, c, h // 2, 2, w // 2, 2).view(pair).squeeze(-1).copy_(source.permute(0, 3, 1, 4, 2))
    return out


def pack_into(out: torch.Tensor, unpacked: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Copy [B, C, h, w] (any strides) into the packed [B, (h/2)(w/2), 4C] tensor `out`, with the
    dtype conversion folded in. Two copies: first whole row pairs are gathered ([B, h/2, C, 2, w],
    long contiguous runs, converting the dtype), then the (dx = 0, 1) pairs are moved as single
    wide elements into patch order. One direct 6-D permuted copy is ~3x slower on a CPU.
    `scratch`: a contiguous tensor of out's dtype with at least out.numel() elements to hold the
    gathered rows (default: a new one)."""
    b, c, h, w = unpacked.shape
    shape = (b, h // 2, c, 2, w // 2, 2)
    if scratch is None:
        rows = torch.empty(shape, dtype=out.dtype, device=unpacked.device)
    else:
        rows = scratch.view(-1)[: out.numel()].view(shape)
    rows.copy_(_split(unpacked).permute(0, 2, 1, 3, 4, 5))
    pair = _PAIR_DTYPE[out.dtype]
    target = out.view(b, h // 2, w // 2, c, 2, 2).view(pair).squeeze(-1)  # [B, h/2, w/2, C, 2]
    target.copy_(rows.view(pair).squeeze(-1).permute(0, 1, 4, 2, 3))
    return out


def swin_move_into(out: torch.Tensor, packed: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Copy packed latents on the grid `hw` into `out`, packed on the grid one swin pad larger
    (hw + 2, zero ring) or one crop smaller (hw - 2), without unpacking.

    A pad shifts every latent pixel by one, so output patch P, phase d (0 or 1, per axis) holds
    input patch P - 1 + d, phase 1 - d; a crop the reverse, input patch P + d, phase 1 - d.
    That is four strided copies, one per output phase (dy, dx), each a quarter of the latent,
    plus zeroing the patch row and column each phase misses when padding."""
    b, tokens, features = packed.shape
    h, w = hw
    grow = out.shape[1] > tokens
    oh, ow = (h + 2, w + 2) if grow else (h - 2, w - 2)
    source = packed.view(b, h // 2, w // 2, features // 4, 2, 2)
    target = out.view(b, oh // 2, ow // 2, features // 4, 2, 2)
    for dy in (0, 1):
        for dx in (0, 1):
            phase = target[..., dy, dx]
            if grow:
                rows, cols = slice(1 - dy, h // 2 + 1 - dy), slice(1 - dx, w // 2 + 1 - dx)
                phase[:, rows, cols].copy_(source[..., 1 - dy, 1 - dx])
                phase[:, 0 if dy == 0 else -1].zero_()
                phase[:, :, 0 if dx == 0 else -1].zero_()
            else:
                phase.copy_(source[:, dy : dy + oh // 2, dx : dx + ow // 2, :, 1 - dy, 1 - dx])
    return out


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
