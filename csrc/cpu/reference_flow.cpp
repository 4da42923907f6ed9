// CPU implementation of hiflow_fast_native::reference_flow: the per-element math of
// ../reference_flow.h, rows of the unpacked grid in parallel (at::parallel_for). The bicubic
// taps are separable, so each column's are computed once per call and each row's once per row.
#include <ATen/Parallel.h>

#include <vector>

#include "../reference_flow.h"

namespace hiflow_native {

void reference_flow_cpu(const ReferenceFlowArgs& a) {
  std::vector<AxisTaps> cols(a.width);
  for (index_t j = 0; j < a.width; ++j) cols[j] = bicubic_col_taps(j, a.scale_w, a.ref_w, a.channels);
  const int64_t rows = static_cast<int64_t>(a.batch) * a.channels * a.height;
  // Grain: at least ~16k elements per task, so thread start-up stays small against the work.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<index_t>(1, a.width));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const index_t i = static_cast<index_t>(r % a.height);
      const index_t c = static_cast<index_t>((r / a.height) % a.channels);
      const index_t b = static_cast<index_t>(r / (static_cast<int64_t>(a.height) * a.channels));
      const AxisTaps row_taps = bicubic_row_taps(i, a.scale_h, a.ref_h, a.ref_w, a.channels);
      for (index_t j = 0; j < a.width; ++j) reference_flow_element(a, b, c, i, j, row_taps, cols[j]);
    }
  });
}

}  // namespace hiflow_native
