// CPU implementation of the mask-and-scale step of hiflow_fast_native::spectral_lowpass_blend:
// the gain of every rfft bin evaluated once (../spectral_lowpass_blend.h), then every slice's
// bins scaled in memory order, both in parallel (at::parallel_for).
#include <ATen/Parallel.h>

#include <vector>

#include "../spectral_lowpass_blend.h"

namespace hiflow_native {

void spectral_scale_cpu(const SpectralScaleArgs& a) {
  const index_t bins = a.height * (a.width / 2 + 1);
  std::vector<float> gains(bins);
  at::parallel_for(0, bins, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) gains[k] = spectral_gain(a, static_cast<index_t>(k));
  });
  at::parallel_for(0, static_cast<int64_t>(a.slices) * bins, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const index_t k = static_cast<index_t>(e % bins);
      spectral_scale_bin(a, static_cast<index_t>(e / bins), k, gains[k]);
    }
  });
}

}  // namespace hiflow_native
