// The torch binding of the native backend: the schemas of hiflow_fast_native::<op> and their
// CPU, CUDA and Meta implementations. The only file of csrc/ that includes torch.
//
// Why a namespace of its own (hiflow_fast_native::, not implementations of hiflow_fast::):
// hiflow_fast::<op> is defined in Python (hiflow_fast/ops/guidance_ops.py) as a triton_op or,
// under Triton's CPU interpreter, a custom_op whose one kernel serves every device; an op has
// one kernel per dispatch key, so the native CPU and CUDA kernels could only replace the Triton
// ones process-wide, and which implementation ran would depend on import order. Two namespaces
// with the same schemas (tests/test_native_ops.py compares them) let the backend be chosen per
// call site (hiflow_fast.backend) and let a C++ front end load this library alone: the schemas
// live here, in C++, because a library that needs Python to define its ops is no C++ library.
//
// The argument contracts are those of the Triton ops (docstrings in guidance_ops.py): the
// guidance step (hiflow_fast.guidance) validates user input and raises HiFlowInputError; the
// TORCH_CHECKs here guard memory safety (dtypes, contiguity, sizes, devices), nothing more.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/_fft_c2c.h>
#include <ATen/ops/_fft_c2r.h>
#include <ATen/ops/_fft_r2c.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/fft_irfft2.h>
#include <ATen/ops/fft_rfft2.h>
#include <ATen/ops/view_as_complex.h>
#include <ATen/ops/view_as_real.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#ifdef HIFLOW_NATIVE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "guided_velocity.h"
#include "haar_lowpass_blend.h"
#include "reference_flow.h"
#include "spectral_lowpass_blend.h"

namespace hiflow_native {
namespace {

// The CUDA launcher on a CUDA tensor (on its device and current stream), else the CPU one.
#ifdef HIFLOW_NATIVE_WITH_CUDA
#define HIFLOW_RUN(like, name, args)                                                       \
  do {                                                                                     \
    if ((like).is_cuda()) {                                                                \
      const c10::cuda::CUDAGuard guard((like).device());                                   \
      name##_cuda(args, static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream())); \
    } else {                                                                               \
      name##_cpu(args);                                                                    \
    }                                                                                      \
  } while (0)
#else
#define HIFLOW_RUN(like, name, args) name##_cpu(args)
#endif

constexpr int64_t kMaxElements = std::numeric_limits<index_t>::max();  // 32-bit indexing

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_contiguous(), "hiflow_fast_native: ", name, " must be contiguous");
  TORCH_CHECK(t.device() == like.device(), "hiflow_fast_native: ", name, " is on ", t.device(), ", expected ",
              like.device());
  TORCH_CHECK(t.numel() <= kMaxElements, "hiflow_fast_native: ", name, " has ", t.numel(),
              " elements; at most 2^31 - 1 (32-bit indexing)");
}

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "hiflow_fast_native: ", name, " has dtype ", t.scalar_type(),
                  "; expected float32, float16 or bfloat16");
  }
}

Source source(const at::Tensor& t, const char* name, const at::Tensor& like) {
  check_tensor(t, name, like);
  return Source{t.const_data_ptr(), dtype_of(t, name)};
}

float* fp32(const at::Tensor& t, const char* name, const at::Tensor& like) {
  check_tensor(t, name, like);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "hiflow_fast_native: ", name, " must be float32");
  return t.data_ptr<float>();
}

// A packed [B, (h/2)*(w/2), 4C] tensor of the given batch, grid and channels.
void check_packed(const at::Tensor& t, const char* name, int64_t batch, int64_t h, int64_t w, int64_t channels) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == batch && t.size(1) == (h / 2) * (w / 2) && t.size(2) == 4 * channels,
              "hiflow_fast_native: ", name, " has shape ", t.sizes(), "; expected [", batch, ", ", (h / 2) * (w / 2),
              ", ", 4 * channels, "] for a ", h, "x", w, " grid");
}

void check_grid(int64_t h, int64_t w, const char* name) {
  TORCH_CHECK(h > 0 && w > 0 && h % 2 == 0 && w % 2 == 0, "hiflow_fast_native: ", name, " (", h, ", ", w,
              ") must be positive and even");
}

