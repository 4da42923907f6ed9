"""Spectral (FFT) low-pass blend: x0 <- x0 + alpha * (LP(ref) - LP(x0)).

The low-pass is linear, so LP(ref) - LP(x0) = LP(ref - x0): one real FFT pair of the difference
replaces the official two complex FFT pairs with fftshift.
"""

from __future__ import annotations

import torch

from .butterworth import butterworth_lowpass_mask, butterworth_lowpass_mask_rfft


def fft_lowpass_official(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official low-pass of [..., H, W]: Re(ifft2(ifftshift(fftshift(fft2(x)) * mask)))."""
    dims = (-2, -1)
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.float(), dim=dims), dim=dims)
    filtered = torch.fft.ifftshift(spectrum * mask, dim=dims)
    return torch.fft.ifft2(filtered, dim=dims).real


def spectral_lowpass_blend_official(
    x0: torch.Tensor, ref: torch.Tensor, alpha: float, ratio: float, order: int = 4
) -> torch.Tensor:
    """The official blend, two full FFT pairs and a centred mask (the conformance baseline)."""
    mask = butterworth_lowpass_mask(x0.shape[-2], x0.shape[-1], ratio, order, device=x0.device)
    return x0.float() + alpha * (fft_lowpass_official(ref, mask) - fft_lowpass_official(x0, mask))


def spectral_lowpass(y: torch.Tensor, ratio: float, order: int = 4) -> torch.Tensor:
    """LP(y) over the last two dims with one real FFT pair (fp32 math)."""
    h, w = y.shape[-2:]
    mask = butterworth_lowpass_mask_rfft(h, w, ratio, order, device=y.device)
    spectrum = torch.fft.rfft2(y.float(), dim=(-2, -1))
    return torch.fft.irfft2(spectrum * mask, s=(h, w), dim=(-2, -1))


def spectral_lowpass_blend(
    x0: torch.Tensor, ref: torch.Tensor, alpha: float, ratio: float, order: int = 4
) -> torch.Tensor:
    """x0 + alpha * LP(ref - x0), fp32 result; x0 and ref are [..., H, W]."""
    return x0.float() + alpha * spectral_lowpass(ref.float() - x0.float(), ratio, order)
