// The CPU's first bicubic stage, done once per op call: every source row of the packed
// reference resampled at every output column (bicubic_weighted_sum of the column taps, the
// arithmetic of bicubic_across, ../common.h). An element then needs 4 reads of these rows and
// bicubic_down instead of 16 scattered reads of the reference: the same arithmetic in the same
// order as bicubic_sample, which the GPU runs per element.
//
// Layout [B, ref_h, C, width], planar like the row buffers of planar_rows.h: the second stage
// (bicubic_down of four such rows) then runs over contiguous columns, a loop the compiler
// vectorises. The first stage is vectorised over channels instead: each source row is gathered
// channels last ([ref_w][C]), so that the four taps of an output column read four contiguous
// runs of C values, and the result is transposed into the planar layout.
#pragma once

#include <ATen/Parallel.h>

#include <memory>
#include <vector>

#include "../common.h"
#include "planar_rows.h"

namespace hiflow_native {

namespace resampled_rows_detail {

// Output column j of every channel: out[c] = sum_k w_k * s_k[c] (s_k: the source column of tap
// k, channels last). Restrict parameters, so that the loop over channels is vectorised.
inline void across_channels(const float* __restrict__ s0, const float* __restrict__ s1, const float* __restrict__ s2,
                            const float* __restrict__ s3, const AxisTaps taps, index_t channels,
                            float* __restrict__ out) {
  for (index_t c = 0; c < channels; ++c) out[c] = bicubic_weighted_sum(taps, s0[c], s1[c], s2[c], s3[c]);
}

// Pixel row dy of a packed token row of `width` columns -> channels last: column j of channel c
// to dst[j * channels + c].
inline void unpack_row_channels_last(const float* __restrict__ token_row, index_t dy, index_t width,
                                     index_t channels, float* __restrict__ dst) {
  for (index_t tj = 0; tj < width / 2; ++tj) {
    const float* in = token_row + tj * 4 * channels + 2 * dy;
    float* even = dst + 2 * tj * channels;
    float* odd = even + channels;
    for (index_t c = 0; c < channels; ++c) {
      even[c] = in[4 * c];
      odd[c] = in[4 * c + 1];
    }
  }
}

}  // namespace resampled_rows_detail

class ResampledRows {
 public:
  ResampledRows(const Source& ref, index_t batch, index_t channels, index_t ref_h, index_t ref_w, index_t width,
                float scale_w)
      : width_(width), ref_h_(ref_h), channels_(channels),
        data_(new float[static_cast<size_t>(batch) * ref_h * width * channels]) {
    using namespace resampled_rows_detail;
    std::vector<AxisTaps> cols(width);
    for (index_t j = 0; j < width; ++j) cols[j] = bicubic_taps(j, scale_w, ref_w);
    const int64_t rows = static_cast<int64_t>(batch) * ref_h;
    const index_t token_row_elements = (ref_w / 2) * 4 * channels;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<index_t>(1, width * channels));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(token_row_elements), source(static_cast<size_t>(ref_w) * channels);
      std::vector<float> resampled(static_cast<size_t>(width) * channels);
      for (int64_t n = begin; n < end; ++n) {
        const index_t b = static_cast<index_t>(n / ref_h), r = static_cast<index_t>(n % ref_h);
        const float* token_row = fp32_span(ref, packed_token_row_offset(b, r / 2, ref_h, ref_w, channels),
                                           token_row_elements, scratch.data());
        unpack_row_channels_last(token_row, r % 2, ref_w, channels, source.data());
        for (index_t j = 0; j < width; ++j) {
          const AxisTaps& t = cols[j];
          const float* s = source.data();
          across_channels(s + t.index[0] * channels, s + t.index[1] * channels, s + t.index[2] * channels,
                          s + t.index[3] * channels, t, channels, resampled.data() + j * channels);
        }
        float* out = data_.get() + n * width * channels;  // channels last -> planar
        for (index_t c = 0; c < channels; ++c)
          for (index_t j = 0; j < width; ++j) out[c * width + j] = resampled[j * channels + c];
      }
    });
  }

  // Source row r of image b, channel c: `width` resampled columns.
  const float* row(index_t b, index_t r, index_t c) const {
    return data_.get() + ((static_cast<int64_t>(b) * ref_h_ + r) * channels_ + c) * width_;
  }

 private:
  index_t width_, ref_h_, channels_;
  std::unique_ptr<float[]> data_;
};

}  // namespace hiflow_native