void reference_flow(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& ref_x0,
                    int64_t ref_height, int64_t ref_width, double sigma, const at::Tensor& pred_x0,
                    const at::Tensor& diff) {
  TORCH_CHECK(diff.dim() == 4, "hiflow_fast_native: diff must be [B, C, h, w]");
  const int64_t batch = diff.size(0), channels = diff.size(1), h = diff.size(2), w = diff.size(3);
  check_grid(h, w, "diff's grid");
  check_grid(ref_height, ref_width, "the reference grid");
  check_packed(sample, "sample", batch, h, w, channels);
  check_packed(model_output, "model_output", batch, h, w, channels);
  check_packed(pred_x0, "pred_x0", batch, h, w, channels);
  check_packed(ref_x0, "ref_x0", batch, ref_height, ref_width, channels);
  ReferenceFlowArgs args;
  args.sample = source(sample, "sample", diff);
  args.model_output = source(model_output, "model_output", diff);
  args.ref_x0 = source(ref_x0, "ref_x0", diff);
  args.pred_x0 = fp32(pred_x0, "pred_x0", diff);
  args.diff = fp32(diff, "diff", diff);
  args.batch = static_cast<index_t>(batch);
  args.channels = static_cast<index_t>(channels);
  args.height = static_cast<index_t>(h);
  args.width = static_cast<index_t>(w);
  args.ref_h = static_cast<index_t>(ref_height);
  args.ref_w = static_cast<index_t>(ref_width);
  // PyTorch's area_pixel_compute_scale: input / output in fp32.
  args.scale_h = static_cast<float>(ref_height) / static_cast<float>(h);
  args.scale_w = static_cast<float>(ref_width) / static_cast<float>(w);
  args.sigma = static_cast<float>(sigma);
  if (diff.numel() == 0) return;
  HIFLOW_RUN(diff, reference_flow, args);
}

// The arguments of the mask-and-scale step (spectrum and slices left to the caller).
SpectralScaleArgs spectral_scale_args(int64_t height, int64_t width, double ratio, int64_t order, double alpha) {
  SpectralScaleArgs args;
  args.spectrum = nullptr;
  args.slices = 0;
  args.height = static_cast<index_t>(height);
  args.width = static_cast<index_t>(width);
  // ratio == 0 means "no low band": the mask is 0 everywhere (1 / ratio^2 would be inf and
  // d = 0 would give 0 * inf = NaN), so scale by 0 instead (as the Triton op does).
  const bool no_band = ratio <= 0.0;
  args.scale = no_band ? 0.0f : static_cast<float>(alpha);
  args.inv_ratio_sq = no_band ? 1.0f : static_cast<float>(1.0 / (ratio * ratio));
  args.order = static_cast<int>(order);
  return args;
}

// The mask-and-scale step of spectral_lowpass_blend on an rfft2 spectrum given as
// view_as_real, fp32 [..., H, W/2 + 1, 2] (H, W: the spatial sizes). Also an op of its own,
// so that the mask can be tested bin by bin (tests/test_native_ops.py).
void spectral_lowpass_scale(const at::Tensor& spectrum, int64_t height, int64_t width, double ratio, int64_t order,
                            double alpha) {
  TORCH_CHECK(spectrum.dim() >= 3 && spectrum.size(-1) == 2 && spectrum.size(-2) == width / 2 + 1 &&
                  spectrum.size(-3) == height && height > 0 && width > 0,
              "hiflow_fast_native: spectrum has shape ", spectrum.sizes(), "; expected [..., ", height, ", ",
              width / 2 + 1, ", 2]");
  TORCH_CHECK(order >= 1 && order <= 16, "hiflow_fast_native: order ", order, " outside 1..16");
  SpectralScaleArgs args = spectral_scale_args(height, width, ratio, order, alpha);
  args.spectrum = fp32(spectrum, "spectrum", spectrum);
  args.slices = static_cast<index_t>(spectrum.numel() / (2 * height * (width / 2 + 1)));
  if (spectrum.numel() == 0) return;
  HIFLOW_RUN(spectrum, spectral_scale, args);
}

// torch's FFT normalisation modes (at::native::fft_norm_mode): none, and 1 / n over the
// transformed dims. rfft2 / irfft2's defaults ("backward") are none forward, 1 / n inverse.
constexpr int64_t kFftNormNone = 0;
constexpr int64_t kFftNormByN = 2;

