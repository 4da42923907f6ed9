"""Haar ("dwt") low-pass blend: diff <- alpha * LPhaar(diff), in place.

The official "dwt" guidance takes a level-1 Haar decomposition of each [H, W] slice, zeroes the
three detail bands and reconstructs, for x0 and for the reference:
x0 <- x0 + alpha * (LPhaar(ref) - LPhaar(x0)). LPhaar is linear, so that is
x0 + alpha * LPhaar(ref - x0), and LPhaar of a slice replaces every 2x2 block by its mean:

    LPhaar(y)[2p + dy, 2q + dx] = (y[2p, 2q] + y[2p, 2q + 1] + y[2p + 1, 2q] + y[2p + 1, 2q + 1]) / 4

For an odd size PyWavelets' symmetric extension pairs the last row (column) with a copy of
itself, so its indices are clamped to the last one (the mean then counts it twice).

This kernel applies alpha * LPhaar to the fp32 difference [S, H, W] in place; the guided-velocity
kernel adds it to x0. Each program owns whole 2x2 blocks (it loads a block, then stores it), so
the in-place update has no cross-program hazard.
"""

from __future__ import annotations

import triton
import triton.language as tl

# 2x2 blocks per program (4 elements each): 56 registers per thread at 4 warps (sm_86, bench
# compile), so occupancy is not limited by registers.
BLOCK_SIZE = 512


@triton.jit
def haar_lowpass_kernel(
    diff_ptr,  # fp32 [S, H, W], updated in place
    n_blocks,  # S * ceil(H / 2) * ceil(W / 2)
    height,
    width,
    alpha,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_blocks
    blocks_w = (width + 1) // 2
    blocks_h = (height + 1) // 2
    q = offs % blocks_w
    p = (offs // blocks_w) % blocks_h
    s = offs // (blocks_w * blocks_h)
    row0 = 2 * p
    col0 = 2 * q
    # Clamp the second row / column for odd sizes (symmetric extension pairs it with itself).
    row1 = tl.minimum(row0 + 1, height - 1)
    col1 = tl.minimum(col0 + 1, width - 1)
    base = s * (height * width)
    p00 = base + row0 * width + col0
    p01 = base + row0 * width + col1
    p10 = base + row1 * width + col0
    p11 = base + row1 * width + col1
    y00 = tl.load(diff_ptr + p00, mask=mask, other=0.0).to(tl.float32)
    y01 = tl.load(diff_ptr + p01, mask=mask, other=0.0).to(tl.float32)
    y10 = tl.load(diff_ptr + p10, mask=mask, other=0.0).to(tl.float32)
    y11 = tl.load(diff_ptr + p11, mask=mask, other=0.0).to(tl.float32)
    value = alpha * (((y00 + y01) + (y10 + y11)) * 0.25)
    has_col1 = col0 + 1 < width
    has_row1 = row0 + 1 < height
    tl.store(diff_ptr + p00, value, mask=mask)
    tl.store(diff_ptr + p01, value, mask=mask & has_col1)
    tl.store(diff_ptr + p10, value, mask=mask & has_row1)
    tl.store(diff_ptr + p11, value, mask=mask & has_col1 & has_row1)
