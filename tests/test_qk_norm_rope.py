"""hiflow_fast::qk_norm_rope (kernels/qk_norm_rope.py) against hiflow_fast.ref.qk_norm_rope.

On a machine without CUDA the kernel runs through Triton's interpreter (conftest sets
TRITON_INTERPRET=1): sequences stay short and the program count low.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hiflow_fast.errors import HiFlowInputError
from hiflow_fast.kernels.qk_norm_rope import fp32_split, launch_qk_norm_rope
from hiflow_fast.ops.qk_norm_rope import qk_norm_rope
from hiflow_fast.ref.qk_norm_rope import qk_norm_rope as qk_norm_rope_ref
from hiflow_fast.ref.rope import apply_rope, ntk_rope_cos_sin

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter turns loop bounds into numpy arrays; harmless, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_ids(seq_len: int, n_txt: int, max_pos: int, gen: torch.Generator) -> torch.Tensor:
    """Flux-like ids: text rows all zero, image rows (0, row, col) with random positions."""
    ids = torch.zeros(seq_len, 3)
    n_img = seq_len - n_txt
    ids[n_txt:, 1] = torch.randint(0, max_pos, (n_img,), generator=gen).float()
    ids[n_txt:, 2] = torch.randint(0, max_pos, (n_img,), generator=gen).float()
    return ids


def make_case(batch, seq_len, heads, head_dim, n_txt, max_pos=70, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, heads, head_dim, generator=gen) * 3
    k = torch.randn(batch, seq_len, heads, head_dim, generator=gen) * 3
    weights = [torch.rand(head_dim, generator=gen) + 0.5 for _ in range(4)]
    ids = make_ids(seq_len, n_txt, max_pos, gen)
    cast = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return cast(q), cast(k), [cast(w) for w in weights], ids.to(DEVICE)


# (batch, seq, heads, head_dim, axes_dim, n_txt)
SHAPES = [
    (2, 37, 3, 16, (4, 6, 6), 5),  # tiny Flux axes, odd sequence, batch > 1
    (1, 50, 2, 20, (4, 8, 8), 0),  # non-power-of-2 head dim (10 pairs in a block of 16)
    (1, 21, 2, 128, (16, 56, 56), 7),  # FLUX.1-dev head
    (3, 9, 1, 24, (24,), 0),  # one axis
]


@pytest.mark.parametrize("batch,seq_len,heads,head_dim,axes,n_txt", SHAPES)
def test_fp32_matches_reference(batch, seq_len, heads, head_dim, axes, n_txt):
    q, k, (wq, wk, wqt, wkt), ids = make_case(batch, seq_len, heads, head_dim, n_txt, seed=seq_len)
    ids = ids[:, : len(axes)].contiguous()
    got = qk_norm_rope(q, k, wq, wk, ids, axes, 10000.0, 3.0, 1e-6, q_weight_txt=wqt, k_weight_txt=wkt, n_txt=n_txt)
    want = qk_norm_rope_ref(q, k, wq, wk, ids, axes, 10000.0, 3.0, 1e-6, q_weight_txt=wqt, k_weight_txt=wkt, n_txt=n_txt)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert rel_l2(g, w) < 1e-6


def test_small_blocks_odd_tail_and_poisoned_outputs():
    """Several programs with a partial last block; NaN-poisoned outputs are fully written."""
    q, k, (wq, wk, wqt, wkt), ids = make_case(2, 45, 2, 16, 3, seed=7)
    q_out = torch.full_like(q, float("nan"))
    k_out = torch.full_like(k, float("nan"))
    hi, lo = fp32_split(torch.tensor(40000.0, dtype=torch.float64).log().item())
    launch_qk_norm_rope(q, k, q_out, k_out, wq, wk, wqt, wkt, ids, (2, 3, 3), hi, lo, 1e-6, 3, apply_rope=True, block_s=16)
    want = qk_norm_rope_ref(q, k, wq, wk, ids, (4, 6, 6), 10000.0, 4.0, 1e-6, q_weight_txt=wqt, k_weight_txt=wkt, n_txt=3)
    assert not q_out.isnan().any() and not k_out.isnan().any()
    assert rel_l2(q_out, want[0]) < 1e-6 and rel_l2(k_out, want[1]) < 1e-6


def test_positions_of_a_4k_grid_stay_fp32_exact():
    """Angles up to ~260 rad (a 4K token grid, NTK 4): the float64 in-kernel angles give the
    float64 tables of diffusers to fp32 rounding (fp32 angles would be ~1e-5 off)."""
    q, k, (wq, wk, _, _), ids = make_case(1, 64, 2, 16, 0, max_pos=258, seed=11)
    got = qk_norm_rope(q, k, wq, wk, ids, (4, 6, 6), 10000.0, 4.0)
    want = qk_norm_rope_ref(q, k, wq, wk, ids, (4, 6, 6), 10000.0, 4.0)
    assert (got[0] - want[0]).abs().max().item() < 2e-5 * want[0].abs().max().item()
    assert rel_l2(got[0], want[0]) < 1e-6


def test_norm_only_without_weights():
    q, k, _, _ = make_case(2, 19, 3, 32, 0, seed=3)
    got = qk_norm_rope(q, k, None, None, None, None, eps=1e-5)
    want = qk_norm_rope_ref(q, k, None, None, None, (), eps=1e-5)
    assert rel_l2(got[0], want[0]) < 1e-6 and rel_l2(got[1], want[1]) < 1e-6


def test_inplace_equals_out_of_place_and_strided_views():
    q, k, (wq, wk, wqt, wkt), ids = make_case(1, 33, 2, 16, 4, seed=5)
    out_of_place = qk_norm_rope(q, k, wq, wk, ids, (4, 6, 6), n_txt=4, q_weight_txt=wqt, k_weight_txt=wkt)
    # q and k as views into one packed [B, S, 2, H, D] buffer (non-contiguous, unit stride on D).
    packed = torch.stack([q, k], dim=2)
    qv, kv = packed[:, :, 0], packed[:, :, 1]
    result = qk_norm_rope(qv, kv, wq, wk, ids, (4, 6, 6), n_txt=4, q_weight_txt=wqt, k_weight_txt=wkt, inplace=True)
    assert result[0].data_ptr() == qv.data_ptr()
    assert torch.equal(packed[:, :, 0], out_of_place[0]) and torch.equal(packed[:, :, 1], out_of_place[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_torch_error(dtype):
    """Error against an fp32 oracle at most 2x that of the same math done by PyTorch at this
    dtype (diffusers' path: RMSNorm in the dtype, RoPE in fp32 rounded back)."""
    axes = (16, 56, 56)
    q32, k32, (wq, wk, _, _), ids = make_case(2, 40, 2, 128, 0, max_pos=130, seed=21)
    q, k = q32.to(dtype), k32.to(dtype)
    wq_h, wk_h = wq.to(dtype), wk.to(dtype)
    oracle = qk_norm_rope_ref(q.float(), k.float(), wq_h.float(), wk_h.float(), ids, axes, 10000.0, 2.0)
    got = qk_norm_rope(q, k, wq_h, wk_h, ids, axes, 10000.0, 2.0)
    cos, sin = ntk_rope_cos_sin(ids, axes, 10000.0, 2.0)
    torch_q = apply_rope(F.rms_norm(q, (128,), wq_h, 1e-6), cos, sin)
    torch_k = apply_rope(F.rms_norm(k, (128,), wk_h, 1e-6), cos, sin)
    for g, t, o in ((got[0], torch_q, oracle[0]), (got[1], torch_k, oracle[1])):
        assert g.dtype == dtype
        assert rel_l2(g, o) <= 2 * rel_l2(t, o)


def test_compiled_fullgraph_equals_eager():
    q, k, (wq, wk, wqt, wkt), ids = make_case(1, 24, 2, 16, 4, seed=9)

    def fn(q, k):
        q, k = q.clone(), k.clone()
        return qk_norm_rope(q, k, wq, wk, ids, (4, 6, 6), 10000.0, 2.0, q_weight_txt=wqt, k_weight_txt=wkt, n_txt=4, inplace=True)

    eager = fn(q, k)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(q=torch.zeros(1, 4, 2, 15), k=torch.zeros(1, 4, 2, 15)), "head_dim"),
        (dict(q=torch.zeros(1, 4, 2, 16, dtype=torch.int32)), "q.dtype"),
        (dict(k=torch.zeros(1, 5, 2, 16)), "k.shape"),
        (dict(axes_dim=(4, 6, 4)), "axes_dim"),
        (dict(ids=torch.zeros(5, 3)), "ids.shape"),
        (dict(n_txt=9), "n_txt"),
        (dict(q_weight=torch.ones(8)), "q_weight.shape"),
    ],
)
def test_bad_input_names_the_field(change, field):
    args = dict(
        q=torch.zeros(1, 4, 2, 16), k=torch.zeros(1, 4, 2, 16), q_weight=torch.ones(16), k_weight=torch.ones(16),
        ids=torch.zeros(4, 3), axes_dim=(4, 6, 6), n_txt=0,
    )
    args.update(change)
    args = {key: (value.to(DEVICE) if isinstance(value, torch.Tensor) else value) for key, value in args.items()}
    with pytest.raises(HiFlowInputError) as info:
        qk_norm_rope(**args)
    assert info.value.field == field


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    """Kernels compiled for the GPU never see a CPU tensor: a clear error, not a launch failure."""
    from hiflow_fast.ops import qk_norm_rope as op_module

    monkeypatch.setattr(op_module, "INTERPRET", False)
    with pytest.raises(HiFlowInputError) as info:
        qk_norm_rope(torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2, 16))
    assert info.value.field == "q.device"
