// CUDA kernel of the mask-and-scale step of hiflow_fast_native::spectral_lowpass_blend (the
// FFTs are torch's, called by the binding): one thread per rfft bin, which evaluates the mask
// once and applies it to kSlicesPerThread consecutive slices (grid.y), amortising its ~20 flops
// over several 8-byte complex loads. The math in ../spectral_lowpass_blend.h.
#include "../spectral_lowpass_blend.h"
#include "launch.cuh"

namespace hiflow_native {

// Slices each thread walks (kernels/spectral_lowpass_blend.py's SLICES_PER_PROGRAM).
constexpr int kSlicesPerThread = 4;

__global__ void spectral_scale_kernel(SpectralScaleArgs a, int64_t bins) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (thread >= bins) return;
  const index_t k = static_cast<index_t>(thread);
  const float gain = spectral_gain(a, k);
  const index_t first = static_cast<index_t>(blockIdx.y) * kSlicesPerThread;
  for (index_t s = first; s < first + kSlicesPerThread && s < a.slices; ++s) spectral_scale_bin(a, s, k, gain);
}

void spectral_scale_cuda(const SpectralScaleArgs& args, void* stream) {
  const int64_t bins = args.height * (args.width / 2 + 1);
  if (bins == 0 || args.slices == 0) return;
  const dim3 grid(blocks_for(bins), static_cast<unsigned int>((args.slices + kSlicesPerThread - 1) / kSlicesPerThread));
  spectral_scale_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(args, bins);
  check_launch("spectral_scale_kernel");
}

}  // namespace hiflow_native
