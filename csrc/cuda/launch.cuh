// Launch helpers shared by the CUDA kernels of csrc/cuda (CUDA runtime only, no torch).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace hiflow_native {

// Threads per block: 256 (8 warps) keeps enough blocks resident per SM for these memory-bound
// element-wise kernels.
constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t items) { return static_cast<unsigned int>((items + kThreads - 1) / kThreads); }

// Launch errors surface as exceptions (the binding turns them into Python errors).
inline void check_launch(const char* what) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

}  // namespace hiflow_native
