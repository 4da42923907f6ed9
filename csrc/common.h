// Shared per-element building blocks of the native guidance ops: element access by run-time
// dtype, the packed Flux layout, and PyTorch's bicubic taps.
//
// Every function here is `HIFLOW_HD inline`: nvcc compiles it for the GPU kernels (csrc/cuda)
// and the host compiler for the CPU implementation (csrc/cpu), so the arithmetic the GPU runs
// is the very code the CPU tests run. The header needs no torch and no CUDA header, so that
// g++ compiles it as plain C++ and CMake's nvcc compile check needs nothing but the toolkit.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define HIFLOW_HD __host__ __device__
#else
#define HIFLOW_HD
#endif

namespace hiflow_native {

// Element indices are 32-bit, as in the Triton kernels: a GPU divides 32-bit integers several
// times faster than 64-bit ones, and these kernels decode several indices per element. The
// binding refuses tensors of 2^31 elements or more (the guidance step already does).
using index_t = int32_t;

// Element types of the tensors the ops read (run-time: the guidance step accepts each input in
// its own dtype, as the Triton kernels do). A switch per load costs a predictable branch on a
// CPU and a warp-uniform one on a GPU; templating every pointer on its dtype instead would
// instantiate 3^4 variants of guided_velocity.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

HIFLOW_HD inline float float_from_bits(uint32_t bits) {
  float value;
  memcpy(&value, &bits, sizeof value);
  return value;
}

HIFLOW_HD inline uint32_t bits_from_float(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof bits);
  return bits;
}

