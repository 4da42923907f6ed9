// CPU implementation of hiflow_fast_native::guided_velocity: output token rows in parallel
// (at::parallel_for), each element by guided_velocity_math (../guided_velocity.h).
//
// Per output token row, for each of its two pixel rows: the current-grid row it holds (the
// swin shift applied to whole rows) of x, x0 and the state gathered into planar rows
// (planar_rows.h), the lowpass row read straight from the unpacked [B, C, h, w] tensor, the
// bicubic reference from the resampled source rows (resampled_rows.h) and bicubic_down; then
// guided_velocity_math over contiguous columns (vectorised by the compiler; whether a state
// exists is a template parameter, so its branch compiles away), the pad ring zero. The three
// planar output rows of both pixel rows are packed into the output token row at the end, so
// that with kPrevInPlace a task reads the v / v_ref elements of its token row before it
// overwrites them, and no other task touches them.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../guided_velocity.h"
#include "planar_rows.h"
#include "resampled_rows.h"

namespace hiflow_native {
namespace {

// Column pointers of one channel of one pixel row, each indexed by the current-grid column j.
struct ChannelRow {
  const float* x;
  const float* x0;
  const float* lowpass;
  const float* ref[4];  // the four resampled source rows of the bicubic
  const float* v_prev;
  const float* v_ref_prev;
  float* x_next;
  float* v;
  float* v_ref;
};

// The pointers are parameters, each __restrict__: GCC trusts restrict on parameters (not on
// locals copied from a struct), and without it the eleven streams would need more run-time
// alias checks than it is willing to emit, and the loop would stay scalar.
template <bool kWithState>
void velocity_columns_kernel(const float* __restrict__ x, const float* __restrict__ x0,
                             const float* __restrict__ lowpass, const float* __restrict__ r0,
                             const float* __restrict__ r1, const float* __restrict__ r2, const float* __restrict__ r3,
                             const float* __restrict__ v_prev, const float* __restrict__ v_ref_prev,
                             float* __restrict__ x_next, float* __restrict__ v, float* __restrict__ v_ref,
                             const AxisTaps taps, index_t j_begin, index_t j_end, float inv_denom, float beta,
                             float sigma, float sigma_next) {
  for (index_t j = j_begin; j < j_end; ++j) {
    const float ref = bicubic_down(taps, r0[j], r1[j], r2[j], r3[j]);
    const VelocityStep out = guided_velocity_math(x[j], x0[j], lowpass[j], ref, kWithState,
                                                  kWithState ? v_prev[j] : 0.0f, kWithState ? v_ref_prev[j] : 0.0f,
                                                  inv_denom, beta, sigma, sigma_next);
    x_next[j] = out.x_next;
    v[j] = out.v;
    v_ref[j] = out.v_ref;
  }
}

template <bool kWithState>
void velocity_columns(const ChannelRow& row, const AxisTaps& taps, index_t j_begin, index_t j_end, float inv_denom,
                      float beta, float sigma, float sigma_next) {
  velocity_columns_kernel<kWithState>(row.x, row.x0, row.lowpass, row.ref[0], row.ref[1], row.ref[2], row.ref[3],
                                      row.v_prev, row.v_ref_prev, row.x_next, row.v, row.v_ref, taps, j_begin, j_end,
                                      inv_denom, beta, sigma, sigma_next);
}

void zero_columns(float* row, index_t begin, index_t end) {
  if (end > begin) std::memset(row + begin, 0, sizeof(float) * (end - begin));
}

}  // namespace

void guided_velocity_cpu(const GuidedVelocityArgs& args) {
  const GuidedVelocityArgs a = args;  // a local copy: stores through the outputs cannot alias it
  const ResampledRows resampled(a.ref_x0, a.batch, a.channels, a.ref_h, a.ref_w, a.width, a.scale_w);
  const index_t channels = a.channels, height = a.height, width = a.width, out_w = a.out_w;
  // Output pixel (oi, oj) holds current pixel (oi - shift_i, oj - shift_j); the state's pixel
  // (si, sj) is current pixel (si - state_shift_i, sj - state_shift_j).
  const index_t shift_i = (a.out_h - height) / 2, shift_j = (out_w - width) / 2;
  const index_t state_shift_i = (a.state_h - height) / 2, state_shift_j = (a.state_w - width) / 2;
  // Current columns held by the output: [j_begin, j_end); the others of the row are the ring.
  const index_t j_begin = std::max<index_t>(0, -shift_j), j_end = std::min<index_t>(width, out_w - shift_j);
  // Current columns the state holds: [state_j_begin, state_j_end) (0 elsewhere).
  const index_t state_j_begin = std::max<index_t>(0, -state_shift_j);
  const index_t state_j_end = std::min<index_t>(width, a.state_w - state_shift_j);
  // A separate state row is unpacked at column j + state_margin of its buffer (room for the
  // state's columns outside the current grid); an in-place one in output columns.
  const index_t state_margin = std::max<index_t>(0, state_shift_j);
  const index_t state_stride = a.prev_mode == kPrevInPlace ? out_w : width + 2 * state_margin;
  const index_t state_offset = a.prev_mode == kPrevInPlace ? shift_j : state_margin;
  const index_t out_row_elements = (out_w / 2) * 4 * channels;
  const index_t scratch_elements =
      std::max({out_row_elements, (width / 2) * 4 * channels, (a.state_w / 2) * 4 * channels});
  const int64_t token_rows = static_cast<int64_t>(a.batch) * (a.out_h / 2);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<index_t>(1, out_row_elements));
  at::parallel_for(0, token_rows, grain, [&](int64_t begin, int64_t end) {
    const size_t plane = static_cast<size_t>(channels);
    std::vector<float> scratch(scratch_elements);  // a 16-bit token row as fp32; x_next before rounding
    std::vector<float> x_rows(plane * width), x0_rows(plane * width);
    std::vector<float> state_rows[2][2];  // [v_prev, v_ref_prev][dy]
    std::vector<float> out_rows[3][2];    // [x_next, v, v_ref][dy], output columns
    for (auto& kind : out_rows)
      for (auto& rows : kind) rows.resize(plane * out_w);
    if (a.prev_mode != kPrevNone)
      for (auto& kind : state_rows)
        for (auto& rows : kind) rows.assign(plane * state_stride, 0.0f);
    for (int64_t n = begin; n < end; ++n) {
      const index_t b = static_cast<index_t>(n / (a.out_h / 2));
      const index_t token_row = static_cast<index_t>(n % (a.out_h / 2));
      if (a.prev_mode == kPrevInPlace) {  // read this token row of v / v_ref before it is written
        for (index_t dy = 0; dy < 2; ++dy) {
          unpack_row(a.v + n * out_row_elements, dy, out_w, channels, state_rows[0][dy].data(), out_w, 0);
          unpack_row(a.v_ref + n * out_row_elements, dy, out_w, channels, state_rows[1][dy].data(), out_w, 0);
        }
      }
      for (index_t dy = 0; dy < 2; ++dy) {
        const index_t i = 2 * token_row + dy - shift_i;
        if (i < 0 || i >= height) {  // a ring row: zero in every output
          for (auto& kind : out_rows) zero_columns(kind[dy].data(), 0, channels * out_w);
          continue;
        }
        const int64_t current = packed_token_row_offset(b, i / 2, height, width, channels);
        const index_t current_elements = (width / 2) * 4 * channels;
        unpack_row(fp32_span(a.sample, current, current_elements, scratch.data()), i % 2, width, channels,
                   x_rows.data(), width, 0);
        unpack_row(a.pred_x0 + current, i % 2, width, channels, x0_rows.data(), width, 0);
        if (a.prev_mode == kPrevSeparate) {
          const index_t si = i + state_shift_i;
          const Source* state_sources[2] = {&a.v_prev, &a.v_ref_prev};
          for (int k = 0; k < 2; ++k) {
            float* rows = state_rows[k][dy].data();
            if (si < 0 || si >= a.state_h) {  // outside the state: 0
              std::fill(rows, rows + plane * state_stride, 0.0f);
              continue;
            }
            const int64_t at = packed_token_row_offset(b, si / 2, a.state_h, a.state_w, channels);
            const index_t count = (a.state_w / 2) * 4 * channels;
            unpack_row(fp32_span(*state_sources[k], at, count, scratch.data()), si % 2, a.state_w, channels, rows,
                       state_stride, state_margin - state_shift_j);
            for (index_t c = 0; c < channels; ++c) {  // current columns outside the state: 0
              zero_columns(rows + c * state_stride + state_margin, 0, state_j_begin);
              zero_columns(rows + c * state_stride + state_margin, state_j_end, width);
            }
          }
        }
        const AxisTaps taps = bicubic_taps(i, a.scale_h, a.ref_h);
        for (index_t c = 0; c < channels; ++c) {
          ChannelRow row;
          row.x = x_rows.data() + c * width;
          row.x0 = x0_rows.data() + c * width;
          row.lowpass = a.lowpass + (static_cast<int64_t>(b * channels + c) * height + i) * width;
          for (int k = 0; k < 4; ++k) row.ref[k] = resampled.row(b, taps.index[k], c);
          row.v_prev = state_rows[0][dy].empty() ? nullptr : state_rows[0][dy].data() + c * state_stride + state_offset;
          row.v_ref_prev = state_rows[1][dy].empty() ? nullptr : state_rows[1][dy].data() + c * state_stride + state_offset;
          row.x_next = out_rows[0][dy].data() + c * out_w + shift_j;
          row.v = out_rows[1][dy].data() + c * out_w + shift_j;
          row.v_ref = out_rows[2][dy].data() + c * out_w + shift_j;
          if (a.prev_mode == kPrevNone) {
            velocity_columns<false>(row, taps, j_begin, j_end, a.inv_denom, a.beta, a.sigma, a.sigma_next);
          } else {
            velocity_columns<true>(row, taps, j_begin, j_end, a.inv_denom, a.beta, a.sigma, a.sigma_next);
          }
          for (auto& kind : out_rows) {  // the ring's columns
            zero_columns(kind[dy].data() + c * out_w, 0, j_begin + shift_j);
            zero_columns(kind[dy].data() + c * out_w, j_end + shift_j, out_w);
          }
        }
      }
      // The outputs are written with streaming stores (nothing in this op reads them again),
      // except v / v_ref with kPrevInPlace: their lines are in the cache already (read above).
      const int64_t out_at = n * out_row_elements;
      auto pack_state = a.prev_mode == kPrevInPlace ? pack_rows : pack_rows_streaming;
      pack_state(out_rows[1][0].data(), out_rows[1][1].data(), out_w, channels, out_w, a.v + out_at);
      pack_state(out_rows[2][0].data(), out_rows[2][1].data(), out_w, channels, out_w, a.v_ref + out_at);
      if (a.x_next_dtype == DType::kFloat32) {
        pack_rows_streaming(out_rows[0][0].data(), out_rows[0][1].data(), out_w, channels, out_w,
                            static_cast<float*>(a.x_next) + out_at);
      } else {  // packed as fp32, then rounded once into the output dtype
        pack_rows(out_rows[0][0].data(), out_rows[0][1].data(), out_w, channels, out_w, scratch.data());
        for (index_t k = 0; k < out_row_elements; ++k)
          store_as(a.x_next, a.x_next_dtype, static_cast<index_t>(out_at + k), scratch[k]);
      }
    }
    finish_streaming_stores();
  });
}

}  // namespace hiflow_native
