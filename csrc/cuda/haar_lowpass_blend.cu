// CUDA kernel of hiflow_fast_native::haar_lowpass_blend: one thread per 2x2 block (it reads
// then writes only its own block, so the in-place update has no cross-thread hazard); the math
// in ../haar_lowpass_blend.h.
#include "../haar_lowpass_blend.h"
#include "launch.cuh"

namespace hiflow_native {

__global__ void haar_lowpass_kernel(HaarLowpassArgs a, int64_t n_blocks) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (thread < n_blocks) haar_lowpass_block(a, static_cast<index_t>(thread));
}

void haar_lowpass_blend_cuda(const HaarLowpassArgs& args, void* stream) {
  const int64_t n_blocks = haar_block_count(args);
  if (n_blocks == 0) return;
  haar_lowpass_kernel<<<blocks_for(n_blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(args, n_blocks);
  check_launch("haar_lowpass_kernel");
}

}  // namespace hiflow_native