// The CPU's FFT pair, one [H, W] slice at a time, slices in parallel: rfft2 of the slice
// (_fft_r2c), its bins scaled (spectral_scale_slice_cpu), and irfft2 the way torch computes it
// (the inverse over H, _fft_c2c, then over W, _fft_c2r, each normalised by its length) into the
// slice. Same transforms as one batched rfft2 / irfft2 (equal to ~1e-7), but a slice's spectrum
// (H * (W/2 + 1) complex values, 1 MiB at the 4K latent) stays in the core's cache from one step
// to the next, where the batched calls stream the whole spectrum through memory four times and
// irfft2 adds two copies of it (its inverse over H leaves the spectrum transposed, and the
// inverse over W needs it contiguous). Measured on a 2-core VM at the 4K latent: the pair 1.5x
// faster with one thread. The FFTs inside run on one thread each (MKL sequential within the
// parallel region).
void spectral_lowpass_blend_cpu_slices(const at::Tensor& diff, double ratio, int64_t order, double alpha) {
  const int64_t h = diff.size(-2), w = diff.size(-1);
  const SpectralScaleArgs args = spectral_scale_args(h, w, ratio, order, alpha);
  std::vector<float> gains(static_cast<size_t>(h) * (w / 2 + 1));
  spectral_gains_cpu(args, gains.data());
  const at::Tensor slices = diff.view({-1, h, w});
  float* const out = diff.data_ptr<float>();
  // The caller's thread-local state (grad and inference mode, dispatch keys) in the worker
  // threads too, which call torch ops: an inference tensor, say, is not an error there.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, slices.size(0), 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t s = begin; s < end; ++s) {
      const at::Tensor spectrum = at::_fft_r2c(slices[s], {0, 1}, kFftNormNone, /*onesided=*/true).contiguous();
      spectral_scale_slice_cpu(args, gains.data(), reinterpret_cast<float*>(spectrum.data_ptr()));
      const at::Tensor columns = at::_fft_c2c(spectrum, {0}, kFftNormByN, /*forward=*/false);
      // The inverse over H comes back column-major ([W/2 + 1][H] in memory); the inverse over W
      // reads rows, 2.5x faster from a row-major copy, made here in the spectrum's buffer
      // (free by now; torch's own copy of a transposed complex tensor costs as much as the FFT).
      at::Tensor rows = columns;
      if (columns.stride(0) == 1 && columns.stride(1) == h) {
        transpose_complex_cpu(reinterpret_cast<const float*>(columns.const_data_ptr()), static_cast<index_t>(h),
                              static_cast<index_t>(w / 2 + 1), reinterpret_cast<float*>(spectrum.data_ptr()));
        rows = spectrum;
      }
      const at::Tensor lowpass = at::_fft_c2r(rows, {1}, kFftNormByN, w).contiguous();
      // (Written by plain memory copy: the op mutates diff, which autograd never sees.)
      std::memcpy(out + s * h * w, lowpass.const_data_ptr<float>(), sizeof(float) * h * w);
    }
  });
}

void spectral_lowpass_blend(const at::Tensor& diff, double ratio, int64_t order, double alpha) {
  TORCH_CHECK(diff.dim() >= 2, "hiflow_fast_native: diff must have at least 2 dims");
  fp32(diff, "diff", diff);
  TORCH_CHECK(order >= 1 && order <= 16, "hiflow_fast_native: order ", order, " outside 1..16");
  const int64_t h = diff.size(-2), w = diff.size(-1);
  if (diff.numel() == 0) return;
  if (!diff.is_cuda()) {
    spectral_lowpass_blend_cpu_slices(diff, ratio, order, alpha);
    return;
  }
  // One real FFT pair (cuFFT) around the native mask-and-scale.
  // view_as_real of rfft2's fresh output is contiguous; .contiguous() only guards that.
  const at::Tensor spectrum = at::view_as_real(at::fft_rfft2(diff)).contiguous();
  spectral_lowpass_scale(spectrum, h, w, ratio, order, alpha);
  at::Tensor out = diff;
  at::fft_irfft2_out(out, at::view_as_complex(spectrum), std::vector<int64_t>{h, w}, {-2, -1});
}

