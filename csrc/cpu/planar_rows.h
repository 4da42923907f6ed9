// Row buffers of the CPU loops: one image row of a packed [B, (H/2)*(W/2), 4C] tensor as
// planar rows [C][W] (channel c, column j at c * stride + j), and back.
//
// In the packed layout the pixels of one channel and row sit in pairs (dx = 0, 1) 4C floats
// apart, and the swin move shifts rows and columns by one pixel, so no element loop over the
// packed tensors is contiguous in all of its operands. The CPU loops therefore gather each row
// they need into planar fp32 buffers (pairs of floats copied, channel by channel), run the
// shared per-element math (../*.h) over contiguous columns, where the compiler vectorises it,
// and scatter the results back the same way. The buffers of one token row stay in L2.
#pragma once

#include <cstdint>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../common.h"

namespace hiflow_native {

// `count` elements of `source` from `offset` as fp32: the tensor itself when it is fp32, else
// converted into `scratch` (Source's own conversions, the ones the GPU runs).
inline const float* fp32_span(const Source& source, int64_t offset, index_t count, float* scratch) {
  if (source.dtype == DType::kFloat32) return static_cast<const float*>(source.data) + offset;
  const Source shifted{static_cast<const uint16_t*>(source.data) + offset, source.dtype};  // 16-bit from here
  for (index_t k = 0; k < count; ++k) scratch[k] = shifted[k];
  return scratch;
}

// Offset of token row `token_row` (pixel rows 2 * token_row and 2 * token_row + 1) of image b in
// a packed tensor of a (height, width) grid with `channels` channels.
inline int64_t packed_token_row_offset(index_t b, index_t token_row, index_t height, index_t width,
                                       index_t channels) {
  return (static_cast<int64_t>(b) * (height / 2) + token_row) * (width / 2) * 4 * channels;
}

// Pixel row dy (0 or 1) of a packed token row of `width` columns -> planar rows: column j of
// channel c to dst[c * stride + j + shift]. The caller's buffer covers every column written.
inline void unpack_row(const float* __restrict__ token_row, index_t dy, index_t width, index_t channels,
                       float* __restrict__ dst, index_t stride, index_t shift) {
  const index_t features = 4 * channels;
  for (index_t tj = 0; tj < width / 2; ++tj) {
    const float* in = token_row + tj * features + 2 * dy;
    float* out = dst + 2 * tj + shift;
    for (index_t c = 0; c < channels; ++c) {
      out[c * stride] = in[4 * c];
      out[c * stride + 1] = in[4 * c + 1];
    }
  }
}

// The inverse for a whole token row: planar rows rows[dy] ([C][stride], columns 0..width-1) of
// both pixel rows -> the packed token row (width / 2 tokens of 4C features).
inline void pack_rows(const float* __restrict__ row0, const float* __restrict__ row1, index_t width, index_t channels,
                      index_t stride, float* __restrict__ token_row) {
  const index_t features = 4 * channels;
  for (index_t tj = 0; tj < width / 2; ++tj) {
    float* out = token_row + tj * features;
    const float* in0 = row0 + 2 * tj;
    const float* in1 = row1 + 2 * tj;
    for (index_t c = 0; c < channels; ++c) {
      out[4 * c] = in0[c * stride];
      out[4 * c + 1] = in0[c * stride + 1];
      out[4 * c + 2] = in1[c * stride];
      out[4 * c + 3] = in1[c * stride + 1];
    }
  }
}

// pack_rows for an output no later loop of the op reads: with non-temporal (streaming) stores
// where the CPU has them (x86's SSE2) and the row is 16-byte aligned (each 4-float group is
// then aligned too), so that writing the output does not first read its cache lines from
// memory (a third of the traffic of guided_velocity). The values written are the same. Call
// finish_streaming_stores() before the task ends.
inline void pack_rows_streaming(const float* __restrict__ row0, const float* __restrict__ row1, index_t width,
                                index_t channels, index_t stride, float* __restrict__ token_row) {
#if defined(__SSE2__)
  if (reinterpret_cast<uintptr_t>(token_row) % 16 == 0) {
    const index_t features = 4 * channels;
    for (index_t tj = 0; tj < width / 2; ++tj) {
      float* out = token_row + tj * features;
      const float* in0 = row0 + 2 * tj;
      const float* in1 = row1 + 2 * tj;
      for (index_t c = 0; c < channels; ++c) {
        // (in0[0], in0[1], in1[0], in1[1]) of channel c: two 8-byte loads, one 16-byte store.
        const __m128d low = _mm_load_sd(reinterpret_cast<const double*>(in0 + c * stride));
        const __m128d both = _mm_loadh_pd(low, reinterpret_cast<const double*>(in1 + c * stride));
        _mm_stream_ps(out + 4 * c, _mm_castpd_ps(both));
      }
    }
    return;
  }
#endif
  pack_rows(row0, row1, width, channels, stride, token_row);
}

// Orders this thread's streaming stores before whatever follows (the end of the parallel
// task, after which other threads read the outputs).
inline void finish_streaming_stores() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace hiflow_native
