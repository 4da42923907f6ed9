"""Torch custom ops of the guidance step, each backed by one Triton kernel of kernels/.

    hiflow_fast::reference_flow         packed x, v, ref  -> x0 (packed), bicubic(ref) - x0 (unpacked)
    hiflow_fast::spectral_lowpass_blend diff <- alpha * LP_butterworth(diff)   (rfft2, kernel, irfft2)
    hiflow_fast::haar_lowpass_blend     diff <- alpha * LP_haar(diff)
    hiflow_fast::guided_velocity        x_next, v, v_ref on the output (swin) grid

Every op writes into preallocated outputs declared as mutated (`mutates_args`) and returns
nothing, so its fake (meta) implementation has nothing to compute. Registration and launch
(triton_op + wrap_triton on a GPU, opaque custom_op + direct launch under the interpreter) are
`hiflow_fast.ops.registration`'s. Shapes and dtypes are checked by the caller
(`hiflow_fast.guidance`), which raises HiFlowInputError; here only cheap structural asserts of
the internal contract would fit, and there are none on the hot path.
"""

from __future__ import annotations

import torch
import triton

from hiflow_fast.bicubic import BICUBIC_A
from hiflow_fast.kernels.guided_velocity import BLOCK_SIZE as VELOCITY_BLOCK
from hiflow_fast.kernels.guided_velocity import guided_velocity_kernel
from hiflow_fast.kernels.haar_lowpass_blend import BLOCK_SIZE as HAAR_BLOCK
from hiflow_fast.kernels.haar_lowpass_blend import haar_lowpass_kernel
from hiflow_fast.kernels.reference_flow import BLOCK_SIZE as REFERENCE_BLOCK
from hiflow_fast.kernels.reference_flow import reference_flow_kernel
from hiflow_fast.kernels.spectral_lowpass_blend import BLOCK_SIZE as SPECTRAL_BLOCK
from hiflow_fast.kernels.spectral_lowpass_blend import SLICES_PER_PROGRAM, spectral_lowpass_kernel
from hiflow_fast.ops.registration import is_interpreted, kernel_launcher, kernel_op, no_output
from hiflow_fast.ref.guided_velocity import VELOCITY_EPS  # the official 1e-6, defined once

# Whether the kernels were defined under TRITON_INTERPRET=1 (CPU), decided at their import.
INTERPRETED = is_interpreted(reference_flow_kernel)
_launch = kernel_launcher(INTERPRETED)

# Elements (bins, 2x2 blocks) per program under the interpreter: it runs programs one after the
# other, each op costing ~0.1 ms of Python dispatch whatever its size, so few large programs
# (numpy arrays of 2^17 elements) are much faster there. On a GPU each
# kernel's own BLOCK_SIZE (sized for occupancy) is used.
INTERPRETER_BLOCK = 2**17


def _block(n: int, gpu_block: int) -> int:
    """Work items per program for n items: the kernel's GPU block, or under the interpreter one
    power of two covering n (at most INTERPRETER_BLOCK)."""
    if INTERPRETED:
        return min(INTERPRETER_BLOCK, triton.next_power_of_2(n))
    return gpu_block


# prev_mode values of hiflow_fast::guided_velocity (see kernels/guided_velocity.py).
PREV_NONE = 0
PREV_SEPARATE = 1
PREV_IN_PLACE = 2


@kernel_op("hiflow_fast::reference_flow", mutates_args={"pred_x0", "diff"}, interpreted=INTERPRETED, fake=no_output)
def reference_flow(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    ref_x0: torch.Tensor,
    ref_height: int,
    ref_width: int,
    sigma: float,
    pred_x0: torch.Tensor,
    diff: torch.Tensor,
) -> None:
    """pred_x0 <- sample - sigma * model_output (packed, fp32); diff <- bicubic(ref) - x0
    ([B, C, h, w] fp32; its shape gives the current latent grid)."""
    b, c, h, w = diff.shape
    n = b * c * h * w
    block = _block(n, REFERENCE_BLOCK)
    _launch(reference_flow_kernel)[(triton.cdiv(n, block),)](
        sample,
        model_output,
        ref_x0,
        pred_x0,
        diff,
        n,
        c,
        h,
        w,
        ref_height,
        ref_width,
        ref_height / h,
        ref_width / w,
        sigma,
        A=BICUBIC_A,
        BLOCK=block,
    )


