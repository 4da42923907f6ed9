"""Fused q/k RMSNorm + NTK-scaled rotary embedding for Flux attention (Triton).

One launch normalises and rotates both q and k of one attention call, reading each element
once and writing it once, in the [B, S, H, D] layout the attention kernels take. No cos/sin
tables and no fp32 copies of q and k exist: the angles are computed in the kernel from the
position ids, once per token block, and reused for every head of q and of k.

Math, for token s (of S = n_txt text tokens followed by image tokens), head h, pair i < D/2::

    r(s, h)   = 1 / sqrt(mean_d x[s, h, d]^2 + eps)                           (fp32)
    y[d]      = x[d] * r * w[d]            w = text weight for s < n_txt, image weight else
    axis(i)   = the position axis pair i belongs to (axes_dim = (16, 56, 56) for FLUX.1-dev,
                pairs 0..7 -> axis 0, 8..35 -> axis 1, 36..63 -> axis 2); j = i - first pair
                of that axis; dim = axes_dim[axis]
    angle     = ids[s, axis] * theta^(-2 j / dim)       theta = rope theta * ntk_factor
    out[2i]   = y[2i] cos(angle) - y[2i+1] sin(angle)
    out[2i+1] = y[2i+1] cos(angle) + y[2i] sin(angle)

Precision: as in diffusers' Flux RoPE the angles are float64 (frequency theta^(-2j/dim) and
position x frequency), reduced to [-pi, pi] in float64; cos/sin of the reduced angle are then
taken in fp32 (libdevice __nv_cosf/__nv_sinf on NVIDIA; numpy in the interpreter). The tables
come out within ~2e-7 of diffusers' float64 tables rounded to fp32 (fp32 angles would be off by
position x 1 ulp, ~3e-5 rad at 4K), while float64 cos/sin would cost most of the registers.
Everything else is fp32 and the result is rounded once to the output dtype (diffusers rounds
q and k to the model dtype after the norm, after the weight and after the rotation). theta
arrives as log(theta) split into two fp32 scalars, hi + lo, since Triton passes Python floats
as fp32: hi + lo recombined in float64 carries ~48 bits.

Norm-only mode (APPLY_ROPE=False) serves attention backends that rotate q/k themselves;
rotation-only mode (APPLY_NORM=False) is the RoPE pass of hiflow_fast::flash_attention(rope=...)
(kernels/flash_attention.py: rotating q and k once, before the attention kernel).
Output may alias the input (in place): every program reads its rows before writing them.
"""

from __future__ import annotations

import os
import struct

import triton
import triton.language as tl

# Tokens per program. On a GPU the cos/sin of 16 rows x 64 pairs stay in registers while the
# program loops over the heads (96 registers per thread at 4 warps, no spills: ptxas, sm_90;
# 32 rows take 168). The CPU interpreter pays ~0.5 ms per operation whatever the
# tile size, so it takes the whole sequence (up to 8192 tokens) in one program; Triton caps a
# block at 2^20 elements.
BLOCK_S_GPU = 16
BLOCK_S_INTERPRET_MAX = 8192
MAX_BLOCK_NUMEL = 1 << 20
NUM_WARPS = 4
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# 2*pi for the float64 range reduction, as hi + lo: both exact in fp32, so the sum is 2*pi to
# ~1e-15 even if a constant is materialised in fp32 on the way (module globals read by
# @triton.jit functions must be tl.constexpr). 1/(2*pi) only picks the nearest turn.
TWO_PI_HI = tl.constexpr(6.2831854820251465)
TWO_PI_LO = tl.constexpr(-1.7484555314695172e-07)
INV_TWO_PI = tl.constexpr(0.15915494309189535)


