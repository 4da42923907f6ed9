// CPU implementation of hiflow_fast_native::reference_flow: the per-element math of
// ../reference_flow.h, token rows in parallel (at::parallel_for). Elements are visited in the
// packed tensors' memory order (each cache line of x, v and x0 touched once, the packed offset
// is the loop counter); the bicubic reference comes from the resampled source rows
// (resampled_rows.h) and bicubic_down.
#include <ATen/Parallel.h>

#include "../reference_flow.h"
#include "resampled_rows.h"

namespace hiflow_native {

void reference_flow_cpu(const ReferenceFlowArgs& args) {
  const ReferenceFlowArgs a = args;  // a local copy: stores through the outputs cannot alias it
  const ResampledRows resampled(a.ref_x0, a.batch, a.channels, a.ref_h, a.ref_w, a.width, a.scale_w);
  const index_t half_w = a.width / 2, plane = a.height * a.width;
  const int64_t token_rows = static_cast<int64_t>(a.batch) * (a.height / 2);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<index_t>(1, half_w * 4 * a.channels));
  at::parallel_for(0, token_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const index_t b = static_cast<index_t>(n / (a.height / 2));
      const index_t token_row = static_cast<index_t>(n % (a.height / 2));
      const AxisTaps rows[2] = {bicubic_taps(2 * token_row, a.scale_h, a.ref_h),
                                bicubic_taps(2 * token_row + 1, a.scale_h, a.ref_h)};
      index_t p = static_cast<index_t>(n * half_w * 4 * a.channels);  // packed offset, in order
      for (index_t token_col = 0; token_col < half_w; ++token_col) {
        for (index_t c = 0; c < a.channels; ++c) {
          for (index_t dy = 0; dy < 2; ++dy) {
            const AxisTaps& r = rows[dy];
            const float* h0 = resampled.row(b, r.index[0]) + c;
            const float* h1 = resampled.row(b, r.index[1]) + c;
            const float* h2 = resampled.row(b, r.index[2]) + c;
            const float* h3 = resampled.row(b, r.index[3]) + c;
            // diff[b, c, i, j] for i = 2 * token_row + dy, j = 2 * token_col + dx
            const index_t d = (b * a.channels + c) * plane + (2 * token_row + dy) * a.width + 2 * token_col;
            for (index_t dx = 0; dx < 2; ++dx, ++p) {
              const index_t k = (2 * token_col + dx) * a.channels;  // (j, c) in the resampled rows
              reference_flow_element(a, p, d + dx, bicubic_down(r, h0[k], h1[k], h2[k], h3[k]));
            }
          }
        }
      }
    }
  });
}

}  // namespace hiflow_native
