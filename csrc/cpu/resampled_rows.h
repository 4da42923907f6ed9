// The CPU's first bicubic stage, done once per op call: every source row of the packed
// reference resampled at every output column (bicubic_across, ../common.h). An element then
// needs 4 reads of these rows and bicubic_down instead of 16 scattered reads of the reference:
// the same arithmetic in the same order as bicubic_sample, which the GPU runs per element.
//
// Layout [B, ref_h, width, C], channels innermost like the packed tensors: the loops that fill
// and read it walk the channels of one pixel together, so both stream through memory.
#pragma once

#include <ATen/Parallel.h>

#include <memory>
#include <vector>

#include "../common.h"

namespace hiflow_native {

class ResampledRows {
 public:
  ResampledRows(const Source& ref, index_t batch, index_t channels, index_t ref_h, index_t ref_w, index_t width,
                float scale_w)
      : width_(width), ref_h_(ref_h), channels_(channels),
        data_(new float[static_cast<size_t>(batch) * ref_h * width * channels]) {
    std::vector<AxisTaps> cols(width);
    for (index_t j = 0; j < width; ++j) cols[j] = bicubic_taps(j, scale_w, ref_w);
    const int64_t rows = static_cast<int64_t>(batch) * ref_h;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<index_t>(1, width * channels));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const index_t b = static_cast<index_t>(n / ref_h), r = static_cast<index_t>(n % ref_h);
        const index_t row = packed_row_offset(b, 0, r, ref_h, ref_w, channels);  // channel c adds 4c
        float* out = data_.get() + n * width * channels;
        for (index_t j = 0; j < width; ++j)
          for (index_t c = 0; c < channels; ++c) *out++ = bicubic_across(ref, row + 4 * c, cols[j], channels);
      }
    });
  }

  // Source row r of image b: [width, C] (element (j, c) at j * C + c).
  const float* row(index_t b, index_t r) const {
    return data_.get() + (static_cast<int64_t>(b) * ref_h_ + r) * width_ * channels_;
  }

 private:
  index_t width_, ref_h_, channels_;
  std::unique_ptr<float[]> data_;
};

}  // namespace hiflow_native