@triton.jit
def _rope_cos_sin(
    ids_ptr,
    stride_ids_s,
    stride_ids_a,
    offs_s,
    mask_s,
    offs_p,
    mask_p,
    log_theta_hi,
    log_theta_lo,
    AXIS0_PAIRS: tl.constexpr,
    AXIS1_PAIRS: tl.constexpr,
    AXIS2_PAIRS: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """cos, sin [BLOCK_S, BLOCK_P] (fp32, from float64 angles) for tokens offs_s, pairs offs_p."""
    axis = (offs_p >= AXIS0_PAIRS).to(tl.int32) + (offs_p >= AXIS0_PAIRS + AXIS1_PAIRS).to(tl.int32)
    first = tl.where(axis == 0, 0, tl.where(axis == 1, AXIS0_PAIRS, AXIS0_PAIRS + AXIS1_PAIRS))
    dim = tl.where(axis == 0, 2 * AXIS0_PAIRS, tl.where(axis == 1, 2 * AXIS1_PAIRS, 2 * AXIS2_PAIRS))
    # (2 j) / dim in float64, as torch.arange(0, dim, 2, dtype=float64) / dim.
    exponent = (2 * (offs_p - first)).to(tl.float64) / tl.maximum(dim, 1).to(tl.float64)
    # fp64 block + fp32 scalar promotes to fp64 (the interpreter passes Python floats as is).
    log_theta = (tl.zeros([BLOCK_P], tl.float64) + log_theta_hi) + log_theta_lo
    pos = tl.load(
        ids_ptr + offs_s[:, None] * stride_ids_s + axis[None, :] * stride_ids_a,
        mask=mask_s[:, None] & mask_p[None, :],
        other=0.0,
    ).to(tl.float64)
    inv_freq = tl.exp(-exponent * log_theta)
    angle = pos * inv_freq[None, :]
    # Reduce to [-pi, pi] in float64 (exact to ~1e-14 rad for any position here), then cos/sin
    # in fp32 of the reduced angle: within ~2e-7 of the float64 table values rounded to fp32,
    # at a fraction of the registers of float64 cos/sin.
    two_pi = tl.full([BLOCK_P], TWO_PI_HI, tl.float64) + TWO_PI_LO
    turns = tl.floor(angle * INV_TWO_PI + 0.5)
    reduced = (angle - turns * two_pi[None, :]).to(tl.float32)
    return tl.cos(reduced), tl.sin(reduced)


@triton.jit
def _norm_rope_rows(
    x_ptr,
    out_ptr,
    stride_xs,
    stride_os,
    offs_s,
    offs_p,
    mask,
    w_even,
    w_odd,
    cos,
    sin,
    eps,
    HEAD_DIM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    APPLY_ROPE: tl.constexpr,
    APPLY_NORM: tl.constexpr,
):
    """RMSNorm (+ rotation) of one head's rows [BLOCK_S, HEAD_DIM], as even/odd halves."""
    x_even_ptrs = x_ptr + offs_s[:, None] * stride_xs + 2 * offs_p[None, :]
    x_even = tl.load(x_even_ptrs, mask=mask, other=0.0).to(tl.float32)
    x_odd = tl.load(x_even_ptrs + 1, mask=mask, other=0.0).to(tl.float32)
    if APPLY_NORM:
        mean_sq = tl.sum(x_even * x_even + x_odd * x_odd, axis=1) / HEAD_DIM
        rstd = 1.0 / tl.sqrt_rn(mean_sq + eps)
        y_even = x_even * rstd[:, None]
        y_odd = x_odd * rstd[:, None]
    else:
        y_even = x_even
        y_odd = x_odd
    if HAS_WEIGHT:
        y_even = y_even * w_even
        y_odd = y_odd * w_odd
    if APPLY_ROPE:
        out_even = y_even * cos - y_odd * sin
        out_odd = y_odd * cos + y_even * sin
    else:
        out_even = y_even
        out_odd = y_odd
    out_even_ptrs = out_ptr + offs_s[:, None] * stride_os + 2 * offs_p[None, :]
    tl.store(out_even_ptrs, out_even.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_even_ptrs + 1, out_odd.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_weight_pairs(w_ptr, w_txt_ptr, offs_p, mask_p, is_txt, HAS_WEIGHT: tl.constexpr):
    """Per-token weights [BLOCK_S, BLOCK_P] for even and odd lanes (text rows: w_txt)."""
    if HAS_WEIGHT:
        w_e = tl.load(w_ptr + 2 * offs_p, mask=mask_p, other=0.0).to(tl.float32)
        w_o = tl.load(w_ptr + 2 * offs_p + 1, mask=mask_p, other=0.0).to(tl.float32)
        t_e = tl.load(w_txt_ptr + 2 * offs_p, mask=mask_p, other=0.0).to(tl.float32)
        t_o = tl.load(w_txt_ptr + 2 * offs_p + 1, mask=mask_p, other=0.0).to(tl.float32)
        w_even = tl.where(is_txt[:, None], t_e[None, :], w_e[None, :])
        w_odd = tl.where(is_txt[:, None], t_o[None, :], w_o[None, :])
    else:
        w_even = tl.zeros([is_txt.shape[0], offs_p.shape[0]], tl.float32)
        w_odd = w_even
    return w_even, w_odd


@triton.jit
def qk_norm_rope_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    wq_ptr,
    wk_ptr,
    wq_txt_ptr,
    wk_txt_ptr,
    ids_ptr,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_qob,
    stride_qos,
    stride_qoh,
    stride_kob,
    stride_kos,
    stride_koh,
    stride_ids_s,
    stride_ids_a,
    seq_len,
    num_heads,
    n_txt,
    log_theta_hi,
    log_theta_lo,
    eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_S: tl.constexpr,
    AXIS0_PAIRS: tl.constexpr,
    AXIS1_PAIRS: tl.constexpr,
    AXIS2_PAIRS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    APPLY_ROPE: tl.constexpr,
    APPLY_NORM: tl.constexpr = True,
):
    """Grid (cdiv(S, BLOCK_S), B). One program: BLOCK_S tokens of one batch item, all heads of
    q and k. BLOCK_P = next power of two >= HEAD_DIM / 2 (rotated pairs, masked beyond)."""
    pid_s = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_p = tl.arange(0, BLOCK_P)
    mask_s = offs_s < seq_len
    mask_p = offs_p < HEAD_DIM // 2
    mask = mask_s[:, None] & mask_p[None, :]
    offs_s64 = offs_s.to(tl.int64)

    if APPLY_ROPE:
        cos, sin = _rope_cos_sin(
            ids_ptr,
            stride_ids_s,
            stride_ids_a,
            offs_s64,
            mask_s,
            offs_p,
            mask_p,
            log_theta_hi,
            log_theta_lo,
            AXIS0_PAIRS,
            AXIS1_PAIRS,
            AXIS2_PAIRS,
            BLOCK_P,
        )
    else:
        cos = tl.zeros([BLOCK_S, BLOCK_P], tl.float32)
        sin = cos
    is_txt = offs_s < n_txt
    wq_even, wq_odd = _load_weight_pairs(wq_ptr, wq_txt_ptr, offs_p, mask_p, is_txt, HAS_WEIGHT)
    wk_even, wk_odd = _load_weight_pairs(wk_ptr, wk_txt_ptr, offs_p, mask_p, is_txt, HAS_WEIGHT)

    q_base = q_ptr + pid_b * stride_qb
    k_base = k_ptr + pid_b * stride_kb
    qo_base = q_out_ptr + pid_b * stride_qob
    ko_base = k_out_ptr + pid_b * stride_kob
    for h in range(num_heads):
        _norm_rope_rows(
            q_base + h * stride_qh,
            qo_base + h * stride_qoh,
            stride_qs,
            stride_qos,
            offs_s64,
            offs_p,
            mask,
            wq_even,
            wq_odd,
            cos,
            sin,
            eps,
            HEAD_DIM,
            HAS_WEIGHT,
            APPLY_ROPE,
            APPLY_NORM,
        )
        _norm_rope_rows(
            k_base + h * stride_kh,
            ko_base + h * stride_koh,
            stride_ks,
            stride_kos,
            offs_s64,
            offs_p,
            mask,
            wk_even,
            wk_odd,
            cos,
            sin,
            eps,
            HEAD_DIM,
            HAS_WEIGHT,
            APPLY_ROPE,
            APPLY_NORM,
        )


def fp32_split(value: float) -> tuple[float, float]:
    """value = hi + lo with hi, lo representable in fp32 (Triton passes floats as fp32)."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, value - hi


def launch_qk_norm_rope(
    q,
    k,
    q_out,
    k_out,
    q_weight,
    k_weight,
    q_weight_txt,
    k_weight_txt,
    ids,
    axes_pairs: tuple[int, int, int],
    log_theta_hi: float,
    log_theta_lo: float,
    eps: float,
    n_txt: int,
    *,
    apply_rope: bool,
    apply_norm: bool = True,
    launcher=None,
    block_s: int | None = None,
) -> None:
    """Launch on [B, S, H, D] tensors with unit stride on D (checked by the caller).

    `launcher` wraps the kernel (torch.library.wrap_triton inside a triton_op); weights and ids
    may be None (no affine weight / norm only), in which case q stands in for the pointer."""
    batch, seq_len, num_heads, head_dim = q.shape
    block_p = triton.next_power_of_2(max(head_dim // 2, 1))
    if block_s is None:
        if INTERPRET:
            block_s = min(BLOCK_S_INTERPRET_MAX, max(16, triton.next_power_of_2(seq_len)), MAX_BLOCK_NUMEL // block_p)
        else:
            block_s = BLOCK_S_GPU
    has_weight = q_weight is not None
    kernel = launcher(qk_norm_rope_kernel) if launcher is not None else qk_norm_rope_kernel
    ids_arg = ids if ids is not None else q
    stride_ids = (ids.stride(0), ids.stride(1)) if ids is not None else (0, 0)
    grid = (triton.cdiv(seq_len, block_s), batch)
    kernel[grid](
        q,
        k,
        q_out,
        k_out,
        q_weight if has_weight else q,
        k_weight if has_weight else k,
        q_weight_txt if has_weight else q,
        k_weight_txt if has_weight else k,
        ids_arg,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        q_out.stride(0),
        q_out.stride(1),
        q_out.stride(2),
        k_out.stride(0),
        k_out.stride(1),
        k_out.stride(2),
        stride_ids[0],
        stride_ids[1],
        seq_len,
        num_heads,
        n_txt,
        log_theta_hi,
        log_theta_lo,
        eps,
        HEAD_DIM=head_dim,
        BLOCK_P=block_p,
        BLOCK_S=block_s,
        AXIS0_PAIRS=axes_pairs[0],
        AXIS1_PAIRS=axes_pairs[1],
        AXIS2_PAIRS=axes_pairs[2],
        HAS_WEIGHT=has_weight,
        APPLY_ROPE=apply_rope,
        APPLY_NORM=apply_norm,
        num_warps=NUM_WARPS,
    )
