"""Unsharp-mask sharpening with an explicit Gaussian sigma.

sharpen(img) = (1 + amount) * img - amount * blur(img), where blur is torchvision's
GaussianBlur(kernel_size, sigma): the separable kernel k = p / sum(p), p = exp(-x^2 / (2 sigma^2))
at x in {-(K-1)/2, ..., (K-1)/2}, applied per channel after reflect padding. The official code
draws sigma ~ U(0.1, 2.0) from the global torch RNG; here it is an argument.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel1d(kernel_size: int, sigma: float, *, dtype=torch.float32, device=None) -> torch.Tensor:
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size, dtype=dtype, device=device)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


def gaussian_blur(img: torch.Tensor, sigma: float, kernel_size: int = 3) -> torch.Tensor:
    """Blur [B, C, H, W] like torchvision's gaussian_blur (2-D outer-product kernel, reflect pad)."""
    dtype = img.dtype if img.is_floating_point() else torch.float32
    k1 = gaussian_kernel1d(kernel_size, sigma, dtype=dtype, device=img.device)
    k2 = torch.mm(k1[:, None], k1[None, :])
    c = img.shape[1]
    weight = k2.expand(c, 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    padded = F.pad(img, [pad, pad, pad, pad], mode="reflect")
    return F.conv2d(padded, weight, groups=c)


def sharpen(img: torch.Tensor, sigma: float, kernel_size: int = 3, amount: float = 1.0) -> torch.Tensor:
    """(1 + amount) * img - amount * gaussian_blur(img, sigma)."""
    blurred = gaussian_blur(img, sigma, kernel_size)
    return (amount + 1) * img - amount * blurred
