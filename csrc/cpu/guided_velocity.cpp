// CPU implementation of hiflow_fast_native::guided_velocity: output token rows in parallel
// (at::parallel_for), each element by ../guided_velocity.h. Elements are visited in the packed
// outputs' memory order; where each reads is counted per row and column (the sums of
// element_sources' terms), not decoded per element, and the bicubic reference comes from the
// resampled source rows (resampled_rows.h) and bicubic_down. With kPrevInPlace a task reads
// exactly the v / v_ref elements it then writes.
#include <ATen/Parallel.h>

#include <vector>

#include "../guided_velocity.h"
#include "resampled_rows.h"

namespace hiflow_native {

void guided_velocity_cpu(const GuidedVelocityArgs& args) {
  const GuidedVelocityArgs a = args;  // a local copy: stores through the outputs cannot alias it
  const ResampledRows resampled(a.ref_x0, a.batch, a.channels, a.ref_h, a.ref_w, a.width, a.scale_w);
  const index_t out_half_w = a.out_w / 2, features = 4 * a.channels;
  const index_t state_plane_tokens = (a.state_h / 2) * (a.state_w / 2);
  // Per output column oj: the current column j, and the column terms of the packed offsets of
  // the current grid and of the state (-1: outside it).
  std::vector<index_t> column(a.out_w), column_offset(a.out_w), state_column_offset(a.out_w);
  for (index_t oj = 0; oj < a.out_w; ++oj) {
    const index_t j = pixel_at(a, 0, 0, 0, oj).j;
    const index_t sj = j + (a.state_w - a.width) / 2;
    column[oj] = j;
    column_offset[oj] = (j / 2) * features + j % 2;
    state_column_offset[oj] = sj >= 0 && sj < a.state_w ? (sj / 2) * features + sj % 2 : -1;
  }
  const int64_t token_rows = static_cast<int64_t>(a.batch) * (a.out_h / 2);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<index_t>(1, out_half_w * features));
  at::parallel_for(0, token_rows, grain, [&](int64_t begin, int64_t end) {
    // The lowpass rows of one token row, channels last ([2, width, C]): read from the unpacked
    // [B, C, h, w] as 2C sequential rows, then in the packed outputs' order from this small
    // buffer. (Read in that order straight from the unpacked tensor, its 2C rows, a plane
    // apart, compete for the same cache sets.) The element function reads it through `local`.
    std::vector<float> lowpass_rows(static_cast<size_t>(2) * a.width * a.channels);
    GuidedVelocityArgs local = a;
    local.lowpass = lowpass_rows.data();
    for (int64_t n = begin; n < end; ++n) {
      const index_t b = static_cast<index_t>(n / (a.out_h / 2));
      const index_t token_row = static_cast<index_t>(n % (a.out_h / 2));
      // Per output row (dy): its current row, bicubic taps and the row terms of the offsets.
      index_t row[2], row_offset[2], state_row_offset[2];
      AxisTaps taps[2];
      for (index_t dy = 0; dy < 2; ++dy) {
        const index_t i = pixel_at(a, b, 0, 2 * token_row + dy, 0).i;
        const index_t si = i + (a.state_h - a.height) / 2;
        row[dy] = i;
        const bool inside = i >= 0 && i < a.height;
        taps[dy] = bicubic_taps(inside ? i : 0, a.scale_h, a.ref_h);  // (unused in the pad ring)
        row_offset[dy] = inside ? (b * (a.height / 2) * (a.width / 2) + (i / 2) * (a.width / 2)) * features + 2 * (i % 2) : 0;
        state_row_offset[dy] = si >= 0 && si < a.state_h
                                   ? (b * state_plane_tokens + (si / 2) * (a.state_w / 2)) * features + 2 * (si % 2)
                                   : -1;
      }
      for (index_t dy = 0; dy < 2; ++dy) {
        if (row[dy] < 0 || row[dy] >= a.height) continue;  // the pad ring reads no lowpass
        float* out = lowpass_rows.data() + dy * a.width * a.channels;
        for (index_t c = 0; c < a.channels; ++c) {
          const float* in = a.lowpass + (static_cast<int64_t>(b * a.channels + c) * a.height + row[dy]) * a.width;
          for (index_t j = 0; j < a.width; ++j) out[j * a.channels + c] = in[j];
        }
      }
      index_t o = static_cast<index_t>(n * out_half_w * features);
      for (index_t token_col = 0; token_col < out_half_w; ++token_col) {
        for (index_t c = 0; c < a.channels; ++c) {
          for (index_t dy = 0; dy < 2; ++dy) {
            const AxisTaps& r = taps[dy];
            const bool row_inside = row[dy] >= 0 && row[dy] < a.height;
            const float* h0 = resampled.row(b, r.index[0]) + c;
            const float* h1 = resampled.row(b, r.index[1]) + c;
            const float* h2 = resampled.row(b, r.index[2]) + c;
            const float* h3 = resampled.row(b, r.index[3]) + c;
            for (index_t dx = 0; dx < 2; ++dx, ++o) {
              const index_t oj = 2 * token_col + dx, j = column[oj];
              if (!row_inside || j < 0 || j >= a.width) {
                guided_velocity_ring_element(local, o);
                continue;
              }
              ElementSources at;
              at.p = row_offset[dy] + column_offset[oj] + 4 * c;
              at.l = (dy * a.width + j) * a.channels + c;  // in lowpass_rows
              at.s = state_row_offset[dy] >= 0 && state_column_offset[oj] >= 0
                         ? state_row_offset[dy] + state_column_offset[oj] + 4 * c
                         : -1;
              const index_t k = j * a.channels;  // (j, c) in the resampled rows
              guided_velocity_element(local, o, at, bicubic_down(r, h0[k], h1[k], h2[k], h3[k]));
            }
          }
        }
      }
    }
  });
}

}  // namespace hiflow_native
