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

Log-sum-exp (STORE_LSE, for ring attention, which merges the partial outputs of K/V chunks by
it): after the last block, m is the row max of the base-2 scores and l = sum_j exp2(s_ij - m),
so sum_j exp(scale * q_i . k_j) = sum_j exp2(s_ij) = exp2(m) * l and the natural-log value is

    lse_i = ln(2) * (m + log2(l))        stored fp32 in lse[b, s, h]

(with S_k >= 1, l >= 1 and m is finite). A constexpr switch: without it the store is compiled
out and lse_ptr is an unused argument (`out` stands in); the default path's registers and shared
memory are unchanged (the compile matrix, `lse` column, compiles both variants).

The full K blocks run unmasked; the one partial block at the end (S not a multiple of BLOCK_N)
runs masked (-inf scores).

RoPE (`ids` given to the launcher): q and k are rotated once, before this kernel, by
qk_norm_rope's rotation-only mode (kernels/qk_norm_rope.py: float64 angles, one pass over q and
k, cos/sin once per token block for all heads) into two new buffers. Rotating tiles as they were
loaded, as this kernel used to, re-rotated every K tile once per query block (~500 times at 66k
tokens), doubled the K staging in shared memory and spilled 480-3600 bytes per thread on every
target; head dim 256 could not launch at all on sm_86/89 (see kernels/README.md, "Offline
compile matrix"). The pre-pass costs one read and write of q and k (O(S)) against the
attention's O(S^2), and two q-sized buffers.

Configs (GPU): autotuned among CANDIDATE_CONFIGS, pruned per target before compiling: shared
memory (`shared_bytes_needed`, an upper bound checked by the compile matrix in CI) against the
device's per-block limit, and on sm_80/86/89 no 64-row tiles at head dims >= 128 where a wider
tile fits (they spill there). None of the configs that can be selected for bf16 at head dim 128
spills on sm_80/86/89/90 (`hiflow-fast bench compile`; tests/test_compile_matrix.py checks it).
The autotuner's key holds the head dim, the dtype and the sequence length rounded up to a power
of two; its timings are cached on disk across processes.

Precision: scores and the softmax in fp32; on a GPU P is rounded to V's dtype for the P @ V
tensor-core product (as FlashAttention does); fp32 inputs use IEEE fp32 dots (no TF32).
Under the CPU interpreter (UPCAST) tiles are converted to fp32 right after loading, since the
interpreter's bf16 arithmetic is wrong.
"""

from __future__ import annotations

import functools
import math
import os

import triton
import triton.language as tl

from hiflow_fast.kernels.qk_norm_rope import fp32_split, launch_qk_norm_rope

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
# ln(2): turns the kernel's base-2 log-sum-exp into the natural-log one it stores.
LN2 = tl.constexpr(0.6931471805599453)
# CPU interpreter: ~0.5 ms per operation whatever the tile size, so tiles are as large as
# Triton allows (BLOCK_M x BLOCK_N <= 2^20 elements) and numpy does the work: 1024 x 1024.
INTERPRET_BLOCK = 1024


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
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_N: tl.constexpr,
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
    if UPCAST:
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


# seq_bucket only feeds the autotuner's key: never specialised on, so it costs no recompiles.
@triton.jit(do_not_specialize=["seq_bucket"])
def flash_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
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
    stride_lb,
    stride_ls,
    stride_lh,
    num_heads,
    seq_q,
    seq_k,
    seq_bucket,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    """Grid (cdiv(seq_q, BLOCK_M), B * H). qk_scale = softmax scale * log2(e). With STORE_LSE,
    also lse[b, s, h] (fp32, natural log; `lse_ptr` and its strides are ignored without it)."""
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
    if UPCAST:
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
            HEAD_DIM,
            BLOCK_D,
            False,
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
            HEAD_DIM,
            BLOCK_D,
            True,
            UPCAST,
            INPUT_PRECISION,
        )
    out = acc / l_i[:, None]
    out_ptrs = out_ptr + b * stride_ob + h * stride_oh + row0 * stride_os + rows[:, None] * stride_os + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    if STORE_LSE:
        # Base-2 running max and sum -> natural log (see the module docstring).
        lse = (m_i + tl.math.log2(l_i)) * LN2
        lse_ptrs = lse_ptr + b * stride_lb + h * stride_lh + (row0 + rows) * stride_ls
        tl.store(lse_ptrs, lse, mask=mask_m)


# ---- configs: chosen per architecture, pruned before anything is compiled ----------------------
#
# (BLOCK_M, BLOCK_N, num_warps, num_stages). The candidates for every target; `launchable_configs`
# keeps, for the current target, those whose shared memory fits and whose layout does not spill.
# Measured with `hiflow-fast bench compile` (bf16, head dim 128; shared KiB / registers / spill
# bytes per thread; kernels/README.md has the whole table):
#   128x64 w8 s3   sm_80/86/89: 96/255/0       sm_90: 128/174/0
#   128x128 w8 s2  sm_80/86/89: 96/255/32      sm_90: 160/250/0
#   64x64 w4 s3    sm_80/86/89: 88/255/128-164 sm_90: 112/164/0
# On sm_80/86/89 (mma.sync) a 64-row tile with 4 warps at head dim >= 128 is laid out with the
# warps along the head dimension (warpsPerCTA [1, 4]): every warp holds all 64 rows of the
# accumulator, so it spills and the row max/sum become cross-warp reductions; 128 x 128 tiles
# spill too. There only 128 x 64 tiles with 8 warps (warps split the rows) are kept, and 64-row
# tiles only where nothing else fits (head dim 256). On sm_90 (wgmma) every candidate is clean.
CANDIDATE_CONFIGS = (
    (128, 64, 8, 3),
    (128, 64, 8, 2),
    (128, 128, 8, 2),
    (64, 64, 4, 3),
    (64, 128, 4, 3),
    (64, 64, 8, 2),
    (64, 32, 4, 2),
    (32, 32, 4, 2),
)
# The smallest tile: at head dim 256 (the only config with no spills there on sm_80/86/89) and
# wherever no larger candidate fits. (fp32 at head dim 256 fits nothing in 99 KiB: refused.)
SMALL_CONFIG = (32, 32, 4, 2)
# Per-block shared memory (opt-in maximum, bytes) by compute capability, for targets that cannot
# be asked (an offline compile); a real device reports its own. Unknown: the smallest (sm_86/89).
SHARED_LIMIT_BY_CC = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
SMALLEST_SHARED_LIMIT = 101_376


def shared_bytes_needed(block_m: int, block_n: int, block_d: int, itemsize: int, num_stages: int, cc: int) -> int:
    """Shared memory a config may need, an upper bound of what the compiler allocates, known
    before compiling: the software pipeline keeps `num_stages` K and V tiles (BLOCK_N x BLOCK_D
    each); P (BLOCK_M x BLOCK_N) may go through shared memory on its way to the second dot; on
    sm_90 the wgmma reads Q from shared memory too. (The compiler often needs less, reusing
    buffers; the compile matrix checks the bound against every compiled config in CI.)"""
    needed = num_stages * 2 * block_n * block_d * itemsize + block_m * block_n * itemsize
    if cc >= 90:
        needed += block_m * block_d * itemsize
    return needed


def _current_target() -> tuple[int, int] | None:
    """(compute capability as 86, per-block shared memory limit) of the active Triton driver;
    None where Triton has no GPU driver at all (fake CUDA tensors traced on a machine without a
    GPU, as torch.compile's export does): there is no device to check against there."""
    from triton.runtime import driver

    try:
        active = driver.active
    except RuntimeError:  # "0 active drivers": no GPU backend on this machine
        return None
    return _target_of(active, active.get_current_device())


@functools.lru_cache(maxsize=None)
def _target_of(active, device) -> tuple[int, int]:
    cc = active.get_current_target().arch
    try:
        limit = active.utils.get_device_properties(device)["max_shared_mem"]
    except AttributeError:  # a driver with no device behind it (bench/offline_compile.py)
        limit = SHARED_LIMIT_BY_CC.get(cc, SMALLEST_SHARED_LIMIT)
    return cc, limit


def launchable_configs(block_d: int, itemsize: int, cc: int, shared_limit: int) -> list[tuple[int, int, int, int]]:
    """The candidates that fit `shared_limit` and do not spill (where some config does not) at
    this padded head dim on sm_`cc`; [] when not even SMALL_CONFIG fits."""

    def fits(c):
        bm, bn, _, stages = c
        return shared_bytes_needed(bm, bn, block_d, itemsize, stages, cc) <= shared_limit

    # Register budget: the fp32 accumulator is BLOCK_M x BLOCK_D and the K/V tiles
    # BLOCK_N x BLOCK_D. Tiles above 128 x 128 elements spill on sm_80/86/89; on sm_90 (wgmma,
    # operands from shared memory) a 128 x 256 accumulator still does not (head dim 256, 128 x 64
    # tiles: 255 registers, no spills), a 128 x 256 K/V tile does (408 bytes).
    max_acc = 128 * 256 if cc >= 90 else 128 * 128
    kept = [
        c
        for c in CANDIDATE_CONFIGS
        if c != SMALL_CONFIG and fits(c) and c[0] * block_d <= max_acc and c[1] * block_d <= 128 * 128
    ]
    if cc < 90 and block_d >= 128:
        # Warps must split rows (see above), and 128 x 128 tiles spill there: 128 x 64, 8 warps.
        wide = [c for c in kept if c[0] >= 128 and c[1] * block_d <= 64 * 128]
        kept = wide or kept
    if (block_d >= 256 or not kept) and fits(SMALL_CONFIG):
        kept.append(SMALL_CONFIG)
    return kept


def _as_config(c) -> triton.Config:
    bm, bn, warps, stages = c
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _prune_configs(configs, named_args, **kwargs):
    """Autotuner pruning, before anything is compiled: the configs of `launchable_configs` for
    the current device (the wrapper has refused inputs with none)."""
    target = _current_target()
    if target is None:  # traced without a GPU: nothing to prune against (nothing will launch here)
        return configs
    cc, limit = target
    itemsize = named_args["q_ptr"].element_size()
    keep = {str(_as_config(c)) for c in launchable_configs(kwargs["BLOCK_D"], itemsize, cc, limit)}
    return [c for c in configs if str(c) in keep]


flash_attention_kernel_autotuned = (
    None
    if INTERPRET
    else triton.autotune(
        configs=[_as_config(c) for c in CANDIDATE_CONFIGS],
        # seq_bucket: the next power of two of the sequence length, so the 2K stage's tuning
        # does not decide the 4K stage's config (and a few tokens more do not re-tune).
        # STORE_LSE: the log-sum-exp variant is tuned on its own (its lse_ptr is fp32 where the
        # plain one passes `out`, and the autotuner keys on argument dtypes anyway; said here).
        key=["HEAD_DIM", "INPUT_PRECISION", "seq_bucket", "STORE_LSE"],
        prune_configs_by={"early_config_prune": _prune_configs},
        # Timings kept across processes in Triton's cache dir (TRITON_CACHE_DIR, default
        # ~/.triton/cache), keyed by triton's version, the target, the kernel source, the key
        # and the configs: a new process at 66k tokens does not re-time every config.
        cache_results=True,
    )(flash_attention_kernel)
)


def check_launchable(head_dim: int, itemsize: int) -> None:
    """ValueError saying what does not fit when no config of this head dim and dtype fits the
    current GPU's shared memory (the op turns it into a HiFlowInputError before any work)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    target = _current_target()
    if target is None:
        return
    cc, limit = target
    if not launchable_configs(block_d, itemsize, cc, limit):
        bm, bn, _, stages = SMALL_CONFIG
        smallest = shared_bytes_needed(bm, bn, block_d, itemsize, stages, cc)
        raise ValueError(f"needs {smallest} bytes of shared memory per block, the GPU (sm_{cc}) has {limit}")


def rotate_qk(q, k, ids, axes_pairs, theta: float, *, launcher=None):
    """RoPE-rotated copies of q and k (same dtype; contiguous): one pass over both, the angles
    computed once per token block for every head (float64 angles, fp32 cos/sin)."""
    q_rot = q.new_empty(q.shape)
    k_rot = k.new_empty(k.shape)
    log_theta_hi, log_theta_lo = fp32_split(math.log(theta))
    launch_qk_norm_rope(q, k, q_rot, k_rot, None, None, None, None, ids, axes_pairs, log_theta_hi, log_theta_lo,
                        0.0, 0, apply_rope=True, apply_norm=False, launcher=launcher)
    return q_rot, k_rot


def launch_flash_attention(
    q,
    k,
    v,
    out,
    scale: float,
    ids=None,
    axes_pairs: tuple[int, int, int] = (0, 0, 0),
    theta: float = 10000.0,
    *,
    lse=None,
    launcher=None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> None:
    """Launch on [B, S, H, D] tensors (checked by the caller). Block sizes: given (with
    num_warps: 8 for 128-row tiles, else 4; and num_stages), else the interpreter's large
    tiles on CPU, else autotuned on the GPU among the configs that fit it. With `ids` (RoPE
    positions [S, n_axes], `axes_pairs` pairs per axis, `theta` with any NTK factor), q and k
    are first rotated once into new buffers by qk_norm_rope's rotation-only mode. With `lse`
    (fp32 [B, S_q, H], any strides), the kernel variant that also stores the row log-sum-exp."""
    if ids is not None:
        q, k = rotate_qk(q, k, ids, axes_pairs, theta, launcher=launcher)
    batch, seq_q, num_heads, head_dim = q.shape
    seq_k = k.shape[1]
    block_d = max(16, triton.next_power_of_2(head_dim))
    common = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        UPCAST=INTERPRET,
        # "ieee": no TF32 for fp32 inputs; fp16/bf16 dots ignore the setting ("tf32" is the default).
        INPUT_PRECISION="ieee" if q.dtype.itemsize == 4 else "tf32",
        STORE_LSE=lse is not None,
    )
    # Without lse the kernel never touches lse_ptr (the store is compiled out): `out` stands in.
    lse_arg, lse_strides = (lse, lse.stride()) if lse is not None else (out, (0, 0, 0))
    args = (
        q,
        k,
        v,
        out,
        lse_arg,
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
        *lse_strides,
        num_heads,
        seq_q,
        seq_k,
        triton.next_power_of_2(max(seq_q, seq_k)),
        scale * LOG2E,
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
        block_m = block_m or 128
        block_n = block_n or 64
        extra = {"num_warps": num_warps or (8 if block_m >= 128 else 4), "num_stages": num_stages}
    grid = (triton.cdiv(seq_q, block_m), batch * num_heads)
    wrap(flash_attention_kernel)[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, **common, **extra)
