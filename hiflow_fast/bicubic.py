"""Bicubic resizing of latents on a CPU as matrix products, with PyTorch's weights.

`F.interpolate(mode="bicubic", align_corners=False)` is separable: along each axis, output j is
a 4-tap combination of the inputs around the source position

    src(j) = (j + 0.5) * (n_in / n_out) - 0.5,   taps floor(src) - 1 ... floor(src) + 2,

with Keys' cubic weights (A = -0.75) of t = src - floor(src) and the tap indices clamped to
[0, n_in - 1]. The weights here are computed in fp32 exactly as PyTorch's kernel computes them,
so a resize is two products with [n_out, n_in] matrices (2-3x faster than F.interpolate on a
CPU, equal to it within a few 1e-7 relative L2; bit-different only by the order of the sums).

Those matrices are banded (4 non-zeros per row), so a dense product wastes n_in / 4 of its
FLOPs. When the weights repeat with a short period (any ratio n_out / n_in = p / q with small
p, e.g. exactly 2 for HiFlow's stages), `BandedResize` does each axis as one small dense
product per block of `rows` outputs, over a window of `k` inputs that advances by a fixed
stride: the input is replicate-padded (which is exactly the clamping) and unfolded as a strided
view, and one [rows, k] weight matrix serves every block. At the 4K latent that is ~15x fewer
FLOPs than the dense products.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# PyTorch's bicubic convolution parameter (Keys' A), as in F.interpolate(mode="bicubic").
BICUBIC_A = -0.75
# Outputs per block of the banded product: enough rows for an efficient small matmul, few
# enough that the window (~rows * n_in / n_out + 3 inputs) stays cache-sized.
_TARGET_BLOCK_ROWS = 32
# Longest weight period (outputs) the banded product takes; beyond it the dense matrix is used.
_MAX_PERIOD = 64


@functools.lru_cache(maxsize=32)
def bicubic_taps(n_in: int, n_out: int, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, weights): output j reads inputs first[j] + 0..3 (unclamped, long [count]) with
    weights[:, j] (fp32 [4, count]), computed in fp32 as PyTorch's bicubic kernel does, for
    j < count (default n_out; more continues the sequence past the last output)."""
    a = BICUBIC_A
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    # (j + 0.5) * scale - 0.5 rounded once to fp32, as PyTorch's kernel computes it (a fused
    # multiply-add): exact in float64 for fp32 operands, then one rounding.
    index = torch.arange(n_out if count is None else count, dtype=torch.float64)
    src = ((index + 0.5) * scale.double() - 0.5).float()
    floor = torch.floor(src)
    t = src - floor
    s0, s2 = t + 1.0, 1.0 - t
    s3 = s2 + 1.0
    weights = torch.stack((
        ((a * s0 - 5.0 * a) * s0 + 8.0 * a) * s0 - 4.0 * a,
        ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0,
        ((a + 2.0) * s2 - (a + 3.0)) * s2 * s2 + 1.0,
        ((a * s3 - 5.0 * a) * s3 + 8.0 * a) * s3 - 4.0 * a,
    ))
    return floor.long() - 1, weights