void haar_lowpass_blend(const at::Tensor& diff, double alpha) {
  TORCH_CHECK(diff.dim() >= 2, "hiflow_fast_native: diff must have at least 2 dims");
  HaarLowpassArgs args;
  args.diff = fp32(diff, "diff", diff);
  args.height = static_cast<index_t>(diff.size(-2));
  args.width = static_cast<index_t>(diff.size(-1));
  args.slices = args.height * args.width == 0 ? 0 : static_cast<index_t>(diff.numel() / (args.height * args.width));
  args.alpha = static_cast<float>(alpha);
  if (diff.numel() == 0) return;
  HIFLOW_RUN(diff, haar_lowpass_blend, args);
}

void guided_velocity(const at::Tensor& sample, const at::Tensor& pred_x0, const at::Tensor& lowpass,
                     const at::Tensor& ref_x0, const std::optional<at::Tensor>& v_prev,
                     const std::optional<at::Tensor>& v_ref_prev, int64_t ref_height, int64_t ref_width,
                     int64_t state_height, int64_t state_width, int64_t out_height, int64_t out_width, double sigma,
                     double sigma_next, double beta, int64_t prev_mode, const at::Tensor& x_next, const at::Tensor& v,
                     const at::Tensor& v_ref) {
  TORCH_CHECK(lowpass.dim() == 4, "hiflow_fast_native: lowpass must be [B, C, h, w]");
  const int64_t batch = lowpass.size(0), channels = lowpass.size(1), h = lowpass.size(2), w = lowpass.size(3);
  TORCH_CHECK(prev_mode >= kPrevNone && prev_mode <= kPrevInPlace, "hiflow_fast_native: prev_mode ", prev_mode,
              " is not 0 (none), 1 (separate) or 2 (in place)");
  check_grid(h, w, "lowpass's grid");
  check_grid(ref_height, ref_width, "the reference grid");
  check_grid(out_height, out_width, "the output grid");
  TORCH_CHECK((out_height - h) % 2 == 0 && (out_width - w) % 2 == 0,
              "hiflow_fast_native: the output grid must differ from the current one by an even amount");
  check_packed(sample, "sample", batch, h, w, channels);
  check_packed(pred_x0, "pred_x0", batch, h, w, channels);
  check_packed(ref_x0, "ref_x0", batch, ref_height, ref_width, channels);
  for (const auto* out : {&x_next, &v, &v_ref}) check_packed(*out, "an output", batch, out_height, out_width, channels);
  GuidedVelocityArgs args;
  args.sample = source(sample, "sample", lowpass);
  args.pred_x0 = fp32(pred_x0, "pred_x0", lowpass);
  args.lowpass = fp32(lowpass, "lowpass", lowpass);
  args.ref_x0 = source(ref_x0, "ref_x0", lowpass);
  args.v_prev = args.v_ref_prev = Source{nullptr, DType::kFloat32};
  if (prev_mode == kPrevSeparate) {
    TORCH_CHECK(v_prev.has_value() && v_ref_prev.has_value(), "hiflow_fast_native: prev_mode 1 needs v_prev and v_ref_prev");
    check_grid(state_height, state_width, "the state grid");
    TORCH_CHECK((state_height - h) % 2 == 0 && (state_width - w) % 2 == 0,
                "hiflow_fast_native: the state grid must differ from the current one by an even amount");
    check_packed(*v_prev, "v_prev", batch, state_height, state_width, channels);
    check_packed(*v_ref_prev, "v_ref_prev", batch, state_height, state_width, channels);
    args.v_prev = source(*v_prev, "v_prev", lowpass);
    args.v_ref_prev = source(*v_ref_prev, "v_ref_prev", lowpass);
  }
  check_tensor(x_next, "x_next", lowpass);
  args.x_next = x_next.data_ptr();
  args.x_next_dtype = dtype_of(x_next, "x_next");
  args.v = fp32(v, "v", lowpass);
  args.v_ref = fp32(v_ref, "v_ref", lowpass);
  args.batch = static_cast<index_t>(batch);
  args.channels = static_cast<index_t>(channels);
  args.height = static_cast<index_t>(h);
  args.width = static_cast<index_t>(w);
  args.out_h = static_cast<index_t>(out_height);
  args.out_w = static_cast<index_t>(out_width);
  args.state_h = static_cast<index_t>(state_height);
  args.state_w = static_cast<index_t>(state_width);
  args.ref_h = static_cast<index_t>(ref_height);
  args.ref_w = static_cast<index_t>(ref_width);
  args.scale_h = static_cast<float>(ref_height) / static_cast<float>(h);
  args.scale_w = static_cast<float>(ref_width) / static_cast<float>(w);
  args.sigma = static_cast<float>(sigma);
  args.sigma_next = static_cast<float>(sigma_next);
  args.beta = static_cast<float>(beta);
  args.inv_denom = static_cast<float>(1.0 / (static_cast<double>(args.sigma) + kVelocityEps));
  args.prev_mode = static_cast<int>(prev_mode);
  if (x_next.numel() == 0) return;
  HIFLOW_RUN(lowpass, guided_velocity, args);
}

