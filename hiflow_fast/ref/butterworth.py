"""Butterworth low-pass masks, as the official code builds them, and in the rfft layout.

Official (centred, i.e. for an fftshift-ed spectrum), for row h of H and column w of W:

    d2(h, w) = (2h/H - 1)^2 + (2w/W - 1)^2
    mask     = 1 / (1 + (d2 / ratio^2)^order)

computed in float64 and stored as float32 (the official Python loop does exactly that; the
golden masks match this to 0). A ratio of 0 gives an all-zero mask (no low band).
"""

from __future__ import annotations

import functools

import torch


def _axis_d(n: int, *, shifted: bool) -> torch.Tensor:
    """Per-index normalised distance 2h/n - 1 (float64); `shifted=False` maps rfft/fft bin f to
    the centred index h = (f + n//2) mod n that fftshift would move it to."""
    index = torch.arange(n, dtype=torch.float64)
    if not shifted:
        index = torch.remainder(index + n // 2, n)
    return 2.0 * index / n - 1.0


def _mask_from_d(dh: torch.Tensor, dw: torch.Tensor, ratio: float, order: int) -> torch.Tensor:
    if ratio == 0.0:
        return torch.zeros(dh.shape[0], dw.shape[0], dtype=torch.float64)
    d2 = dh[:, None] ** 2 + dw[None, :] ** 2
    return 1.0 / (1.0 + (d2 / ratio**2) ** order)


@functools.lru_cache(maxsize=32)
def _centred_mask_cpu(height: int, width: int, ratio: float, order: int) -> torch.Tensor:
    dh = _axis_d(height, shifted=True)
    dw = _axis_d(width, shifted=True)
    return _mask_from_d(dh, dw, ratio, order).to(torch.float32)


def butterworth_lowpass_mask(
    height: int, width: int, ratio: float, order: int = 4, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """The official centred mask [height, width] (float32), for an fftshift-ed 2-D spectrum.

    Vectorised and cached per (shape, ratio, order); the official code rebuilds it with a
    Python loop over every latent pixel at every step.
    """
    mask = _centred_mask_cpu(int(height), int(width), float(ratio), int(order))
    return mask.to(device) if device is not None else mask.clone()


@functools.lru_cache(maxsize=32)
def _rfft_mask_cpu(height: int, width: int, ratio: float, order: int) -> torch.Tensor:
    # Re(ifft2(M * fft2(y))) of a real y equals ifft2(Ms * fft2(y)) with the Hermitian-symmetric
    # part Ms(f) = (M(f) + M(-f)) / 2. For even sizes M is already symmetric; for odd sizes the
    # official centring (2h/n - 1 is not symmetric about the zero bin) makes it not, so the
    # symmetrised mask is what the real low-pass really applies, and what irfft2 needs.
    dh = _axis_d(height, shifted=False)
    dw = _axis_d(width, shifted=False)
    neg_h = torch.remainder(-torch.arange(height), height)
    neg_w = torch.remainder(-torch.arange(width), width)
    full = _mask_from_d(dh, dw, ratio, order)
    mirrored = full[neg_h][:, neg_w]
    sym = 0.5 * (full + mirrored)
    return sym[:, : width // 2 + 1].to(torch.float32)


def butterworth_lowpass_mask_rfft(
    height: int, width: int, ratio: float, order: int = 4, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """The mask in the unshifted rfft2 layout [height, width // 2 + 1] (float32), symmetrised so
    that irfft2(mask * rfft2(y)) equals the official Re(ifft2(ifftshift(M * fftshift(fft2(y)))))."""
    mask = _rfft_mask_cpu(int(height), int(width), float(ratio), int(order))
    return mask.to(device) if device is not None else mask.clone()
