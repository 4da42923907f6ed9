// CPU implementation of hiflow_fast_native::haar_lowpass_blend: rows of 2x2 blocks in parallel
// (at::parallel_for), each block by ../haar_lowpass_blend.h. A task owns whole blocks, so the
// in-place update has no cross-thread hazard.
#include <ATen/Parallel.h>

#include "../haar_lowpass_blend.h"

namespace hiflow_native {

void haar_lowpass_blend_cpu(const HaarLowpassArgs& a) {
  const index_t blocks_h = (a.height + 1) / 2, blocks_w = (a.width + 1) / 2;
  const int64_t block_rows = static_cast<int64_t>(a.slices) * blocks_h;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<index_t>(1, blocks_w));
  at::parallel_for(0, block_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const index_t s = static_cast<index_t>(r / blocks_h), p = static_cast<index_t>(r % blocks_h);
      for (index_t q = 0; q < blocks_w; ++q) haar_lowpass_block_at(a, s, p, q);
    }
  });
}

}  // namespace hiflow_native
