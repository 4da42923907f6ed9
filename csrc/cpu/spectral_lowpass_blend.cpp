// CPU implementation of the mask-and-scale step of hiflow_fast_native::spectral_lowpass_blend:
// the gain of every rfft bin evaluated once (../spectral_lowpass_blend.h: butterworth_at of the
// bin's centred coordinates and of its mirror's, symmetric_gain; the coordinates computed once
// per frequency row and column by centred_coordinate, as spectral_gain computes them per bin),
// then every slice's bins scaled row by row in memory order (contiguous loops, no division per
// bin), both in parallel (at::parallel_for).
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../spectral_lowpass_blend.h"

namespace hiflow_native {
namespace {

// One frequency row of gains; restrict parameters, so that the loop is vectorised.
void gain_row(float dh, float dh_mirror, const float* __restrict__ dw, const float* __restrict__ dw_mirror,
              index_t count, float inv_ratio_sq, int order, float scale, float* __restrict__ gains) {
  for (index_t fw = 0; fw < count; ++fw) {
    gains[fw] = symmetric_gain(scale, butterworth_at(dh, dw[fw], inv_ratio_sq, order),
                               butterworth_at(dh_mirror, dw_mirror[fw], inv_ratio_sq, order));
  }
}

void scale_row(float* __restrict__ spectrum_row, const float* __restrict__ gains, index_t count) {
  for (index_t k = 0; k < count; ++k) {
    spectrum_row[2 * k] *= gains[k];
    spectrum_row[2 * k + 1] *= gains[k];
  }
}

}  // namespace

void spectral_gains_cpu(const SpectralScaleArgs& args, float* gains) {
  const SpectralScaleArgs a = args;
  const index_t half_width = a.width / 2 + 1;
  std::vector<float> dw(half_width), dw_mirror(half_width);
  for (index_t fw = 0; fw < half_width; ++fw) {
    dw[fw] = centred_coordinate(fw, a.width);
    dw_mirror[fw] = centred_coordinate((a.width - fw) % a.width, a.width);
  }
  at::parallel_for(0, a.height, std::max<int64_t>(1, 4096 / half_width), [&](int64_t begin, int64_t end) {
    for (int64_t fh = begin; fh < end; ++fh) {
      const index_t f = static_cast<index_t>(fh);
      gain_row(centred_coordinate(f, a.height), centred_coordinate((a.height - f) % a.height, a.height), dw.data(),
               dw_mirror.data(), half_width, a.inv_ratio_sq, a.order, a.scale, gains + fh * half_width);
    }
  });
}

void spectral_scale_slice_cpu(const SpectralScaleArgs& a, const float* gains, float* slice_spectrum) {
  const index_t half_width = a.width / 2 + 1;
  for (index_t fh = 0; fh < a.height; ++fh)
    scale_row(slice_spectrum + 2 * static_cast<int64_t>(fh) * half_width, gains + fh * half_width, half_width);
}

void transpose_complex_cpu(const float* src, index_t rows, index_t cols, float* dst) {
  // Tiles of TILE x TILE complex values (8 KiB each way): both sides stay in L1 while a tile is
  // copied, whichever of them is read across.
  constexpr index_t TILE = 32;
  for (index_t r0 = 0; r0 < rows; r0 += TILE) {
    const index_t r1 = std::min<index_t>(rows, r0 + TILE);
    for (index_t c0 = 0; c0 < cols; c0 += TILE) {
      const index_t c1 = std::min<index_t>(cols, c0 + TILE);
      for (index_t r = r0; r < r1; ++r) {
        float* __restrict__ out = dst + 2 * (static_cast<int64_t>(r) * cols);
        for (index_t c = c0; c < c1; ++c) {
          const float* in = src + 2 * (static_cast<int64_t>(c) * rows + r);
          out[2 * c] = in[0];
          out[2 * c + 1] = in[1];
        }
      }
    }
  }
}

void spectral_scale_cpu(const SpectralScaleArgs& args) {
  const SpectralScaleArgs a = args;  // a local copy: stores through the spectrum cannot alias it
  const index_t half_width = a.width / 2 + 1;
  std::vector<float> gains(static_cast<size_t>(a.height) * half_width);
  spectral_gains_cpu(a, gains.data());
  // One spectrum row (slice s, frequency row fh) per iteration; spectral_scale_bin's arithmetic.
  const int64_t rows = static_cast<int64_t>(a.slices) * a.height;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / half_width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t fh = r % a.height;
      scale_row(a.spectrum + 2 * r * half_width, gains.data() + fh * half_width, half_width);
    }
  });
}

}  // namespace hiflow_native
