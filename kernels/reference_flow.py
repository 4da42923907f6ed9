"""Reference flow, fused: bicubic reference + unguided x0 + their difference, in one pass.

For every latent pixel (b, c, i, j) of the current grid [B, C, h, w]:

    x0[b, c, i, j]   = x[b, c, i, j] - sigma * v[b, c, i, j]                 (v: model output)
    ref[b, c, i, j]  = sum_{ky, kx} Wy[ky](i) * Wx[kx](j) * R[b, c, ry(ky), rx(kx)]
    diff[b, c, i, j] = ref - x0

R is the previous stage's clean estimate on its (ref_h, ref_w) grid. The bicubic weights follow
PyTorch's `F.interpolate(mode="bicubic", align_corners=False)` exactly:

    src = (dst + 0.5) * (in / out) - 0.5        (not clamped at 0 for cubic)
    i0  = floor(src),  t = src - i0,  taps i0 - 1 .. i0 + 2 clamped to [0, in - 1]
    W   = (k2(t + 1), k1(t), k1(1 - t), k2(2 - t)),  A = -0.75
    k1(s) = ((A + 2) s - (A + 3)) s^2 + 1              for |s| <= 1
    k2(s) = ((A s - 5A) s + 8A) s - 4A                  for 1 < |s| < 2

x, v and R are read straight from the packed Flux layout [B, N, 4C] (token = row-major 2x2
patch, feature 4c + 2dy + dx): no unpack copies. Outputs: x0 packed (fp32, the next stage's
reference) and diff unpacked [B, C, h, w] (fp32, the input of the low-pass). All math in fp32;
bf16/fp16 inputs are upcast right after the load.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Elements per program, with the default 4 warps: 4 fp32 per thread (128-bit accesses). Chosen by
# register count (`hiflow-fast bench compile`, sm_86): BLOCK 1024 x 4 warps took 248 registers
# per thread (2 blocks per SM, 8 warps to hide the bicubic gathers' latency), 1024 x 8 warps 114
# (2 blocks of 8), 512 x 4 warps 96 (5 blocks, 20 warps per SM). To be confirmed by bench
# guidance on a GPU.
BLOCK_SIZE = 512


@triton.jit
def _cubic_weights(t, A: tl.constexpr):
    """The four bicubic tap weights for fractional offset t (PyTorch's order of operations)."""
    s0 = t + 1.0
    w0 = ((A * s0 - 5.0 * A) * s0 + 8.0 * A) * s0 - 4.0 * A
    w1 = ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0
    s2 = 1.0 - t
    w2 = ((A + 2.0) * s2 - (A + 3.0)) * s2 * s2 + 1.0
    s3 = s2 + 1.0
    w3 = ((A * s3 - 5.0 * A) * s3 + 8.0 * A) * s3 - 4.0 * A
    return w0, w1, w2, w3


@triton.jit
def packed_offset(b, c, i, j, half_w, tokens, features):
    """Offset of unpacked pixel (b, c, i, j) in a packed [B, tokens, features] tensor."""
    token = (i // 2) * half_w + (j // 2)
    return b * (tokens * features) + token * features + 4 * c + 2 * (i % 2) + (j % 2)


@triton.jit
def _bicubic_row(ref_ptr, row_base, rx0, rx1, rx2, rx3, wx0, wx1, wx2, wx3, mask):
    """sum_k wx_k * R[row, rx_k] for one clamped source row (row_base already holds its offset)."""
    v0 = tl.load(ref_ptr + row_base + rx0, mask=mask, other=0.0).to(tl.float32)
    v1 = tl.load(ref_ptr + row_base + rx1, mask=mask, other=0.0).to(tl.float32)
    v2 = tl.load(ref_ptr + row_base + rx2, mask=mask, other=0.0).to(tl.float32)
    v3 = tl.load(ref_ptr + row_base + rx3, mask=mask, other=0.0).to(tl.float32)
    return wx0 * v0 + wx1 * v1 + wx2 * v2 + wx3 * v3


@triton.jit
def _col_offset(rx, ref_w, features):
    """Packed offset contribution of source column rx (clamped to the grid)."""
    rx = tl.minimum(tl.maximum(rx, 0), ref_w - 1)
    return (rx // 2) * features + (rx % 2)


@triton.jit
def _row_offset(ry, ref_h, ref_w, features):
    """Packed offset contribution of source row ry (clamped to the grid)."""
    ry = tl.minimum(tl.maximum(ry, 0), ref_h - 1)
    return (ry // 2) * (ref_w // 2) * features + 2 * (ry % 2)


@triton.jit
def bicubic_from_packed(
    ref_ptr, b, c, i, j, ref_h, ref_w, scale_h, scale_w, features, mask, A: tl.constexpr
):
    """Bicubic (align_corners=False) value at current-grid pixel (i, j) of channel c, image b,
    read from the packed reference on its (ref_h, ref_w) grid; fp32."""
    src_y = (i.to(tl.float32) + 0.5) * scale_h - 0.5
    src_x = (j.to(tl.float32) + 0.5) * scale_w - 0.5
    fy = tl.floor(src_y)
    fx = tl.floor(src_x)
    wy0, wy1, wy2, wy3 = _cubic_weights(src_y - fy, A)
    wx0, wx1, wx2, wx3 = _cubic_weights(src_x - fx, A)
    iy = fy.to(tl.int32)
    ix = fx.to(tl.int32)
    base = b * ((ref_h // 2) * (ref_w // 2) * features) + 4 * c
    rx0 = _col_offset(ix - 1, ref_w, features)
    rx1 = _col_offset(ix, ref_w, features)
    rx2 = _col_offset(ix + 1, ref_w, features)
    rx3 = _col_offset(ix + 2, ref_w, features)
    r0 = _bicubic_row(ref_ptr, base + _row_offset(iy - 1, ref_h, ref_w, features), rx0, rx1, rx2, rx3, wx0, wx1, wx2, wx3, mask)
    r1 = _bicubic_row(ref_ptr, base + _row_offset(iy, ref_h, ref_w, features), rx0, rx1, rx2, rx3, wx0, wx1, wx2, wx3, mask)
    r2 = _bicubic_row(ref_ptr, base + _row_offset(iy + 1, ref_h, ref_w, features), rx0, rx1, rx2, rx3, wx0, wx1, wx2, wx3, mask)
    r3 = _bicubic_row(ref_ptr, base + _row_offset(iy + 2, ref_h, ref_w, features), rx0, rx1, rx2, rx3, wx0, wx1, wx2, wx3, mask)
    return wy0 * r0 + wy1 * r1 + wy2 * r2 + wy3 * r3


@triton.jit
def reference_flow_kernel(
    sample_ptr,  # [B, N, 4C] packed x_t (any float dtype)
    model_output_ptr,  # [B, N, 4C] packed velocity
    ref_ptr,  # [B, N_ref, 4C] packed previous-stage x0
    pred_x0_ptr,  # out: [B, N, 4C] fp32, x - sigma * v
    diff_ptr,  # out: [B, C, h, w] fp32, bicubic(ref) - x0
    n_elements,  # B * C * h * w
    channels,
    height,
    width,
    ref_h,
    ref_w,
    scale_h,  # ref_h / height (PyTorch's area_pixel_compute_scale)
    scale_w,
    sigma,
    A: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    j = offs % width
    i = (offs // width) % height
    c = (offs // (width * height)) % channels
    b = offs // (width * height * channels)
    features = 4 * channels
    tokens = (height // 2) * (width // 2)
    p = packed_offset(b, c, i, j, width // 2, tokens, features)
    x = tl.load(sample_ptr + p, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(model_output_ptr + p, mask=mask, other=0.0).to(tl.float32)
    x0 = x - v * sigma
    ref = bicubic_from_packed(ref_ptr, b, c, i, j, ref_h, ref_w, scale_h, scale_w, features, mask, A)
    tl.store(pred_x0_ptr + p, x0, mask=mask)
    tl.store(diff_ptr + offs, ref - x0, mask=mask)

