// CUDA kernel of hiflow_fast_native::guided_velocity: one thread per output element (packed,
// output grid); the math, the swin pad/crop folded into indexing and the three ways of holding
// the state, in ../guided_velocity.h. With kPrevInPlace each thread reads exactly the v / v_ref
// elements it then writes, so the in-place update has no cross-thread hazard.
#include "../guided_velocity.h"
#include "launch.cuh"

namespace hiflow_native {

__global__ void guided_velocity_kernel(GuidedVelocityArgs a, int64_t n) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (thread >= n) return;
  const index_t o = static_cast<index_t>(thread);
  const OutputPixel px = output_pixel(a, o);
  if (!px.inside) {
    guided_velocity_ring_element(a, o);
    return;
  }
  const AxisTaps rows = bicubic_taps(px.i, a.scale_h, a.ref_h);
  const AxisTaps cols = bicubic_taps(px.j, a.scale_w, a.ref_w);
  const float ref = bicubic_sample(a.ref_x0, px.b, px.c, a.ref_h, a.ref_w, a.channels, rows, cols);
  guided_velocity_element(a, o, element_sources(a, px), ref);
}

void guided_velocity_cuda(const GuidedVelocityArgs& args, void* stream) {
  const int64_t n = args.batch * (args.out_h / 2) * (args.out_w / 2) * 4 * args.channels;
  if (n == 0) return;
  guided_velocity_kernel<<<blocks_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(args, n);
  check_launch("guided_velocity_kernel");
}

}  // namespace hiflow_native
