// CPU implementation of hiflow_fast_native::reference_flow: token rows in parallel
// (at::parallel_for), each element by the value functions of ../reference_flow.h.
//
// Per token row: x0 = unguided_x0(x, v) over the packed row in memory order (x, v and x0 share
// the packed layout: one contiguous loop); then for each of its two pixel rows, x0 gathered
// into planar rows (planar_rows.h) and diff = reference_difference(bicubic_down(...), x0) over
// contiguous columns, written straight into the unpacked [B, C, h, w] diff. The bicubic
// reference comes from the resampled source rows (resampled_rows.h). Every inner loop runs
// over contiguous fp32 columns, so the compiler vectorises it.
#include <ATen/Parallel.h>

#include <vector>

#include "../reference_flow.h"
#include "planar_rows.h"
#include "resampled_rows.h"

namespace hiflow_native {

void reference_flow_cpu(const ReferenceFlowArgs& args) {
  const ReferenceFlowArgs a = args;  // a local copy: stores through the outputs cannot alias it
  const ResampledRows resampled(a.ref_x0, a.batch, a.channels, a.ref_h, a.ref_w, a.width, a.scale_w);
  const index_t channels = a.channels, width = a.width, height = a.height;
  const index_t row_elements = (width / 2) * 4 * channels;  // one packed token row
  const float sigma = a.sigma;
  const int64_t token_rows = static_cast<int64_t>(a.batch) * (height / 2);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<index_t>(1, row_elements));
  at::parallel_for(0, token_rows, grain, [&](int64_t begin, int64_t end) {
    // Scratch of one token row: x and v as fp32 (16-bit inputs only), x0 of one pixel row planar.
    std::vector<float> x_scratch(row_elements), v_scratch(row_elements);
    std::vector<float> x0_planar(static_cast<size_t>(channels) * width);
    for (int64_t n = begin; n < end; ++n) {
      const index_t b = static_cast<index_t>(n / (height / 2));
      const index_t token_row = static_cast<index_t>(n % (height / 2));
      const int64_t base = n * row_elements;  // = packed_token_row_offset(b, token_row, ...)
      const float* __restrict__ x = fp32_span(a.sample, base, row_elements, x_scratch.data());
      const float* __restrict__ v = fp32_span(a.model_output, base, row_elements, v_scratch.data());
      float* __restrict__ x0 = a.pred_x0 + base;
      for (index_t k = 0; k < row_elements; ++k) x0[k] = unguided_x0(x[k], v[k], sigma);
      for (index_t dy = 0; dy < 2; ++dy) {
        const index_t i = 2 * token_row + dy;
        unpack_row(x0, dy, width, channels, x0_planar.data(), width, 0);
        const AxisTaps taps = bicubic_taps(i, a.scale_h, a.ref_h);
        for (index_t c = 0; c < channels; ++c) {
          const float* __restrict__ r0 = resampled.row(b, taps.index[0], c);
          const float* __restrict__ r1 = resampled.row(b, taps.index[1], c);
          const float* __restrict__ r2 = resampled.row(b, taps.index[2], c);
          const float* __restrict__ r3 = resampled.row(b, taps.index[3], c);
          const float* __restrict__ x0_row = x0_planar.data() + c * width;
          float* __restrict__ diff = a.diff + (static_cast<int64_t>(b * channels + c) * height + i) * width;
          for (index_t j = 0; j < width; ++j)
            diff[j] = reference_difference(bicubic_down(taps, r0[j], r1[j], r2[j], r3[j]), x0_row[j]);
        }
      }
    }
  });
}

}  // namespace hiflow_native
