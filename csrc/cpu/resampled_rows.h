// The CPU's first bicubic stage, done once per op call: every source row of the packed
// reference resampled at every output column (bicubic_across, ../common.h). An element then
// needs 4 reads of these rows and bicubic_down instead of 16 scattered reads of the reference:
// the same arithmetic in the same order as bicubic_sample, which the GPU runs per element.
#pragma once

#include <ATen/Parallel.h>

#include <memory>
#include <vector>

#include "../common.h"

namespace hiflow_native {

class ResampledRows {
 public:
  // Rows of image b, channel c, source row r: [(b * channels + c) * ref_h + r][width].
  ResampledRows(const Source& ref, index_t batch, index_t channels, index_t ref_h, index_t ref_w, index_t width,
                float scale_w)
      : width_(width), ref_h_(ref_h), data_(new float[static_cast<size_t>(batch) * channels * ref_h * width]) {
    std::vector<AxisTaps> cols(width);
    for (index_t j = 0; j < width; ++j) cols[j] = bicubic_taps(j, scale_w, ref_w);
    const int64_t rows = static_cast<int64_t>(batch) * channels * ref_h;
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<index_t>(1, width)), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const index_t r = static_cast<index_t>(n % ref_h);
        const index_t c = static_cast<index_t>((n / ref_h) % channels);
        const index_t b = static_cast<index_t>(n / (static_cast<int64_t>(ref_h) * channels));
        const index_t row = packed_row_offset(b, c, r, ref_h, ref_w, channels);
        float* out = data_.get() + n * width;
        for (index_t j = 0; j < width; ++j) out[j] = bicubic_across(ref, row, cols[j], channels);
      }
    });
  }

  // The resampled source row r of image b, channel c (channels: as constructed).
  const float* row(index_t b, index_t c, index_t channels, index_t r) const {
    return data_.get() + (static_cast<int64_t>(b * channels + c) * ref_h_ + r) * width_;
  }

 private:
  index_t width_, ref_h_;
  std::unique_ptr<float[]> data_;
};

}  // namespace hiflow_native
