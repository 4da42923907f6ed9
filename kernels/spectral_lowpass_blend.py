"""Spectral low-pass blend: scale an rfft2 spectrum in place by alpha * Butterworth mask.

The blend x0 <- x0 + alpha * (LP(ref) - LP(x0)) is linear, so it equals
x0 + irfft2(alpha * M_sym * rfft2(ref - x0)): one real FFT pair of the difference (torch.fft)
and this kernel in between. No mask tensor and no fftshift: the mask is evaluated in the
kernel, directly in the unshifted rfft layout [H, W // 2 + 1].

The official mask is defined on the fftshift-ed (centred) spectrum. Bin f of an n-point FFT
sits at centred index (f + n // 2) mod n, so in the unshifted layout

    d_n(f)    = 2 * ((f + n // 2) mod n) / n - 1
    M(fh, fw) = 1 / (1 + ((d_H(fh)^2 + d_W(fw)^2) / ratio^2)^order)

For an odd n that centring is not symmetric about the zero bin, so M is not Hermitian-symmetric;
Re(ifft2(M * fft2(y))) of a real y equals ifft2(M_sym * fft2(y)) with

    M_sym(f) = (M(f) + M(-f)) / 2,        -f = ((H - fh) mod H, (W - fw) mod W)

which is what irfft2 needs (for even sizes M_sym == M). d is computed in fp32. ratio == 0 (no
low band) is handled by the caller with a scale of 0: the mask is then identically 0.

Layout: the complex spectrum [S, H, W2] (S = batch * channels slices, W2 = W // 2 + 1) is passed
as torch.view_as_real, i.e. fp32 [S, H, W2, 2] (re, im interleaved). Each program evaluates the
mask once for BLOCK bins and applies it to SLICES consecutive slices.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Spectral bins per program (mask evaluated once per bin, reused over SLICES slices): 64
# registers per thread at 4 warps (sm_86, bench compile), so occupancy is not limited by registers.
BLOCK_SIZE = 1024
# Slices (batch x channel planes) each program walks: amortises the mask math (~20 flops per
# bin) over several 8-byte complex loads while keeping enough programs for a full GPU.
SLICES_PER_PROGRAM = 4


@triton.jit
def _centred_coordinate(f, n):
    """2 * ((f + n // 2) mod n) / n - 1 in fp32: the official centred coordinate of bin f."""
    centred = (f + n // 2) % n
    # (tensor / n promotes n to fp32; no n.to(): Triton passes a size of 1 as a constexpr.)
    return 2.0 * centred.to(tl.float32) / n - 1.0


@triton.jit
def _butterworth(fh, fw, height, width, inv_ratio_sq, ORDER: tl.constexpr):
    """The official mask value M at unshifted bin (fh, fw)."""
    dh = _centred_coordinate(fh, height)
    dw = _centred_coordinate(fw, width)
    q = (dh * dh + dw * dw) * inv_ratio_sq
    power = q
    for _ in tl.static_range(ORDER - 1):
        power = power * q
    return 1.0 / (1.0 + power)


@triton.jit
def butterworth_mask_rfft(fh, fw, height, width, inv_ratio_sq, ORDER: tl.constexpr):
    """Hermitian-symmetrised mask M_sym at rfft bin (fh, fw)."""
    m = _butterworth(fh, fw, height, width, inv_ratio_sq, ORDER)
    m_mirror = _butterworth((height - fh) % height, (width - fw) % width, height, width, inv_ratio_sq, ORDER)
    return 0.5 * (m + m_mirror)


@triton.jit
def spectral_lowpass_kernel(
    spectrum_ptr,  # fp32 view_as_real of a contiguous complex [S, H, W2]: [S, H, W2, 2]
    n_slices,  # S
    height,  # H (spatial)
    width,  # W (spatial; W2 = W // 2 + 1)
    inv_ratio_sq,  # 1 / ratio^2
    scale,  # alpha (0 when ratio == 0)
    ORDER: tl.constexpr,
    BLOCK: tl.constexpr,
    SLICES: tl.constexpr,
):
    pid_bins = tl.program_id(0)
    pid_slices = tl.program_id(1)
    half_width = width // 2 + 1
    bins = height * half_width
    offs = pid_bins * BLOCK + tl.arange(0, BLOCK)
    mask = offs < bins
    fh = offs // half_width
    fw = offs % half_width
    gain = scale * butterworth_mask_rfft(fh, fw, height, width, inv_ratio_sq, ORDER)
    for k in tl.static_range(SLICES):
        s = pid_slices * SLICES + k
        m = mask & (s < n_slices)
        ptr = spectrum_ptr + (s * bins + offs) * 2
        re = tl.load(ptr, mask=m, other=0.0)
        im = tl.load(ptr + 1, mask=m, other=0.0)
        tl.store(ptr, re * gain, mask=m)
        tl.store(ptr + 1, im * gain, mask=m)
