"""hiflow_fast::flash_attention (kernels/flash_attention.py) against the fp32 reference.

Without CUDA the kernel runs through Triton's interpreter (TRITON_INTERPRET=1, conftest):
short sequences; explicit small blocks force several K/V blocks and partial tails.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hiflow_fast.errors import HiFlowInputError
from hiflow_fast.kernels.flash_attention import launch_flash_attention
from hiflow_fast.ops.flash_attention import RopeSpec, flash_attention, flash_attention_with_lse
from hiflow_fast.ref.attention import attention, attention_with_lse, proportional_attention_scale
from hiflow_fast.ref.rope import apply_rope, ntk_rope_cos_sin

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter turns loop bounds into numpy arrays; harmless, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def qkv(batch, seq_q, seq_k, heads, head_dim, seed, dtype=torch.float32, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads, head_dim, generator=gen) * spread
    k = torch.randn(batch, seq_k, heads, head_dim, generator=gen) * spread
    v = torch.randn(batch, seq_k, heads, head_dim, generator=gen)
    return (t.to(DEVICE, dtype) for t in (q, k, v))


def sdpa(q, k, v, scale):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


# (batch, seq_q, seq_k, heads, head_dim, block_m, block_n)
CASES = [
    (2, 77, 131, 3, 16, 32, 32),  # odd lengths, cross lengths, batch > 1, 5 K blocks + tail
    (1, 45, 45, 2, 24, 16, 16),  # non-power-of-2 head dim (padded to 32)
    (1, 33, 70, 2, 72, 16, 32),  # non-power-of-2 head dim (padded to 128)
    (1, 40, 64, 2, 128, 32, 64),  # FLUX.1-dev head, K exactly one block
    (1, 17, 23, 1, 256, 16, 16),  # the widest head
]


@pytest.mark.parametrize("batch,seq_q,seq_k,heads,head_dim,block_m,block_n", CASES)
def test_fp32_matches_reference_with_poisoned_output(batch, seq_q, seq_k, heads, head_dim, block_m, block_n):
    q, k, v = qkv(batch, seq_q, seq_k, heads, head_dim, seed=seq_q + head_dim)
    scale = proportional_attention_scale(seq_k, head_dim) * 1.7  # any scale
    out = torch.full_like(q, float("nan"))
    launch_flash_attention(q, k, v, out, scale, block_m=block_m, block_n=block_n)
    assert not out.isnan().any()
    assert rel_l2(out, attention(q, k, v, scale)) < 1e-5


def test_op_default_blocks_and_default_scale():
    q, k, v = qkv(2, 70, 70, 2, 16, seed=1)
    assert rel_l2(flash_attention(q, k, v), attention(q, k, v, 1 / math.sqrt(16))) < 1e-5


def test_strided_views_of_a_packed_qkv():
    gen = torch.Generator().manual_seed(4)
    packed = torch.randn(2, 50, 3, 2, 32, generator=gen).to(DEVICE)  # [B, S, 3, H, D]
    q, k, v = packed.unbind(2)
    assert not q.is_contiguous()
    assert rel_l2(flash_attention(q, k, v, 0.3), attention(q, k, v, 0.3)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_torch_error(dtype):
    q32, k32, v32 = qkv(2, 150, 150, 2, 64, seed=8, spread=1.5)
    q, k, v = q32.to(dtype), k32.to(dtype), v32.to(dtype)
    scale = proportional_attention_scale(150, 64)
    oracle = attention(q.float(), k.float(), v.float(), scale)
    got = flash_attention(q, k, v, scale)
    assert got.dtype == dtype
    assert rel_l2(got, oracle) <= 2 * rel_l2(sdpa(q, k, v, scale), oracle)


def _ids(seq_len, n_txt, max_pos, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(seq_len, 3)
    ids[n_txt:, 1:] = torch.randint(0, max_pos, (seq_len - n_txt, 2), generator=gen).float()
    return ids.to(DEVICE)


def test_rope_on_load_matches_rotating_first():
    """RoPE inside the op (a rotation pass, then attention) = rotate with the float64 tables,
    then attend; positions of a 2K grid (up to 130), NTK 2."""
    axes = (4, 6, 6)
    q, k, v = qkv(2, 61, 61, 2, 16, seed=12)
    ids = _ids(61, 5, 130, seed=12)
    cos, sin = ntk_rope_cos_sin(ids, axes, 10000.0, 2.0)
    want = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, 0.4)
    got = flash_attention(q, k, v, 0.4, rope=RopeSpec(ids, axes, 20000.0))
    # float64 angles, fp32 cos/sin and rotation.
    assert rel_l2(got, want) < 2e-5
    out = torch.full_like(q, float("nan"))
    launch_flash_attention(q, k, v, out, 0.4, ids, (2, 3, 3), 20000.0, block_m=16, block_n=16)
    assert rel_l2(out, want) < 2e-5


def test_compiled_fullgraph_equals_eager():
    q, k, v = qkv(1, 40, 40, 2, 16, seed=2)

    def fn(q, k, v):
        return flash_attention(q * 1.0, k, v, 0.3) + 1.0

    assert torch.equal(torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v), fn(q, k, v))


BAD_INPUTS = [
    (dict(q=torch.zeros(1, 4, 2, 8)), "head_dim"),
    (dict(q=torch.zeros(1, 4, 2, 16, dtype=torch.float64)), "q.dtype"),
    (dict(v=torch.zeros(1, 5, 2, 16)), "v.shape"),
    (dict(k=torch.zeros(1, 4, 3, 16), v=torch.zeros(1, 4, 3, 16)), "k.shape"),
    (dict(q=torch.zeros(1, 4, 16)), "q.shape"),
    (dict(k=torch.zeros(1, 4, 2, 32)[..., ::2], v=torch.zeros(1, 4, 2, 16)), "k.stride(-1)"),
]


@pytest.mark.parametrize("entry", [flash_attention, flash_attention_with_lse], ids=["out", "with_lse"])
@pytest.mark.parametrize("change,field", BAD_INPUTS)
def test_bad_input_names_the_field(change, field, entry):
    args = dict(q=torch.zeros(1, 4, 2, 16), k=torch.zeros(1, 4, 2, 16), v=torch.zeros(1, 4, 2, 16))
    args.update(change)
    args = {key: value.to(DEVICE) for key, value in args.items()}
    with pytest.raises(HiFlowInputError) as info:
        entry(**args)
    assert info.value.field == field


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    """Kernels compiled for the GPU never see a CPU tensor: a clear error, not a launch failure."""
    from hiflow_fast.ops import flash_attention as op_module

    monkeypatch.setattr(op_module, "INTERPRET", False)
    with pytest.raises(HiFlowInputError) as info:
        flash_attention(*(torch.zeros(1, 4, 2, 16) for _ in range(3)))
    assert info.value.field == "q.device"


def test_bad_rope_names_the_field():
    q = torch.zeros(1, 4, 2, 16, device=DEVICE)
    with pytest.raises(HiFlowInputError) as info:
        flash_attention(q, q, q, rope=RopeSpec(torch.zeros(4, 3, device=DEVICE), (4, 4, 4)))
    assert info.value.field == "rope.axes_dim"
    with pytest.raises(HiFlowInputError) as info:
        flash_attention(q, q, q, rope=RopeSpec(torch.zeros(5, 3, device=DEVICE), (4, 6, 6)))
    assert info.value.field == "rope.ids.shape"


# ---- the log-sum-exp variant (ring attention merges K/V chunks by it) --------------------------

# Per input dtype: relative L2 of `out` against the fp32 reference on the same (rounded) inputs
# (the output's own rounding: about eps / 3, eps = 2^-8 bf16, 2^-11 fp16, plus P rounded to V's
# dtype on a GPU), and the largest absolute lse error (fp32 in every case: only the summation
# order differs from the reference).
OUT_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
LSE_TOL = {torch.float32: 1e-5, torch.float16: 5e-5, torch.bfloat16: 5e-5}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def reference_with_lse(q, k, v, scale):
    """fp32 oracle on the (possibly rounded) inputs: out unrounded, lse [B, S_q, H]."""
    return attention_with_lse(q.float(), k.float(), v.float(), scale)


@pytest.mark.parametrize("dtype", list(OUT_TOL), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("head_dim", [16, 72, 128])
def test_lse_and_out_match_reference_odd_cross_lengths(dtype, head_dim):
    """Batch 2, S_q = 37 != S_k = 53, 3 heads; 16 x 16 blocks force 3 query blocks and 4 K/V
    blocks (the last one partial), so the lse goes through the running max's rescaling; lse
    written into a poisoned, non-contiguous [B, H, S] buffer seen as [B, S, H]."""
    q, k, v = qkv(2, 37, 53, 3, head_dim, seed=100 + head_dim, dtype=dtype, spread=1.5)
    scale = proportional_attention_scale(53, head_dim) * 1.7
    want_out, want_lse = reference_with_lse(q, k, v, scale)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((2, 3, 37), float("nan"), device=DEVICE).transpose(1, 2)
    launch_flash_attention(q, k, v, out, scale, lse=lse, block_m=16, block_n=16)
    assert not out.isnan().any() and not lse.isnan().any()
    assert rel_l2(out, want_out) < OUT_TOL[dtype]
    assert (lse - want_lse).abs().max().item() < LSE_TOL[dtype]
    # The op (the interpreter's single large block on CPU): the same within the same tolerances.
    got_out, got_lse = flash_attention_with_lse(q, k, v, scale)
    assert got_out.dtype == dtype and got_lse.dtype == torch.float32 and got_lse.shape == (2, 37, 3)
    assert rel_l2(got_out, want_out) < OUT_TOL[dtype]
    assert (got_lse - want_lse).abs().max().item() < LSE_TOL[dtype]


def test_lse_variant_leaves_out_unchanged():
    """Same blocks with and without STORE_LSE: bit-identical outputs (the store is an epilogue)."""
    q, k, v = qkv(2, 29, 41, 2, 32, seed=7, dtype=torch.bfloat16, spread=2.0)
    plain, with_lse = torch.empty_like(q), torch.empty_like(q)
    launch_flash_attention(q, k, v, plain, 0.3, block_m=16, block_n=16)
    launch_flash_attention(q, k, v, with_lse, 0.3, lse=torch.empty(2, 29, 2, device=DEVICE), block_m=16, block_n=16)
    assert torch.equal(plain, with_lse)


def ring_merge(parts):
    """diffusers' TemplatedRingAttention merge over K/V chunks, in fp32 (its convert_to_fp32)."""
    out, lse = None, None
    for part_out, part_lse in parts:
        part_out, part_lse = part_out.float(), part_lse.float()[..., None]
        if out is None:
            out, lse = part_out, part_lse
        else:
            out = out - torch.sigmoid(part_lse - lse) * (out - part_out)
            lse = lse - F.logsigmoid(lse - part_lse)
    return out, lse[..., 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("chunks", [(26, 27), (17, 19, 17)], ids=["halves", "thirds"])
def test_ring_merge_of_kv_chunks_equals_full_attention(chunks, dtype):
    """Attending to K/V chunk by chunk and merging by the lse (the ring formula) gives full
    attention over all 53 keys; scores up to ~50 (spread 3) so an lse off by the log base or
    by the max would show."""
    q, k, v = qkv(2, 37, sum(chunks), 3, 32, seed=21 + len(chunks), dtype=dtype, spread=3.0)
    scale = 0.35
    parts = [flash_attention_with_lse(q, k_part, v_part, scale)
             for k_part, v_part in zip(k.split(chunks, dim=1), v.split(chunks, dim=1))]
    merged_out, merged_lse = ring_merge(parts)
    want_out, want_lse = reference_with_lse(q, k, v, scale)
    # bf16: each chunk's output is rounded to bf16 before the merge (as on a ring).
    assert rel_l2(merged_out, want_out) < OUT_TOL[dtype]
    assert (merged_lse - want_lse).abs().max().item() < 2 * LSE_TOL[dtype]


def test_lse_op_compiled_fullgraph_equals_eager():
    q, k, v = qkv(1, 40, 24, 2, 16, seed=3)

    def fn(q, k, v):
        out, lse = flash_attention_with_lse(q * 1.0, k, v, 0.3)
        return out + 1.0, lse * 2.0

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    eager = fn(q, k, v)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))


