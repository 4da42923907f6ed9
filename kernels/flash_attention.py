"""Tiled flash attention (forward, non-causal) for Flux's joint text + image sequence (Triton).

    out[b, s, h] = sum_t softmax_t(scale * <q[b, s, h], k[b, t, h]>) v[b, t, h]

q, k, v, out are [B, S, H, D] with unit stride on D (any other strides); any scale (HiFlow's
proportional attention passes sqrt(log_4608(N) / d)); head dims 16..256, padded to the next
power of two inside the kernel (masked loads); fp16/bf16 (fp32 for tests). One program owns
BLOCK_M query rows of one (batch, head) and streams K/V in BLOCK_N blocks with the online
softmax (Dao et al., FlashAttention-2; Triton tutorial 06):

    m_new = max(m, rowmax(s_ij))          s_ij = scale * log2(e) * q_i . k_j  (exp2 domain)
    p_ij  = exp2(s_ij - m_new)            alpha = exp2(m - m_new)
    l     = alpha * l + rowsum(p)         acc = alpha * acc + p @ v
    out   = acc / l

The full K blocks run unmasked; the one partial block at the end (S not a multiple of BLOCK_N)
runs masked (-inf scores).

Optional RoPE on load (HAS_ROPE): q and k tiles are rotated as they are loaded,
x*cos + rot(x)*sin with rot(x)[2i] = -x[2i+1], rot(x)[2i+1] = x[2i] (Flux's interleaved pairs),
angles = ids[s, axis(pair)] * theta^(-2j/dim) computed in fp32 with a two-constant reduction
to [-pi, pi] before cos/sin. Angle error ~ position x 1 ulp (about 3e-5 rad at 4K
positions): well below bf16 rounding, not fp32-exact -- for fp32 fidelity use
hiflow_fast::qk_norm_rope (float64 angles) and no RoPE here. K tiles are re-rotated for
every query block, so this trades a pass over q and k for extra ALU work per tile.

Precision: scores and the softmax in fp32; on a GPU P is rounded to V's dtype for the P @ V
tensor-core product (as FlashAttention does); fp32 inputs use IEEE fp32 dots (no TF32).
Under the CPU interpreter (UPCAST) tiles are converted to fp32 right after loading, since the
interpreter's bf16 arithmetic is wrong.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
# 2*pi split in two fp32 parts (Cody-Waite reduction): TWO_PI_HI = 6.28125 has 8 significant
# bits, so turns * TWO_PI_HI is exact in fp32 for |turns| < 2^16 (|angle| < 4e5 rad), and
# TWO_PI_LO = 2*pi - TWO_PI_HI carries the rest.
# (Module globals read inside @triton.jit functions must be tl.constexpr.)
TWO_PI_HI = tl.constexpr(6.28125)
TWO_PI_LO = tl.constexpr(0.0019353071795864769)
INV_TWO_PI = tl.constexpr(0.15915494309189535)

# CPU interpreter: ~0.5 ms per operation whatever the tile size, so tiles are as large as
# Triton allows (BLOCK_M x BLOCK_N <= 2^20 elements) and numpy does the work: 1024 x 1024.
INTERPRET_BLOCK = 1024


@triton.jit
def _rope_tile(
    x,
    x_pair,
    ids_ptr,
    stride_ids_s,
    stride_ids_a,
    offs_s,
    mask_s,
    offs_d,
    log2_theta,
    AXIS0_PAIRS: tl.constexpr,
    AXIS1_PAIRS: tl.constexpr,
    AXIS2_PAIRS: tl.constexpr,
    TRANSPOSED: tl.constexpr,
):
    """Rotate a tile x [rows, D] (or [D, rows] when TRANSPOSED) whose partner lanes
    (d xor 1) are x_pair, by the RoPE angles of tokens offs_s. fp32 result."""
    pair = offs_d // 2
    axis = (pair >= AXIS0_PAIRS).to(tl.int32) + (pair >= AXIS0_PAIRS + AXIS1_PAIRS).to(tl.int32)
    first = tl.where(axis == 0, 0, tl.where(axis == 1, AXIS0_PAIRS, AXIS0_PAIRS + AXIS1_PAIRS))
    dim = tl.where(axis == 0, 2 * AXIS0_PAIRS, tl.where(axis == 1, 2 * AXIS1_PAIRS, 2 * AXIS2_PAIRS))
    exponent = (2 * (pair - first)).to(tl.float32) / tl.maximum(dim, 1).to(tl.float32)
    inv_freq = tl.exp2(-exponent * log2_theta)
    sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    if TRANSPOSED:
        pos = tl.load(
            ids_ptr + offs_s[None, :] * stride_ids_s + axis[:, None] * stride_ids_a, mask=mask_s[None, :], other=0.0
        ).to(tl.float32)
        angle = pos * inv_freq[:, None]
        rot = x_pair.to(tl.float32) * sign[:, None]
    else:
        pos = tl.load(
            ids_ptr + offs_s[:, None] * stride_ids_s + axis[None, :] * stride_ids_a, mask=mask_s[:, None], other=0.0
        ).to(tl.float32)
        angle = pos * inv_freq[None, :]
        rot = x_pair.to(tl.float32) * sign[None, :]
    turns = tl.floor(angle * INV_TWO_PI + 0.5)
    reduced = (angle - turns * TWO_PI_HI) - turns * TWO_PI_LO
    return x.to(tl.float32) * tl.cos(reduced) + rot * tl.sin(reduced)


@triton.jit
def _attend_block(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_ks,
    stride_vs,
    start_n,
    seq_k,
    offs_n,
    offs_d,
    mask_d,
    qk_scale,
    ids_ptr,
    stride_ids_s,
    stride_ids_a,
    log2_theta,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    AXIS0_PAIRS: tl.constexpr,
    AXIS1_PAIRS: tl.constexpr,
    AXIS2_PAIRS: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One K/V block [start_n, start_n + BLOCK_N) folded into the running softmax state."""
    cols = start_n + offs_n
    if MASK_N:
        mask_n = cols < seq_k
        k_mask = mask_n[None, :] & mask_d[:, None]
        v_mask = mask_n[:, None] & mask_d[None, :]
    else:
        mask_n = cols >= 0
        k_mask = mask_d[:, None]
        v_mask = mask_d[None, :]
    # 32-bit offsets from the (batch, head) base: seq_k * stride < 2^31 for any Flux sequence
    # (66k tokens x 3 x 3072). Computed from the loop index, so no offset tile stays live
    # across iterations (hoisted loop-invariant tiles cost registers).
    # K^T tile [BLOCK_D, BLOCK_N].
    k_ptrs = k_base + cols[None, :] * stride_ks + offs_d[:, None]
    if HEAD_DIM == BLOCK_D and not MASK_N:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=k_mask, other=0.0)
    if HAS_ROPE:
        k_pair = tl.load(k_base + cols[None, :] * stride_ks + (offs_d ^ 1)[:, None], mask=k_mask, other=0.0)
        k_rot = _rope_tile(
            k,
            k_pair,
            ids_ptr,
            stride_ids_s,
            stride_ids_a,
            cols,
            mask_n,
            offs_d,
            log2_theta,
            AXIS0_PAIRS,
            AXIS1_PAIRS,
            AXIS2_PAIRS,
            True,
        )
        if UPCAST:
            k = k_rot
        else:
            k = k_rot.to(k.dtype)
    elif UPCAST:
        k = k.to(tl.float32)
    scores = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale
    if MASK_N:
        scores = tl.where(mask_n[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    p = tl.math.exp2(scores - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v_ptrs = v_base + cols[:, None] * stride_vs + offs_d[None, :]
    if HEAD_DIM == BLOCK_D and not MASK_N:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def flash_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    ids_ptr,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_os,
    stride_oh,
    stride_ids_s,
    stride_ids_a,
    num_heads,
    seq_q,
    seq_k,
    qk_scale,
    log2_theta,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    AXIS0_PAIRS: tl.constexpr,
    AXIS1_PAIRS: tl.constexpr,
    AXIS2_PAIRS: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Grid (cdiv(seq_q, BLOCK_M), B * H). qk_scale = softmax scale * log2(e)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seq_q
    mask_d = offs_d < HEAD_DIM
    rows = tl.arange(0, BLOCK_M)
    row0 = (pid_m * BLOCK_M).to(tl.int64)

    q_base = q_ptr + b * stride_qb + h * stride_qh + row0 * stride_qs
    q_ptrs = q_base + rows[:, None] * stride_qs + offs_d[None, :]
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    if HAS_ROPE:
        q_pair = tl.load(q_base + rows[:, None] * stride_qs + (offs_d ^ 1)[None, :], mask=q_mask, other=0.0)
        q_rot = _rope_tile(
            q,
            q_pair,
            ids_ptr,
            stride_ids_s,
            stride_ids_a,
            offs_m,
            mask_m,
            offs_d,
            log2_theta,
            AXIS0_PAIRS,
            AXIS1_PAIRS,
            AXIS2_PAIRS,
            False,
        )
        if UPCAST:
            q = q_rot
        else:
            q = q_rot.to(q.dtype)
    elif UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    n_full = (seq_k // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attend_block(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_ks,
            stride_vs,
            start_n,
            seq_k,
            offs_n,
            offs_d,
            mask_d,
            qk_scale,
            ids_ptr,
            stride_ids_s,
            stride_ids_a,
            log2_theta,
            HEAD_DIM,
            BLOCK_D,
            False,
            HAS_ROPE,
            AXIS0_PAIRS,
            AXIS1_PAIRS,
            AXIS2_PAIRS,
            UPCAST,
            INPUT_PRECISION,
        )
    if n_full < seq_k:
        acc, l_i, m_i = _attend_block(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_ks,
            stride_vs,
            n_full,
            seq_k,
            offs_n,
            offs_d,
            mask_d,
            qk_scale,
            ids_ptr,
            stride_ids_s,
            stride_ids_a,
            log2_theta,
            HEAD_DIM,
            BLOCK_D,
            True,
            HAS_ROPE,
            AXIS0_PAIRS,
            AXIS1_PAIRS,
            AXIS2_PAIRS,
            UPCAST,
            INPUT_PRECISION,
        )
    out = acc / l_i[:, None]
    out_ptrs = out_ptr + b * stride_ob + h * stride_oh + row0 * stride_os + rows[:, None] * stride_os + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def _gpu_configs() -> list:
    """A small search space. Checked with ptxas for sm_90 (bf16, pointers and strides 16-aligned
    as the JIT specialises them): none of these spills at head dim 64/128 (the 128x64 tile
    with 4 warps does), and the K/V loads are software-pipelined (cp.async)."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in (
            (128, 64, 8, 3),
            (128, 64, 8, 2),
            (128, 128, 8, 2),
            (64, 64, 4, 3),
            (64, 128, 4, 3),
            (64, 64, 8, 2),
            (64, 32, 4, 2),
        )
    ]


def _prune_configs(configs, named_args, **kwargs):
    # Register budget: the fp32 accumulator is BLOCK_M x BLOCK_D and the K/V tiles
    # BLOCK_N x BLOCK_D; tiles above 128 x 128 elements spill (head dim 256 keeps 64-row tiles).
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * block_d <= 128 * 128 and c.kwargs["BLOCK_N"] * block_d <= 128 * 128]
    return kept or [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)]


flash_attention_kernel_autotuned = (
    None
    if INTERPRET
    else triton.autotune(
        configs=_gpu_configs(),
        key=["HEAD_DIM", "HAS_ROPE", "INPUT_PRECISION"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(flash_attention_kernel)
)


def launch_flash_attention(
    q,
    k,
    v,
    out,
    scale: float,
    ids=None,
    axes_pairs: tuple[int, int, int] = (0, 0, 0),
    log2_theta: float = 0.0,
    *,
    launcher=None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> None:
    """Launch on [B, S, H, D] tensors (checked by the caller). Block sizes: given, else the
    interpreter's large tiles on CPU, else autotuned on the GPU."""
    batch, seq_q, num_heads, head_dim = q.shape
    seq_k = k.shape[1]
    block_d = max(16, triton.next_power_of_2(head_dim))
    has_rope = ids is not None
    common = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        HAS_ROPE=has_rope,
        AXIS0_PAIRS=axes_pairs[0],
        AXIS1_PAIRS=axes_pairs[1],
        AXIS2_PAIRS=axes_pairs[2],
        UPCAST=INTERPRET,
        # "ieee": no TF32 for fp32 inputs; fp16/bf16 dots ignore the setting ("tf32" is the default).
        INPUT_PRECISION="ieee" if q.dtype.itemsize == 4 else "tf32",
    )
    args = (
        q,
        k,
        v,
        out,
        ids if has_rope else q,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        ids.stride(0) if has_rope else 0,
        ids.stride(1) if has_rope else 0,
        num_heads,
        seq_q,
        seq_k,
        scale * LOG2E,
        log2_theta,
    )
    wrap = launcher if launcher is not None else (lambda kernel: kernel)
    if block_m is None and block_n is None and not INTERPRET:
        kernel = wrap(flash_attention_kernel_autotuned)

        def grid(meta):
            return (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * num_heads)

        kernel[grid](*args, **common)
        return
    if INTERPRET:
        block_m = block_m or min(INTERPRET_BLOCK, max(16, triton.next_power_of_2(seq_q)))
        block_n = block_n or min(INTERPRET_BLOCK, max(16, triton.next_power_of_2(seq_k)))
        extra = {}
    else:
        block_m = block_m or 64
        block_n = block_n or 64
        extra = {"num_warps": 4, "num_stages": 2}
    grid = (triton.cdiv(seq_q, block_m), batch * num_heads)
    wrap(flash_attention_kernel)[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, **common, **extra)
