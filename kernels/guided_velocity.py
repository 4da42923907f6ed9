"""Direction + acceleration alignment and the Euler step, in one pass, written straight into the
next step's swin layout.

For every current-grid pixel (b, c, i, j), with x the latent, x0 = x - sigma * v_model (the
unguided estimate), lp = alpha * LP(ref - x0) (the low-passed difference, alpha folded in by the
blend kernel) and ref the bicubic reference (recomputed here from the small packed previous-stage
x0, which is cheaper than storing it):

    x0g   = x0 + lp
    v     = (x - x0g) / (sigma + 1e-6)              (the official epsilon, kept)
    v_ref = (x - ref) / (sigma + 1e-6)
    v    <- v + beta * ((v_prev - v_ref_prev) - (v - v_ref))        (only when a state exists)
    x'    = x + (sigma_next - sigma) * v

Outputs are packed on the *output* grid (oh, ow), which is the current grid or the current grid
swin-padded (+1 latent pixel per side) or cropped (-1 per side): output pixel (oi, oj) holds
current pixel (oi - shift, oj - shift), shift = (oh - h) / 2; pixels outside the current grid
(the pad ring) get zeros, exactly what the official F.pad of latents and states produces. The
previous state is read the same way from its own grid (sh, sw) (zero outside), so no pad or
crop copy is ever made.

PREV_MODE: 0 = no state (first step of a stage); 1 = state in separate tensors on grid
(sh, sw); 2 = state already in the output tensors (same grid as the output), updated in place:
every program reads exactly the elements it later writes, so there is no cross-program hazard.
"""

from __future__ import annotations

import triton
import triton.language as tl

from hiflow_fast.kernels.reference_flow import bicubic_from_packed, packed_offset

# Output elements per program, with the default 4 warps: 4 per thread. Chosen by register count
# (`hiflow-fast bench compile`, sm_86, PREV_MODE=1, the heaviest): BLOCK 1024 x 4 warps took 202
# registers per thread (2 blocks of 4 warps per SM: 8 warps to hide the bicubic gathers'
# latency); 512 x 4 warps takes 128 (4 blocks, 16 warps per SM), 256 x 4 warps 64. 512 keeps 4
# elements per thread (128-bit accesses) at >= 4 blocks per SM; to be confirmed by bench guidance
# on a GPU.
BLOCK_SIZE = 512

PREV_NONE = 0
PREV_SEPARATE = 1
PREV_IN_PLACE = 2


@triton.jit
def round_to_bfloat16(x):
    """Round fp32 to the nearest bfloat16 (ties to even), returned as fp32 whose low 16 bits are
    zero, so the following cast is exact. The GPU cast already rounds this way; Triton's CPU
    interpreter truncates, which doubles the rounding error. NaN passes through unchanged."""
    bits = x.to(tl.uint32, bitcast=True)
    # 0x7FFF + lowest kept bit: adds just under half an ulp, or exactly half on an odd mantissa.
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def guided_velocity_kernel(
    sample_ptr,  # [B, N, 4C] packed x_t on the current grid (any float dtype)
    pred_x0_ptr,  # [B, N, 4C] fp32 packed x0 on the current grid
    lowpass_ptr,  # [B, C, h, w] fp32: alpha * LP(ref - x0)
    ref_ptr,  # [B, N_ref, 4C] packed previous-stage x0
    v_prev_ptr,  # [B, N_state, 4C] fp32 (PREV_MODE 1)
    v_ref_prev_ptr,
    x_next_ptr,  # out: [B, N_out, 4C] packed on the output grid (model-output dtype)
    v_ptr,  # out: [B, N_out, 4C] fp32 (holds the previous state when PREV_MODE 2)
    v_ref_ptr,
    n_elements,  # B * N_out * 4C
    channels,
    height,  # current grid
    width,
    out_h,  # output grid
    out_w,
    state_h,  # grid of the previous state (PREV_MODE 1)
    state_w,
    ref_h,
    ref_w,
    scale_h,  # ref_h / height
    scale_w,
    sigma,
    sigma_next,
    beta,
    EPS: tl.constexpr,
    A: tl.constexpr,
    PREV_MODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n_elements
    features = 4 * channels
    out_tokens = (out_h // 2) * (out_w // 2)
    f = offs % features
    token = (offs // features) % out_tokens
    b = offs // (features * out_tokens)
    c = f // 4
    oi = 2 * (token // (out_w // 2)) + (f // 2) % 2
    oj = 2 * (token % (out_w // 2)) + f % 2
    # Current-grid pixel this output element holds (the swin pad / crop folded into indexing).
    i = oi - (out_h - height) // 2
    j = oj - (out_w - width) // 2
    inside = (i >= 0) & (i < height) & (j >= 0) & (j < width)
    m = in_range & inside
    i = tl.where(inside, i, 0)
    j = tl.where(inside, j, 0)

    p = packed_offset(b, c, i, j, width // 2, (height // 2) * (width // 2), features)
    x = tl.load(sample_ptr + p, mask=m, other=0.0).to(tl.float32)
    x0 = tl.load(pred_x0_ptr + p, mask=m, other=0.0).to(tl.float32)
    lp = tl.load(lowpass_ptr + ((b * channels + c) * height + i) * width + j, mask=m, other=0.0)
    ref = bicubic_from_packed(ref_ptr, b, c, i, j, ref_h, ref_w, scale_h, scale_w, features, m, A)

    inv_denom = 1.0 / (sigma + EPS)
    x0_guided = x0 + lp
    v = (x - x0_guided) * inv_denom
    v_ref = (x - ref) * inv_denom
    if PREV_MODE == 1:
        si = i + (state_h - height) // 2
        sj = j + (state_w - width) // 2
        in_state = (si >= 0) & (si < state_h) & (sj >= 0) & (sj < state_w)
        ms = m & in_state
        si = tl.where(in_state, si, 0)
        sj = tl.where(in_state, sj, 0)
        ps = packed_offset(b, c, si, sj, state_w // 2, (state_h // 2) * (state_w // 2), features)
        v_prev = tl.load(v_prev_ptr + ps, mask=ms, other=0.0).to(tl.float32)
        v_ref_prev = tl.load(v_ref_prev_ptr + ps, mask=ms, other=0.0).to(tl.float32)
        v = v + beta * ((v_prev - v_ref_prev) - (v - v_ref))
    if PREV_MODE == 2:
        v_prev = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float32)
        v_ref_prev = tl.load(v_ref_ptr + offs, mask=m, other=0.0).to(tl.float32)
        v = v + beta * ((v_prev - v_ref_prev) - (v - v_ref))
    x_next = x + (sigma_next - sigma) * v

    # The pad ring (inside == False) is zero in every output, as the official F.pad makes it.
    # (tl.where with a scalar, not tl.zeros_like: triton's standard-library @jit helpers only run
    # under the interpreter when triton itself was imported after TRITON_INTERPRET=1.)
    x_next = tl.where(inside, x_next, 0.0)
    v = tl.where(inside, v, 0.0)
    v_ref = tl.where(inside, v_ref, 0.0)
    if x_next_ptr.dtype.element_ty == tl.bfloat16:
        x_next = round_to_bfloat16(x_next)
    tl.store(x_next_ptr + offs, x_next.to(x_next_ptr.dtype.element_ty), mask=in_range)
    tl.store(v_ptr + offs, v, mask=in_range)
    tl.store(v_ref_ptr + offs, v_ref, mask=in_range)
