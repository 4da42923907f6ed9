// hiflow_fast_native::haar_lowpass_blend: diff <- alpha * LPhaar(diff) in place, LPhaar the
// level-1 Haar low-pass (the math of kernels/haar_lowpass_blend.py): every 2x2 block of each
// [H, W] slice replaced by its mean; for an odd size the last row (column) pairs with itself,
// as PyWavelets' symmetric extension does.
#pragma once

#include "common.h"

namespace hiflow_native {

struct HaarLowpassArgs {
  float* diff;  // [S, H, W] fp32, updated in place
  index_t slices, height, width;
  float alpha;
};

HIFLOW_HD inline index_t haar_block_count(const HaarLowpassArgs& a) {
  return a.slices * ((a.height + 1) / 2) * ((a.width + 1) / 2);
}

// Block (p, q) of slice s: reads its up to 4 elements, writes their scaled mean back. One block
// per call, so parallel calls never share an element.
HIFLOW_HD inline void haar_lowpass_block_at(const HaarLowpassArgs& a, index_t s, index_t p, index_t q) {
  const index_t row0 = 2 * p, col0 = 2 * q;
  const bool has_row1 = row0 + 1 < a.height, has_col1 = col0 + 1 < a.width;
  // Clamped second row / column for odd sizes (the extension pairs the edge with itself).
  const index_t row1 = has_row1 ? row0 + 1 : row0;
  const index_t col1 = has_col1 ? col0 + 1 : col0;
  float* slice = a.diff + s * a.height * a.width;
  const index_t p00 = row0 * a.width + col0, p01 = row0 * a.width + col1;
  const index_t p10 = row1 * a.width + col0, p11 = row1 * a.width + col1;
  const float value = a.alpha * (((slice[p00] + slice[p01]) + (slice[p10] + slice[p11])) * 0.25f);
  slice[p00] = value;
  if (has_col1) slice[p01] = value;
  if (has_row1) slice[p10] = value;
  if (has_col1 && has_row1) slice[p11] = value;
}

// Block k, counted row-major over slices, block rows and block columns.
HIFLOW_HD inline void haar_lowpass_block(const HaarLowpassArgs& a, index_t k) {
  const index_t blocks_w = (a.width + 1) / 2;
  const index_t blocks_h = (a.height + 1) / 2;
  haar_lowpass_block_at(a, k / (blocks_w * blocks_h), (k / blocks_w) % blocks_h, k % blocks_w);
}

void haar_lowpass_blend_cpu(const HaarLowpassArgs& args);
void haar_lowpass_blend_cuda(const HaarLowpassArgs& args, void* stream);

}  // namespace hiflow_native
