// CPU implementation of hiflow_fast_native::reference_flow: the per-element math of
// ../reference_flow.h, token rows in parallel (at::parallel_for). Elements are visited in the
// packed tensors' memory order (each cache line of x, v and x0 touched once, the packed offset
// is the loop counter); the bicubic reference comes from the resampled source rows
// (resampled_rows.h) and bicubic_down.
#include <ATen/Parallel.h>

#include <vector>

#include "../reference_flow.h"
#include "resampled_rows.h"

namespace hiflow_native {

void reference_flow_cpu(const ReferenceFlowArgs& args) {
  const ReferenceFlowArgs a = args;  // a local copy: stores through the outputs cannot alias it
  const ResampledRows resampled(a.ref_x0, a.batch, a.channels, a.ref_h, a.ref_w, a.width, a.scale_w);
  const index_t half_w = a.width / 2;
  const int64_t token_rows = static_cast<int64_t>(a.batch) * (a.height / 2);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<index_t>(1, half_w * 4 * a.channels));
  at::parallel_for(0, token_rows, grain, [&](int64_t begin, int64_t end) {
    // diff of one token row, channels last ([2, width, C]): written in the packed order into
    // this small buffer, then out to the unpacked [B, C, h, w] as 2C sequential rows. (Written
    // in that order straight into the unpacked tensor, its 2C rows, a plane apart, compete for
    // the same cache sets.) The element function writes it through `local`.
    std::vector<float> diff_rows(static_cast<size_t>(2) * a.width * a.channels);
    ReferenceFlowArgs local = a;
    local.diff = diff_rows.data();
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
            // diff[b, c, 2 * token_row + dy, j] in diff_rows
            const index_t d = (dy * a.width + 2 * token_col) * a.channels + c;
            for (index_t dx = 0; dx < 2; ++dx, ++p) {
              const index_t k = (2 * token_col + dx) * a.channels;  // (j, c) in the resampled rows
              reference_flow_element(local, p, d + dx * a.channels, bicubic_down(r, h0[k], h1[k], h2[k], h3[k]));
            }
          }
        }
      }
      for (index_t dy = 0; dy < 2; ++dy) {
        const float* in = diff_rows.data() + dy * a.width * a.channels;
        for (index_t c = 0; c < a.channels; ++c) {
          float* out = a.diff + (static_cast<int64_t>(b * a.channels + c) * a.height + 2 * token_row + dy) * a.width;
          for (index_t j = 0; j < a.width; ++j) out[j] = in[j * a.channels + c];
        }
      }
    }
  });
}

}  // namespace hiflow_native