@kernel_op("hiflow_fast::spectral_lowpass_blend", mutates_args={"diff"}, interpreted=INTERPRETED, fake=no_output)
def spectral_lowpass_blend(diff: torch.Tensor, ratio: float, order: int, alpha: float) -> None:
    """diff <- alpha * LP(diff) over the last two dims, LP the official Butterworth low-pass
    (one real FFT pair; the mask is evaluated inside the kernel). diff: contiguous fp32."""
    h, w = diff.shape[-2], diff.shape[-1]
    slices = diff.numel() // (h * w)
    # The spectrum lives in a real (re, im) base buffer that the kernel mutates; the FFTs see it
    # through a complex view (so under torch.compile the kernel mutates a base, not a view).
    spectrum = torch.empty((*diff.shape[:-1], w // 2 + 1, 2), dtype=torch.float32, device=diff.device)
    torch.fft.rfft2(diff, dim=(-2, -1), out=torch.view_as_complex(spectrum))
    # ratio == 0 means "no low band": the mask is 0 everywhere (1 / ratio^2 would be inf and
    # d = 0 would give 0 * inf = NaN), so scale by 0 instead.
    no_band = ratio <= 0.0
    scale = 0.0 if no_band else alpha
    inv_ratio_sq = 1.0 if no_band else 1.0 / (ratio * ratio)
    bins = h * (w // 2 + 1)
    block = _block(bins, SPECTRAL_BLOCK)
    grid = (triton.cdiv(bins, block), triton.cdiv(slices, SLICES_PER_PROGRAM))
    _launch(spectral_lowpass_kernel)[grid](
        spectrum,
        slices,
        h,
        w,
        inv_ratio_sq,
        scale,
        ORDER=order,
        BLOCK=block,
        SLICES=SLICES_PER_PROGRAM,
    )
    torch.fft.irfft2(torch.view_as_complex(spectrum), s=(h, w), dim=(-2, -1), out=diff)


@kernel_op("hiflow_fast::haar_lowpass_blend", mutates_args={"diff"}, interpreted=INTERPRETED, fake=no_output)
def haar_lowpass_blend(diff: torch.Tensor, alpha: float) -> None:
    """diff <- alpha * LPhaar(diff) over the last two dims (2x2 block means). diff: contiguous fp32."""
    h, w = diff.shape[-2], diff.shape[-1]
    slices = diff.numel() // (h * w)
    n_blocks = slices * ((h + 1) // 2) * ((w + 1) // 2)
    block = _block(n_blocks, HAAR_BLOCK)
    _launch(haar_lowpass_kernel)[(triton.cdiv(n_blocks, block),)](diff, n_blocks, h, w, alpha, BLOCK=block)


@kernel_op("hiflow_fast::guided_velocity", mutates_args={"x_next", "v", "v_ref"}, interpreted=INTERPRETED, fake=no_output)
def guided_velocity(
    sample: torch.Tensor,
    pred_x0: torch.Tensor,
    lowpass: torch.Tensor,
    ref_x0: torch.Tensor,
    v_prev: torch.Tensor | None,
    v_ref_prev: torch.Tensor | None,
    ref_height: int,
    ref_width: int,
    state_height: int,
    state_width: int,
    out_height: int,
    out_width: int,
    sigma: float,
    sigma_next: float,
    beta: float,
    prev_mode: int,
    x_next: torch.Tensor,
    v: torch.Tensor,
    v_ref: torch.Tensor,
) -> None:
    """Direction + acceleration + Euler; outputs packed on the (out_height, out_width) grid.

    lowpass [B, C, h, w] (fp32, alpha * LP(ref - x0)) gives the current grid. prev_mode: 0 no
    state, 1 state in v_prev / v_ref_prev on (state_height, state_width), 2 state already in
    v / v_ref (on the output grid), updated in place."""
    b, c, h, w = lowpass.shape
    n = x_next.numel()
    # Unused state pointers still need a tensor argument; the kernel never reads them.
    v_prev_arg = v_prev if v_prev is not None else v
    v_ref_prev_arg = v_ref_prev if v_ref_prev is not None else v_ref
    block = _block(n, VELOCITY_BLOCK)
    _launch(guided_velocity_kernel)[(triton.cdiv(n, block),)](
        sample,
        pred_x0,
        lowpass,
        ref_x0,
        v_prev_arg,
        v_ref_prev_arg,
        x_next,
        v,
        v_ref,
        n,
        c,
        h,
        w,
        out_height,
        out_width,
        state_height,
        state_width,
        ref_height,
        ref_width,
        ref_height / h,
        ref_width / w,
        sigma,
        sigma_next,
        beta,
        EPS=VELOCITY_EPS,
        A=BICUBIC_A,
        PREV_MODE=prev_mode,
        BLOCK=block,
    )
