// hiflow_fast_native::guided_velocity: direction + acceleration alignment and the Euler step in
// one pass, written straight onto the next step's swin grid (the math of
// kernels/guided_velocity.py).
//
// For current-grid pixel (b, c, i, j), with x the latent, x0 the unguided estimate, lp =
// alpha * LP(ref - x0) and ref the bicubic reference (recomputed from the small packed x0 of the
// previous stage, cheaper than storing it):
//   v     = (x - (x0 + lp)) / (sigma + 1e-6)
//   v_ref = (x - ref) / (sigma + 1e-6)
//   v    <- v + beta * ((v_prev - v_ref_prev) - (v - v_ref))     (only when a state exists)
//   x'    = x + (sigma_next - sigma) * v
// Outputs are packed on the output grid (out_h, out_w): the current grid, or it swin-padded by
// one latent pixel per side, or cropped by one. Output pixel (oi, oj) holds current pixel
// (oi - shift, oj - shift), shift = (out_h - h) / 2; the pad ring is zero in every output (what
// the official F.pad makes). The state is read the same way from its own grid (zero outside),
// so no pad or crop copy is made.
#pragma once

#include "common.h"

namespace hiflow_native {

// How the acceleration state is held (hiflow_fast.ops.guidance_ops PREV_*).
enum PrevMode : int {
  kPrevNone = 0,      // no state: a stage's first step
  kPrevSeparate = 1,  // state in v_prev / v_ref_prev, on grid (state_h, state_w)
  kPrevInPlace = 2,   // state already in v / v_ref (output grid), read then overwritten
};

struct GuidedVelocityArgs {
  Source sample;         // [B, N, 4C] packed x, current grid
  const float* pred_x0;  // [B, N, 4C] fp32 packed x0
  const float* lowpass;  // [B, C, h, w] fp32: alpha * LP(ref - x0)
  Source ref_x0;         // [B, N_ref, 4C] packed on (ref_h, ref_w)
  Source v_prev;         // [B, N_state, 4C] (kPrevSeparate)
  Source v_ref_prev;
  void* x_next;  // out: [B, N_out, 4C] packed on the output grid, in x_next_dtype
  DType x_next_dtype;
  float* v;  // out: [B, N_out, 4C] fp32 (holds the state on entry with kPrevInPlace)
  float* v_ref;
  index_t batch, channels, height, width, out_h, out_w, state_h, state_w, ref_h, ref_w;
  float scale_h, scale_w;  // ref_h / height, ref_w / width in fp32
  float sigma, sigma_next, beta;
  float inv_denom;  // 1 / (sigma + 1e-6)
  int prev_mode;
};

// The current-grid pixel an output element holds, and whether it holds one (not the pad ring).
struct OutputPixel {
  index_t b, c, i, j;
  bool inside;
};

// The current-grid pixel that output pixel (oi, oj) of channel c, image b holds.
HIFLOW_HD inline OutputPixel pixel_at(const GuidedVelocityArgs& a, index_t b, index_t c, index_t oi, index_t oj) {
  OutputPixel px;
  px.b = b;
  px.c = c;
  px.i = oi - (a.out_h - a.height) / 2;
  px.j = oj - (a.out_w - a.width) / 2;
  px.inside = px.i >= 0 && px.i < a.height && px.j >= 0 && px.j < a.width;
  return px;
}

// Output element `o` (index into the packed [B, N_out, 4C] outputs).
HIFLOW_HD inline OutputPixel output_pixel(const GuidedVelocityArgs& a, index_t o) {
  const index_t features = 4 * a.channels;
  const index_t out_tokens = (a.out_h / 2) * (a.out_w / 2);
  const index_t f = o % features;
  const index_t token = (o / features) % out_tokens;
  const index_t oi = 2 * (token / (a.out_w / 2)) + (f / 2) % 2;
  const index_t oj = 2 * (token % (a.out_w / 2)) + f % 2;
  return pixel_at(a, o / (features * out_tokens), f / 4, oi, oj);
}

// Where output element o reads: p its pixel in the packed current-grid tensors, l in the
// unpacked lowpass, s in the packed state (kPrevSeparate; -1 in the state's own pad ring).
struct ElementSources {
  index_t p, l, s;
};

HIFLOW_HD inline ElementSources element_sources(const GuidedVelocityArgs& a, const OutputPixel& px) {
  ElementSources at;
  at.p = packed_offset(px.b, px.c, px.i, px.j, a.height, a.width, a.channels);
  at.l = ((px.b * a.channels + px.c) * a.height + px.i) * a.width + px.j;
  const index_t si = px.i + (a.state_h - a.height) / 2;
  const index_t sj = px.j + (a.state_w - a.width) / 2;
  const bool in_state = si >= 0 && si < a.state_h && sj >= 0 && sj < a.state_w;
  at.s = in_state ? packed_offset(px.b, px.c, si, sj, a.state_h, a.state_w, a.channels) : -1;
  return at;
}

// The pad ring: zero in every output, whatever the state held (what the official F.pad makes).
HIFLOW_HD inline void guided_velocity_ring_element(const GuidedVelocityArgs& a, index_t o) {
  store_as(a.x_next, a.x_next_dtype, o, 0.0f);
  a.v[o] = 0.0f;
  a.v_ref[o] = 0.0f;
}

// The per-element math, on values (no indexing), so that the CPU can run it over rows it has
// already gathered into fp32 buffers (loops the compiler vectorises) and the GPU per thread.
// with_state: whether a state exists (any prev_mode but kPrevNone; v_prev = v_ref_prev = 0 in
// the state's own pad ring). The CPU passes it as a constant per loop, so that the branch
// compiles away.
struct VelocityStep {
  float x_next, v, v_ref;
};

HIFLOW_HD inline VelocityStep guided_velocity_math(float x, float x0, float lowpass, float ref, bool with_state,
                                                   float v_prev, float v_ref_prev, float inv_denom, float beta,
                                                   float sigma, float sigma_next) {
  const float x0_guided = x0 + lowpass;
  float v = (x - x0_guided) * inv_denom;
  const float v_ref = (x - ref) * inv_denom;
  if (with_state) v = v + beta * ((v_prev - v_ref_prev) - (v - v_ref));
  VelocityStep out;
  out.x_next = x + (sigma_next - sigma) * v;
  out.v = v;
  out.v_ref = v_ref;
  return out;
}

// Computes and stores output element o, which holds a current-grid pixel (not the pad ring)
// read at `at`; ref: its bicubic reference value (bicubic_sample). The GPU's per-thread form
// (indices decoded by output_pixel, element_sources); the CPU calls guided_velocity_math on
// whole rows.
HIFLOW_HD inline void guided_velocity_element(const GuidedVelocityArgs& a, index_t o, const ElementSources& at,
                                              float ref) {
  float v_prev = 0.0f, v_ref_prev = 0.0f;  // (0 in the state's pad ring)
  if (a.prev_mode == kPrevInPlace) {
    v_prev = a.v[o];
    v_ref_prev = a.v_ref[o];
  } else if (a.prev_mode == kPrevSeparate && at.s >= 0) {
    v_prev = a.v_prev[at.s];
    v_ref_prev = a.v_ref_prev[at.s];
  }
  const VelocityStep out = guided_velocity_math(a.sample[at.p], a.pred_x0[at.p], a.lowpass[at.l], ref,
                                                a.prev_mode != kPrevNone, v_prev, v_ref_prev, a.inv_denom, a.beta,
                                                a.sigma, a.sigma_next);
  store_as(a.x_next, a.x_next_dtype, o, out.x_next);
  a.v[o] = out.v;
  a.v_ref[o] = out.v_ref;
}

void guided_velocity_cpu(const GuidedVelocityArgs& args);
void guided_velocity_cuda(const GuidedVelocityArgs& args, void* stream);

}  // namespace hiflow_native