// IEEE binary16 -> fp32 (exact; subnormals, infinities and NaN kept).
HIFLOW_HD inline float float_from_half(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return float_from_bits(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in fp32.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  // Rebias the exponent from 15 to 127 (+112).
  return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// fp32 -> IEEE binary16, round to nearest even (what a GPU's cvt.rn and c10::Half do).
HIFLOW_HD inline uint16_t half_from_float(float value) {
  uint32_t bits = bits_from_float(value);
  const uint32_t sign = bits & 0x80000000u;
  bits ^= sign;
  uint32_t out;
  if (bits >= (143u << 23)) {  // |value| >= 2^16 (past the largest half), inf or NaN
    out = bits > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (bits < (113u << 23)) {  // below 2^-14, the smallest normal half: subnormal or 0
    // Adding 0.5 (2^-1) shifts the value's bits so that the fp32 adder's own round-to-nearest-
    // even lands the half mantissa in the low bits; subtracting the constant's bits leaves it.
    const uint32_t magic = 126u << 23;
    out = bits_from_float(float_from_bits(bits) + float_from_bits(magic)) - magic;
  } else {
    const uint32_t odd = (bits >> 13) & 1u;
    bits += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + odd;  // rebias, round half to even
    out = bits >> 13;  // a carry out of the mantissa correctly bumps the exponent (up to inf)
  }
  return static_cast<uint16_t>(out | (sign >> 16));
}

HIFLOW_HD inline float float_from_bfloat16(uint16_t b) { return float_from_bits(static_cast<uint32_t>(b) << 16); }

// fp32 -> bfloat16, round to nearest even; NaN stays NaN (quiet).
HIFLOW_HD inline uint16_t bfloat16_from_float(float value) {
  const uint32_t bits = bits_from_float(value);
  if (value != value) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  // 0x7FFF + the lowest kept bit: just under half an ulp, or exactly half on an odd mantissa.
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// A read-only tensor of any supported dtype, read as fp32.
struct Source {
  const void* data;
  DType dtype;

  HIFLOW_HD float operator[](index_t i) const {
    // fp32 first and by a plain comparison (not a switch, which may become a jump table): the
    // common case costs one predictable branch.
    if (dtype == DType::kFloat32) return static_cast<const float*>(data)[i];
    const uint16_t bits = static_cast<const uint16_t*>(data)[i];
    return dtype == DType::kBFloat16 ? float_from_bfloat16(bits) : float_from_half(bits);
  }
};

// Stores fp32 into a tensor of any supported dtype, rounding once (to nearest even).
HIFLOW_HD inline void store_as(void* data, DType dtype, index_t i, float value) {
  if (dtype == DType::kFloat32) {
    static_cast<float*>(data)[i] = value;
  } else {
    static_cast<uint16_t*>(data)[i] = dtype == DType::kBFloat16 ? bfloat16_from_float(value) : half_from_float(value);
  }
}

// ---- the packed Flux layout -------------------------------------------------------------------
// Latents [B, C, H, W] are packed as [B, (H/2)*(W/2), 4C]: token = row-major 2x2 patch, feature
// 4c + 2dy + dx. The ops read and write this layout directly (no unpack copies).

// Offset of unpacked pixel (b, c, i, j) in a packed tensor of a (height, width) grid.
HIFLOW_HD inline index_t packed_offset(index_t b, index_t c, index_t i, index_t j, index_t height, index_t width,
                                       index_t channels) {
  const index_t features = 4 * channels;
  const index_t tokens = (height / 2) * (width / 2);
  const index_t token = (i / 2) * (width / 2) + j / 2;
  return b * tokens * features + token * features + 4 * c + 2 * (i % 2) + (j % 2);
}

// ---- bicubic (F.interpolate(mode="bicubic", align_corners=False), A = -0.75) ------------------

// PyTorch's bicubic convolution parameter (Keys' A); hiflow_fast.bicubic.BICUBIC_A.
constexpr float kBicubicA = -0.75f;

// The four taps of one axis: the clamped source indices and their weights. Separable: the CPU
// loops compute each row's and column's taps once, the GPU per element.
struct AxisTaps {
  index_t index[4];
  float weight[4];
};

// Keys' cubic weights of fractional offset t, in PyTorch's order of operations.
HIFLOW_HD inline void cubic_weights(float t, float* w) {
  const float a = kBicubicA;
  const float s0 = t + 1.0f;
  w[0] = ((a * s0 - 5.0f * a) * s0 + 8.0f * a) * s0 - 4.0f * a;
  w[1] = ((a + 2.0f) * t - (a + 3.0f)) * t * t + 1.0f;
  const float s2 = 1.0f - t;
  w[2] = ((a + 2.0f) * s2 - (a + 3.0f)) * s2 * s2 + 1.0f;
  const float s3 = s2 + 1.0f;
  w[3] = ((a * s3 - 5.0f * a) * s3 + 8.0f * a) * s3 - 4.0f * a;
}

// Taps of output index `dst` along an axis of `size` source samples, scale = size / out_size in
// fp32. The source coordinate (dst + 0.5) * scale - 0.5 is not clamped at 0 for cubic and is
// rounded once, as PyTorch's kernel computes it (a fused multiply-add); the tap indices are.
HIFLOW_HD inline AxisTaps bicubic_taps(index_t dst, float scale, index_t size) {
  AxisTaps taps;
  const float src = fmaf(static_cast<float>(dst) + 0.5f, scale, -0.5f);
  const float floor_src = floorf(src);
  cubic_weights(src - floor_src, taps.weight);
  const index_t first = static_cast<index_t>(floor_src) - 1;
  for (int k = 0; k < 4; ++k) {
    const index_t at = first + k;
    taps.index[k] = at < 0 ? 0 : (at > size - 1 ? size - 1 : at);
  }
  return taps;
}

// Offset of channel c, row `row`, column 0 of image b in a packed (ref_h, ref_w) tensor; column
// `col` adds packed_column_offset(col).
HIFLOW_HD inline index_t packed_row_offset(index_t b, index_t c, index_t row, index_t ref_h, index_t ref_w,
                                           index_t channels) {
  const index_t features = 4 * channels;
  return (b * (ref_h / 2) + row / 2) * (ref_w / 2) * features + 4 * c + 2 * (row % 2);
}

HIFLOW_HD inline index_t packed_column_offset(index_t col, index_t channels) { return (col / 2) * 4 * channels + col % 2; }

// The four samples of one axis combined with its taps' weights, in this order: both stages of
// the separable bicubic are this sum (on values, so that the CPU can run it over rows it has
// gathered, in loops the compiler vectorises).
HIFLOW_HD inline float bicubic_weighted_sum(const AxisTaps& taps, float s0, float s1, float s2, float s3) {
  return taps.weight[0] * s0 + taps.weight[1] * s1 + taps.weight[2] * s2 + taps.weight[3] * s3;
}

// One source row resampled at an output column: sum_k w_k * R[row, col_k] (`row` from
// packed_row_offset). The first stage of the separable bicubic.
HIFLOW_HD inline float bicubic_across(const Source& ref, index_t row, const AxisTaps& cols, index_t channels) {
  return bicubic_weighted_sum(cols, ref[row + packed_column_offset(cols.index[0], channels)],
                              ref[row + packed_column_offset(cols.index[1], channels)],
                              ref[row + packed_column_offset(cols.index[2], channels)],
                              ref[row + packed_column_offset(cols.index[3], channels)]);
}

// The second stage: the four resampled rows combined with the row weights (the Triton
// kernel's order: each row's sum first, then the rows).
HIFLOW_HD inline float bicubic_down(const AxisTaps& rows, float r0, float r1, float r2, float r3) {
  return bicubic_weighted_sum(rows, r0, r1, r2, r3);
}

// Bicubic (align_corners=False) value of channel c of image b at the output pixel whose row
// and column taps are given, read from the packed reference (ref_h, ref_w); fp32. (The GPU's
// way; the CPU keeps the first stage's rows in a buffer and calls bicubic_down itself.)
HIFLOW_HD inline float bicubic_sample(const Source& ref, index_t b, index_t c, index_t ref_h, index_t ref_w,
                                      index_t channels, const AxisTaps& rows, const AxisTaps& cols) {
  float across[4];
  for (int r = 0; r < 4; ++r)
    across[r] = bicubic_across(ref, packed_row_offset(b, c, rows.index[r], ref_h, ref_w, channels), cols, channels);
  return bicubic_down(rows, across[0], across[1], across[2], across[3]);
}

// The velocity formula's epsilon (hiflow_fast.ref.guided_velocity.VELOCITY_EPS: the official 1e-6).
constexpr float kVelocityEps = 1e-6f;

}  // namespace hiflow_native