// Fake (Meta) implementations: every op only mutates preallocated outputs, so there is nothing
// to compute; torch.compile traces through them.
void reference_flow_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double,
                         const at::Tensor&, const at::Tensor&) {}
void spectral_lowpass_scale_meta(const at::Tensor&, int64_t, int64_t, double, int64_t, double) {}
void spectral_lowpass_blend_meta(const at::Tensor&, double, int64_t, double) {}
void haar_lowpass_blend_meta(const at::Tensor&, double) {}
void guided_velocity_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t, int64_t, int64_t,
                          int64_t, int64_t, int64_t, double, double, double, int64_t, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&) {}

}  // namespace
}  // namespace hiflow_native

// The schemas are those of hiflow_fast::<op> (guidance_ops.py), argument for argument.
TORCH_LIBRARY(hiflow_fast_native, m) {
  m.def(
      "reference_flow(Tensor sample, Tensor model_output, Tensor ref_x0, SymInt ref_height, SymInt ref_width, "
      "float sigma, Tensor(a6!) pred_x0, Tensor(a7!) diff) -> ()");
  m.def("spectral_lowpass_blend(Tensor(a0!) diff, float ratio, SymInt order, float alpha) -> ()");
  m.def("haar_lowpass_blend(Tensor(a0!) diff, float alpha) -> ()");
  m.def(
      "guided_velocity(Tensor sample, Tensor pred_x0, Tensor lowpass, Tensor ref_x0, Tensor? v_prev, "
      "Tensor? v_ref_prev, SymInt ref_height, SymInt ref_width, SymInt state_height, SymInt state_width, "
      "SymInt out_height, SymInt out_width, float sigma, float sigma_next, float beta, SymInt prev_mode, "
      "Tensor(a16!) x_next, Tensor(a17!) v, Tensor(a18!) v_ref) -> ()");
  // Native only: the step between spectral_lowpass_blend's FFTs (the Triton op's kernel).
  m.def(
      "spectral_lowpass_scale(Tensor(a0!) spectrum, SymInt height, SymInt width, float ratio, SymInt order, "
      "float alpha) -> ()");
}

#define HIFLOW_REGISTER_KERNELS(m)                                               \
  m.impl("reference_flow", &hiflow_native::reference_flow);                     \
  m.impl("spectral_lowpass_blend", &hiflow_native::spectral_lowpass_blend);     \
  m.impl("haar_lowpass_blend", &hiflow_native::haar_lowpass_blend);             \
  m.impl("guided_velocity", &hiflow_native::guided_velocity);                   \
  m.impl("spectral_lowpass_scale", &hiflow_native::spectral_lowpass_scale)

TORCH_LIBRARY_IMPL(hiflow_fast_native, CPU, m) { HIFLOW_REGISTER_KERNELS(m); }

#ifdef HIFLOW_NATIVE_WITH_CUDA
TORCH_LIBRARY_IMPL(hiflow_fast_native, CUDA, m) { HIFLOW_REGISTER_KERNELS(m); }
#endif

TORCH_LIBRARY_IMPL(hiflow_fast_native, Meta, m) {
  m.impl("reference_flow", &hiflow_native::reference_flow_meta);
  m.impl("spectral_lowpass_blend", &hiflow_native::spectral_lowpass_blend_meta);
  m.impl("haar_lowpass_blend", &hiflow_native::haar_lowpass_blend_meta);
  m.impl("guided_velocity", &hiflow_native::guided_velocity_meta);
  m.impl("spectral_lowpass_scale", &hiflow_native::spectral_lowpass_scale_meta);
}
