// hiflow_fast_native::spectral_lowpass_blend: diff <- alpha * LP(diff), LP the official
// Butterworth low-pass, as one real FFT pair (torch's rfft2 / irfft2, called by the binding)
// around the mask-and-scale below (the math of kernels/spectral_lowpass_blend.py).
//
// The mask is evaluated per bin, directly in the unshifted rfft layout [H, W/2 + 1]: bin f of
// an n-point FFT sits at centred index (f + n/2) mod n, so with d_n(f) = 2((f + n/2) mod n)/n - 1
//   M(fh, fw)     = 1 / (1 + ((d_H(fh)^2 + d_W(fw)^2) / ratio^2)^order)
//   M_sym(fh, fw) = (M(fh, fw) + M(-fh, -fw)) / 2
// M_sym is the Hermitian-symmetric part that Re(ifft2(M * fft2(y))) really applies (equal to M
// for even sizes); irfft2 needs it. d in fp32, as the Triton kernel computes it.
#pragma once

#include "common.h"

namespace hiflow_native {

struct SpectralScaleArgs {
  float* spectrum;  // view_as_real of a contiguous complex [S, H, W/2 + 1]: fp32 [S, H, W/2 + 1, 2]
  index_t slices, height, width;  // height, width: the spatial sizes
  float inv_ratio_sq;             // 1 / ratio^2 (1 when scale is 0: see the binding)
  float scale;                    // alpha (0 when ratio == 0: no low band)
  int order;
};

// 2 * ((f + n/2) mod n) / n - 1 in fp32: the official centred coordinate of bin f.
HIFLOW_HD inline float centred_coordinate(index_t f, index_t n) {
  const index_t centred = (f + n / 2) % n;
  return 2.0f * static_cast<float>(centred) / static_cast<float>(n) - 1.0f;
}

// The official mask value M at centred coordinates (dh, dw) (on values, so that the CPU can
// evaluate whole rows of bins from coordinates it computed once per row and column).
HIFLOW_HD inline float butterworth_at(float dh, float dw, float inv_ratio_sq, int order) {
  const float q = (dh * dh + dw * dw) * inv_ratio_sq;
  float power = q;
  for (int k = 1; k < order; ++k) power = power * q;
  return 1.0f / (1.0f + power);
}

// The official mask value M at unshifted bin (fh, fw).
HIFLOW_HD inline float butterworth(index_t fh, index_t fw, index_t height, index_t width, float inv_ratio_sq,
                                   int order) {
  return butterworth_at(centred_coordinate(fh, height), centred_coordinate(fw, width), inv_ratio_sq, order);
}

// The gain of a bin from M there and at the mirrored bin (-fh, -fw): scale * M_sym.
HIFLOW_HD inline float symmetric_gain(float scale, float m, float mirror) { return scale * (0.5f * (m + mirror)); }

// scale * M_sym at rfft bin k = fh * (W/2 + 1) + fw: the gain of that bin in every slice.
HIFLOW_HD inline float spectral_gain(const SpectralScaleArgs& a, index_t k) {
  const index_t half_width = a.width / 2 + 1;
  const index_t fh = k / half_width, fw = k % half_width;
  const float m = butterworth(fh, fw, a.height, a.width, a.inv_ratio_sq, a.order);
  const float mirror =
      butterworth((a.height - fh) % a.height, (a.width - fw) % a.width, a.height, a.width, a.inv_ratio_sq, a.order);
  return symmetric_gain(a.scale, m, mirror);
}

// Scale bin k of slice s (re and im) by its gain.
HIFLOW_HD inline void spectral_scale_bin(const SpectralScaleArgs& a, index_t s, index_t k, float gain) {
  float* bin = a.spectrum + 2 * (s * a.height * (a.width / 2 + 1) + k);
  bin[0] *= gain;
  bin[1] *= gain;
}

void spectral_scale_cpu(const SpectralScaleArgs& args);
// The CPU's two steps of spectral_scale_cpu, for a caller that scales one slice at a time
// (binding.cpp's per-slice FFT pair): the gains of all H * (W/2 + 1) bins (in parallel), and
// one slice's bins scaled by them (serial: the caller runs slices in parallel). `a.spectrum`
// and `a.slices` are not read by either.
void spectral_gains_cpu(const SpectralScaleArgs& a, float* gains);
void spectral_scale_slice_cpu(const SpectralScaleArgs& a, const float* gains, float* slice_spectrum);
// A complex fp32 matrix stored column-major ([cols][rows]: what the inverse FFT over H leaves,
// src) copied row-major ([rows][cols], dst), in cache-sized tiles; serial.
void transpose_complex_cpu(const float* src, index_t rows, index_t cols, float* dst);
void spectral_scale_cuda(const SpectralScaleArgs& args, void* stream);

}  // namespace hiflow_native
