// CPU implementation of hiflow_fast_native::guided_velocity: output token rows in parallel
// (at::parallel_for), each element by ../guided_velocity.h. Elements are visited in the packed
// outputs' memory order; the pixel each holds is found by counting, not dividing, and the
// bicubic taps come per row / per column (separable). With kPrevInPlace a task reads exactly the
// v / v_ref elements it then writes.
#include <ATen/Parallel.h>

#include <vector>

#include "../guided_velocity.h"

namespace hiflow_native {

void guided_velocity_cpu(const GuidedVelocityArgs& a) {
  const index_t shift_h = (a.out_h - a.height) / 2, shift_w = (a.out_w - a.width) / 2;
  const index_t out_half_w = a.out_w / 2, features = 4 * a.channels;
  // Column taps per output column (clamped to a valid column in the pad ring, where unused).
  std::vector<AxisTaps> cols(a.out_w);
  for (index_t oj = 0; oj < a.out_w; ++oj) {
    const index_t j = std::min(std::max<index_t>(oj - shift_w, 0), a.width - 1);
    cols[oj] = bicubic_col_taps(j, a.scale_w, a.ref_w, a.channels);
  }
  const int64_t token_rows = static_cast<int64_t>(a.batch) * (a.out_h / 2);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<index_t>(1, out_half_w * features));
  at::parallel_for(0, token_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const index_t b = static_cast<index_t>(r / (a.out_h / 2));
      const index_t token_row = static_cast<index_t>(r % (a.out_h / 2));
      AxisTaps rows[2];
      for (index_t dy = 0; dy < 2; ++dy) {
        const index_t i = std::min(std::max<index_t>(2 * token_row + dy - shift_h, 0), a.height - 1);
        rows[dy] = bicubic_row_taps(i, a.scale_h, a.ref_h, a.ref_w, a.channels);
      }
      index_t o = static_cast<index_t>(r * out_half_w * features);
      for (index_t token_col = 0; token_col < out_half_w; ++token_col) {
        for (index_t c = 0; c < a.channels; ++c) {
          for (index_t dy = 0; dy < 2; ++dy) {
            for (index_t dx = 0; dx < 2; ++dx, ++o) {
              const OutputPixel px = pixel_at(a, b, c, 2 * token_row + dy, 2 * token_col + dx);
              guided_velocity_element(a, o, px, rows[dy], cols[2 * token_col + dx]);
            }
          }
        }
      }
    }
  });
}

}  // namespace hiflow_native