@functools.lru_cache(maxsize=32)
def bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] fp32 matrix M with M @ y == the 1-D bicubic resize of y (clamped taps
    accumulate on the border inputs, as PyTorch's clamped indices do)."""
    first, weights = bicubic_taps(n_in, n_out)
    matrix = torch.zeros(n_out, n_in, dtype=torch.float32)
    rows = torch.arange(n_out)
    for tap in range(4):
        matrix.index_put_((rows, (first + tap).clamp(0, n_in - 1)), weights[tap], accumulate=True)
    return matrix


@dataclass(frozen=True)
class BandedResize:
    """One axis of a resize as blocks: output block b (rows `rows`) = weight @ input window b,
    window b = inputs start + b * stride ... + k - 1 of the input replicate-padded by
    (pad_before, pad_after)."""

    weight: torch.Tensor  # fp32 [rows, k]
    rows: int
    k: int
    stride: int
    blocks: int
    pad_before: int
    pad_after: int
    start: int  # window 0's first input, in padded coordinates

    @staticmethod
    @functools.lru_cache(maxsize=32)
    def plan(n_in: int, n_out: int) -> "BandedResize | None":
        """The banded form of the n_in -> n_out resize, or None when its weights do not repeat
        with a short period (then the dense `bicubic_matrix` is the way)."""
        period = n_out // math.gcd(n_in, n_out)
        if period > _MAX_PERIOD or n_out < n_in:
            return None  # (downsampling: each window would span most of the input)
        # Whole periods, about _TARGET_BLOCK_ROWS of them, but no more than the output needs.
        rows = period * max(1, min(round(_TARGET_BLOCK_ROWS / period), -(-n_out // period)))
        stride = rows * n_in // n_out  # exact: rows is a multiple of the period
        blocks = -(-n_out // rows)
        first, weights = bicubic_taps(n_in, n_out, blocks * rows)  # the last block may overhang
        offsets = first.view(blocks, rows) - first[::rows].view(blocks, 1)
        block_weights = weights.view(4, blocks, rows)
        # fp32 source positions repeat exactly only for some ratios: check, never assume.
        if not (torch.equal(offsets, offsets[:1].expand_as(offsets))
                and torch.equal(first[::rows], first[0] + stride * torch.arange(blocks))
                and torch.equal(block_weights, block_weights[:, :1].expand_as(block_weights))):
            return None
        k = int(offsets[0].max()) + 4
        weight = torch.zeros(rows, k, dtype=torch.float32)
        for tap in range(4):
            weight[torch.arange(rows), offsets[0] + tap] = block_weights[tap, 0]
        pad_before = max(0, -int(first[0]))
        end = int(first[0]) + (blocks - 1) * stride + k  # one past the last window's last input
        pad_after = max(0, end - n_in)
        return BandedResize(weight, rows, k, stride, blocks, pad_before, pad_after, int(first[0]) + pad_before)

    def windows(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The input windows along `dim` (-1 or -2) of x [N, H, W]: a strided view with the block
        index at `dim` and the window (k) last."""
        if dim == -1:
            padded = F.pad(x, (self.pad_before, self.pad_after), mode="replicate")
        else:  # (F.pad's 2-D replicate is ~8x slower than this one concatenation on a CPU)
            n = x.shape[-2]
            edges = (x.narrow(-2, 0, 1).expand(-1, self.pad_before, -1), x, x.narrow(-2, n - 1, 1).expand(-1, self.pad_after, -1))
            padded = torch.cat(edges, dim=-2)
        span = (self.blocks - 1) * self.stride + self.k
        return padded.narrow(dim, self.start, span).unfold(dim, self.k, self.stride)


def _resize_last(x: torch.Tensor, n_out: int) -> torch.Tensor:
    """Resize the last axis of x [N, H, W] to n_out."""
    n_in = x.shape[-1]
    plan = BandedResize.plan(n_in, n_out)
    if plan is None:
        return torch.matmul(x, bicubic_matrix(n_in, n_out).t())
    n, h, _ = x.shape
    # Windows [N, H, blocks, k] gathered into one [N * H * blocks, k] matrix: one GEMM instead
    # of a batch of N * H tiny ones.
    windows = plan.windows(x, -1).reshape(-1, plan.k)
    out = torch.mm(windows, plan.weight.t())  # [N * H * blocks, rows]
    return out.view(n, h, plan.blocks * plan.rows)[..., :n_out]


def _resize_rows(x: torch.Tensor, n_out: int) -> torch.Tensor:
    """Resize the middle axis of x [N, H, W] to n_out."""
    n_in = x.shape[-2]
    plan = BandedResize.plan(n_in, n_out)
    if plan is None:
        return torch.matmul(bicubic_matrix(n_in, n_out), x)
    windows = plan.windows(x, -2).transpose(-1, -2)  # [N, blocks, k, W]
    out = torch.matmul(plan.weight, windows)  # [N, blocks, rows, W]
    return out.flatten(1, 2)[:, :n_out]


def bicubic_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """F.interpolate(x.float(), size, mode="bicubic", align_corners=False) for x [..., H, W], as
    separable (banded where possible) fp32 matrix products; contiguous fp32 [..., *size]."""
    *lead, h, w = x.shape
    flat = x.float().reshape(-1, h, w)
    out = _resize_rows(_resize_last(flat, size[1]), size[0])
    return out.reshape(*lead, *size).contiguous()
