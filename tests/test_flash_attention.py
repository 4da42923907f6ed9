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
from hiflow_fast.ops.flash_attention import RopeSpec, flash_attention
from hiflow_fast.ref.attention import attention, proportional_attention_scale
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


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(q=torch.zeros(1, 4, 2, 8)), "head_dim"),
        (dict(q=torch.zeros(1, 4, 2, 16, dtype=torch.float64)), "q.dtype"),
        (dict(v=torch.zeros(1, 5, 2, 16)), "v.shape"),
        (dict(k=torch.zeros(1, 4, 3, 16), v=torch.zeros(1, 4, 3, 16)), "k.shape"),
        (dict(q=torch.zeros(1, 4, 16)), "q.shape"),
        (dict(k=torch.zeros(1, 4, 2, 32)[..., ::2], v=torch.zeros(1, 4, 2, 16)), "k.stride(-1)"),
    ],
)
def test_bad_input_names_the_field(change, field):
    args = dict(q=torch.zeros(1, 4, 2, 16), k=torch.zeros(1, 4, 2, 16), v=torch.zeros(1, 4, 2, 16))
    args.update(change)
    args = {key: value.to(DEVICE) for key, value in args.items()}
    with pytest.raises(HiFlowInputError) as info:
        flash_attention(**args)
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
