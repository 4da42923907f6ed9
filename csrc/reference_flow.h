// hiflow_fast_native::reference_flow: the unguided x0 and the bicubic reference's difference
// from it, in one pass (the math of kernels/reference_flow.py).
//
// For every latent pixel (b, c, i, j) of the current grid [B, C, h, w]:
//   x0   = x - sigma * v                      (x, v: packed sample and model output)
//   diff = bicubic(ref)(i, j) - x0            (ref: the previous stage's packed x0 on ref_h x ref_w)
// Outputs: x0 packed [B, N, 4C] fp32, diff unpacked [B, C, h, w] fp32. All math in fp32.
#pragma once

#include "common.h"

namespace hiflow_native {

struct ReferenceFlowArgs {
  Source sample;        // [B, N, 4C] packed, current grid
  Source model_output;  // [B, N, 4C]
  Source ref_x0;        // [B, N_ref, 4C] packed on (ref_h, ref_w)
  float* pred_x0;       // out: [B, N, 4C] fp32
  float* diff;          // out: [B, C, h, w] fp32
  index_t batch, channels, height, width, ref_h, ref_w;
  float scale_h, scale_w;  // ref_h / height, ref_w / width in fp32 (PyTorch's scales)
  float sigma;
};

// The per-element math, on values (no indexing), so that the CPU can run it over rows it has
// already gathered into fp32 buffers (loops the compiler vectorises) and the GPU per thread.
// x0 = x - sigma * v: the unguided estimate.
HIFLOW_HD inline float unguided_x0(float x, float v, float sigma) { return x - v * sigma; }
// ref - x0: the difference the low-pass filters.
HIFLOW_HD inline float reference_difference(float ref, float x0) { return ref - x0; }

// One pixel: p its offset in the packed tensors (packed_offset), d in the unpacked diff, ref its
// bicubic reference value (bicubic_sample). The GPU's per-thread form; the CPU calls the value
// functions above on whole rows.
HIFLOW_HD inline void reference_flow_element(const ReferenceFlowArgs& a, index_t p, index_t d, float ref) {
  const float x0 = unguided_x0(a.sample[p], a.model_output[p], a.sigma);
  a.pred_x0[p] = x0;
  a.diff[d] = reference_difference(ref, x0);
}

void reference_flow_cpu(const ReferenceFlowArgs& args);
// stream: a cudaStream_t (void* here, so that this header needs no CUDA header).
void reference_flow_cuda(const ReferenceFlowArgs& args, void* stream);

}  // namespace hiflow_native