def _selectable_configs(head_dim, dtype):
    from hiflow_fast.kernels.flash_attention import _current_target, launchable_configs

    cc, limit = _current_target()
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    return launchable_configs(block_d, torch.empty((), dtype=dtype).element_size(), cc, limit)


@pytest.mark.gpu
@pytest.mark.attention_configs
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("rope", [False, True], ids=["no_rope", "rope"])
def test_every_selectable_config_at_flux_shapes_within_twice_torch_bf16_error(head_dim, rope):
    """Every config the autotuner may pick on this GPU, forced one by one, at Flux's 1K joint
    sequence (512 text + 4096 image tokens, 24 heads), bf16, against the fp32 reference: the
    kernel's error is at most twice that of PyTorch's own bf16 attention."""
    seq, heads = 512 + 4096, 24
    q32, k32, v32 = qkv(1, seq, seq, heads, head_dim, seed=head_dim + rope, spread=1.5)
    q, k, v = (t.to(torch.bfloat16) for t in (q32, k32, v32))
    scale = proportional_attention_scale(seq, head_dim)
    pairs = (head_dim // 2 - 2 * (head_dim * 7 // 32), head_dim * 7 // 32, head_dim * 7 // 32)
    axes = tuple(2 * p for p in pairs)
    if rope:  # the oracle rotates in fp32 (float64 tables); PyTorch's bf16 run gets bf16 rotated q, k
        ids = _ids(seq, 512, 64, seed=3)
        cos, sin = ntk_rope_cos_sin(ids, axes, 10000.0, 1.0)
        q_rot, k_rot = apply_rope(q.float(), cos, sin), apply_rope(k.float(), cos, sin)
    else:
        ids, q_rot, k_rot = None, q.float(), k.float()
    oracle = attention(q_rot, k_rot, v.float(), scale)
    budget = 2 * rel_l2(sdpa(q_rot.to(torch.bfloat16), k_rot.to(torch.bfloat16), v, scale), oracle)
    configs = _selectable_configs(head_dim, torch.bfloat16)
    assert configs
    for block_m, block_n, warps, stages in configs:
        out = torch.full_like(q, float("nan"))
        launch_flash_attention(q, k, v, out, scale, ids, pairs, 10000.0, block_m=block_m, block_n=block_n,
                               num_warps=warps, num_stages=stages)
        err = rel_l2(out, oracle)
        assert err <= budget, f"config {block_m}x{block_n} w{warps} s{stages}: {err:.3g} > {budget:.3g}"


# lse at Flux shapes (scores in fp32 from bf16 inputs, summed in another order than the
# reference): far below any error of the log base (a factor ln 2) or of the running max (O(1)).
GPU_LSE_TOL = 1e-3


@pytest.mark.gpu
@pytest.mark.attention_configs
def test_lse_variant_every_selectable_config_and_ring_merge_at_flux_shapes():
    """The STORE_LSE variant as ring attention calls it (bf16, head dim 128, Flux's 1K joint
    sequence, 24 heads): every config the autotuner may pick, forced one by one, then the op
    (autotuned); out within twice PyTorch's own bf16 error, lse within GPU_LSE_TOL of the fp32
    reference; and two K/V halves merged by the ring formula equal full attention as closely."""
    seq, heads, head_dim = 512 + 4096, 24, 128
    q32, k32, v32 = qkv(1, seq, seq, heads, head_dim, seed=31, spread=1.5)
    q, k, v = (t.to(torch.bfloat16) for t in (q32, k32, v32))
    scale = proportional_attention_scale(seq, head_dim)
    oracle_out, oracle_lse = reference_with_lse(q, k, v, scale)
    budget = 2 * rel_l2(sdpa(q, k, v, scale), oracle_out)
    configs = _selectable_configs(head_dim, torch.bfloat16)
    assert configs
    for block_m, block_n, warps, stages in configs:
        out = torch.full_like(q, float("nan"))
        lse = torch.full((1, seq, heads), float("nan"), device=DEVICE)
        launch_flash_attention(q, k, v, out, scale, lse=lse, block_m=block_m, block_n=block_n,
                               num_warps=warps, num_stages=stages)
        where = f"config {block_m}x{block_n} w{warps} s{stages}"
        assert rel_l2(out, oracle_out) <= budget, where
        assert (lse - oracle_lse).abs().max().item() < GPU_LSE_TOL, where
    out, lse = flash_attention_with_lse(q, k, v, scale)
    assert rel_l2(out, oracle_out) <= budget
    assert (lse - oracle_lse).abs().max().item() < GPU_LSE_TOL
    half = seq // 2
    parts = [flash_attention_with_lse(q, k_part, v_part, scale)
             for k_part, v_part in zip(k.split(half, dim=1), v.split(half, dim=1))]
    merged_out, merged_lse = ring_merge(parts)
    assert rel_l2(merged_out, oracle_out) <= budget
    assert (merged_lse - oracle_lse).abs().max().item() < GPU_LSE_TOL


@pytest.mark.parametrize("cc,limit", [(80, 166_912), (86, 101_376), (89, 101_376), (90, 232_448)])
def test_configs_fit_every_target_and_the_flux_path_keeps_wide_tiles(cc, limit):
    """Pruning (before compiling): every config kept fits the target's shared memory by the
    bound that tests/test_compile_matrix.py checks against the compiler; fp16/bf16 at every
    head dim has one; on sm_80/86/89 bf16 at head dim 128 gets 128-row tiles only (the 64-row
    ones spill there)."""
    from hiflow_fast.kernels.flash_attention import launchable_configs, shared_bytes_needed

    for block_d in (16, 32, 64, 128, 256):
        for itemsize in (2, 4):
            kept = launchable_configs(block_d, itemsize, cc, limit)
            assert all(shared_bytes_needed(bm, bn, block_d, itemsize, s, cc) <= limit for bm, bn, _, s in kept)
            if itemsize == 2:
                assert kept, (block_d, itemsize)
    if cc < 90:
        assert {c[0] for c in launchable_configs(128, 2, cc, limit)} == {128}


def test_no_config_that_fits_is_refused_before_any_work(monkeypatch):
    """fp32 at head dim 256 fits no tile in 99 KiB (sm_86/89): ValueError from the kernel
    module, which the op turns into a HiFlowInputError naming head_dim/dtype."""
    from hiflow_fast.kernels import flash_attention as kernel_module

    monkeypatch.setattr(kernel_module, "_current_target", lambda: (86, 101_376))
    with pytest.raises(ValueError, match="shared memory"):
        kernel_module.check_launchable(256, 4)
    kernel_module.check_launchable(256, 2)
    kernel_module.check_launchable(128, 4)


def test_op_names_head_dim_and_dtype_when_no_config_fits(monkeypatch):
    from hiflow_fast.ops import flash_attention as op_module

    def no_fit(head_dim, itemsize):
        raise ValueError("needs 135168 bytes of shared memory per block, the GPU (sm_86) has 101376")

    monkeypatch.setattr(op_module, "INTERPRET", False)
    monkeypatch.setattr(op_module, "check_head_tensor", lambda *args, **kwargs: None)
    monkeypatch.setattr(op_module, "check_launchable", no_fit)
    q = torch.zeros(1, 4, 2, 256)
    with pytest.raises(HiFlowInputError) as info:
        flash_attention(q, q, q)
    assert info.value.field == "head_dim/dtype" and "sm_86" in str(info.value)
