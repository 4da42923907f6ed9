"""Level-1 Haar ("dwt") low-pass blend: x0 <- x0 + alpha * (LPhaar(ref) - LPhaar(x0)).

The official code takes a level-1 Haar decomposition of every [H, W] slice, zeroes the three
detail bands and reconstructs. For even sizes that is exactly "replace every 2x2 block by its
mean". For an odd size PyWavelets' default (symmetric) extension pairs the last row or column
with a copy of itself, so its block mean is itself; this reference does the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def haar_lowpass(x: torch.Tensor) -> torch.Tensor:
    """2x2 block mean of [..., H, W] broadcast back over each block (fp32)."""
    h, w = x.shape[-2:]
    y = x.float().reshape(-1, 1, h, w)
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        y = F.pad(y, (0, pad_w, 0, pad_h), mode="replicate")
    means = F.avg_pool2d(y, kernel_size=2, stride=2)
    up = means.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)[..., :h, :w]
    return up.reshape(x.shape)


def haar_lowpass_blend(x0: torch.Tensor, ref: torch.Tensor, alpha: float) -> torch.Tensor:
    """x0 + alpha * (LPhaar(ref) - LPhaar(x0)) = x0 + alpha * LPhaar(ref - x0) (linear)."""
    return x0.float() + alpha * haar_lowpass(ref.float() - x0.float())
