// CUDA kernel of hiflow_fast_native::reference_flow: one thread per unpacked pixel, the math in
// ../reference_flow.h (shared with the CPU implementation).
#include "../reference_flow.h"
#include "launch.cuh"

namespace hiflow_native {

__global__ void reference_flow_kernel(ReferenceFlowArgs a, int64_t n) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (thread >= n) return;
  const index_t e = static_cast<index_t>(thread);
  const index_t j = e % a.width;
  const index_t i = (e / a.width) % a.height;
  const index_t c = (e / (a.width * a.height)) % a.channels;
  const index_t b = e / (a.width * a.height * a.channels);
  const AxisTaps rows = bicubic_taps(i, a.scale_h, a.ref_h);
  const AxisTaps cols = bicubic_taps(j, a.scale_w, a.ref_w);
  const float ref = bicubic_sample(a.ref_x0, b, c, a.ref_h, a.ref_w, a.channels, rows, cols);
  reference_flow_element(a, packed_offset(b, c, i, j, a.height, a.width, a.channels), e, ref);
}

void reference_flow_cuda(const ReferenceFlowArgs& args, void* stream) {
  const int64_t n = args.batch * args.channels * args.height * args.width;
  if (n == 0) return;
  reference_flow_kernel<<<blocks_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(args, n);
  check_launch("reference_flow_kernel");
}

}  // namespace hiflow_native
