// CPU implementation of hiflow_fast_native::guided_velocity: output token rows in parallel
// (at::parallel_for), each element by ../guided_velocity.h. Elements are visited in the packed
// outputs' memory order; the pixel each holds is found by counting, not dividing, and the
// bicubic reference comes from the resampled source rows (resampled_rows.h) and bicubic_down.
// With kPrevInPlace a task reads exactly the v / v_ref elements it then writes.
#include <ATen/Parallel.h>

#include "../guided_velocity.h"
#include "resampled_rows.h"

namespace hiflow_native {

void guided_velocity_cpu(const GuidedVelocityArgs& args) {
  const GuidedVelocityArgs a = args;  // a local copy: stores through the outputs cannot alias it
  const ResampledRows resampled(a.ref_x0, a.batch, a.channels, a.ref_h, a.ref_w, a.width, a.scale_w);
  const index_t out_half_w = a.out_w / 2, features = 4 * a.channels;
  const int64_t token_rows = static_cast<int64_t>(a.batch) * (a.out_h / 2);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<index_t>(1, out_half_w * features));
  at::parallel_for(0, token_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const index_t b = static_cast<index_t>(n / (a.out_h / 2));
      const index_t token_row = static_cast<index_t>(n % (a.out_h / 2));
      // Row taps of the two output rows (the pad ring's, clamped to a real row, are unused).
      AxisTaps rows[2];
      for (index_t dy = 0; dy < 2; ++dy) {
        const index_t i = pixel_at(a, b, 0, 2 * token_row + dy, 0).i;
        rows[dy] = bicubic_taps(i < 0 ? 0 : (i >= a.height ? a.height - 1 : i), a.scale_h, a.ref_h);
      }
      index_t o = static_cast<index_t>(n * out_half_w * features);
      for (index_t token_col = 0; token_col < out_half_w; ++token_col) {
        for (index_t c = 0; c < a.channels; ++c) {
          for (index_t dy = 0; dy < 2; ++dy) {
            const AxisTaps& r = rows[dy];
            const float* h0 = resampled.row(b, c, a.channels, r.index[0]);
            const float* h1 = resampled.row(b, c, a.channels, r.index[1]);
            const float* h2 = resampled.row(b, c, a.channels, r.index[2]);
            const float* h3 = resampled.row(b, c, a.channels, r.index[3]);
            for (index_t dx = 0; dx < 2; ++dx, ++o) {
              const OutputPixel px = pixel_at(a, b, c, 2 * token_row + dy, 2 * token_col + dx);
              const float ref = px.inside ? bicubic_down(r, h0[px.j], h1[px.j], h2[px.j], h3[px.j]) : 0.0f;
              guided_velocity_element(a, o, px, ref);
            }
          }
        }
      }
    }
  });
}

}  // namespace hiflow_native
