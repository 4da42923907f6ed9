"""hiflow_fast::guided_velocity (kernels/guided_velocity.py) and its native twin
hiflow_fast_native::guided_velocity (csrc/): direction + acceleration + Euler in one pass, written
straight onto the next step's swin grid. Every test runs on both implementations
(`guidance_ops`, conftest.py).

Oracle: hiflow_fast.ref (bicubic reference, guided_velocity_update) on unpacked copies, with the
previous state moved onto the current grid and the outputs moved onto the next grid by the
explicit pad/crop copies of hiflow_fast.latents (VelocityState.to_grid). Runs through Triton's
interpreter on a CPU."""

from __future__ import annotations

import pytest
import torch

from hiflow_fast import latents as L
from hiflow_fast.backend import load_triton_ops
from hiflow_fast.guidance import VelocityState
from hiflow_fast.ref.guided_velocity import guided_velocity_update
from hiflow_fast.ref.reference_flow import latent_reference

load_triton_ops()
SIGMA, SIGMA_NEXT, BETA = 0.55, 0.41, 0.3


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def packed(b, hw, channels, dtype=torch.float32, *, g):
    return torch.randn(b, (hw[0] // 2) * (hw[1] // 2), 4 * channels, generator=g).to(dtype)


def move(t: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    return VelocityState(t, t, src).to_grid(dst).v


def oracle(sample, pred_x0, lowpass, ref_x0, state, hw, ref_hw, out_hw, dtype=torch.float32):
    """Outputs on out_hw computed by the reference in `dtype` (fp32, or fp64 as the truth)."""
    x = L.unpack(sample.to(dtype), *hw)
    x0_guided = L.unpack(pred_x0.to(dtype), *hw) + lowpass.to(dtype)
    ref = (
        latent_reference(ref_x0, ref_hw, hw)
        if dtype == torch.float32
        else torch.nn.functional.interpolate(L.unpack(ref_x0.to(dtype), *ref_hw), size=hw, mode="bicubic", align_corners=False)
    )
    v_prev = v_ref_prev = None
    if state is not None:
        moved = state.to_grid(hw)
        v_prev, v_ref_prev = L.unpack(moved.v.to(dtype), *hw), L.unpack(moved.v_ref.to(dtype), *hw)
    x_next, v, v_ref = guided_velocity_update(x.to(dtype), x0_guided, ref, SIGMA, SIGMA_NEXT, BETA, v_prev, v_ref_prev)
    if dtype != torch.float32:  # guided_velocity_update returns fp32; redo it in fp64
        denom = SIGMA + 1e-6
        v = (x - x0_guided) / denom
        v_ref = (x - ref) / denom
        if v_prev is not None:
            v = v + BETA * ((v_prev - v_ref_prev) - (v - v_ref))
        x_next = x + (SIGMA_NEXT - SIGMA) * v
    return tuple(move(L.pack(t), hw, out_hw) for t in (x_next, v, v_ref))


def run_op(ops, sample, pred_x0, lowpass, ref_x0, state, ref_hw, out_hw, *, in_place=False, out_dtype=None):
    b, _, features = sample.shape
    shape = (b, (out_hw[0] // 2) * (out_hw[1] // 2), features)
    x_next = torch.full(shape, float("nan"), dtype=out_dtype or sample.dtype, device=sample.device)  # poisoned
    if in_place:
        assert tuple(state.hw) == tuple(out_hw)
        v, v_ref = state.v.clone(), state.v_ref.clone()
        mode, v_prev, v_ref_prev, state_hw = 2, None, None, out_hw
    else:
        v, v_ref = (torch.full(shape, float("nan"), device=sample.device) for _ in range(2))
        if state is None:
            mode, v_prev, v_ref_prev, state_hw = 0, None, None, out_hw
        else:
            mode, v_prev, v_ref_prev, state_hw = 1, state.v, state.v_ref, state.hw
    ops.guided_velocity(
        sample, pred_x0, lowpass, ref_x0, v_prev, v_ref_prev,
        ref_hw[0], ref_hw[1], state_hw[0], state_hw[1], out_hw[0], out_hw[1],
        SIGMA, SIGMA_NEXT, BETA, mode, x_next, v, v_ref,
    )
    return x_next, v, v_ref


def make_case(batch, channels, hw, ref_hw, state_hw, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = packed(batch, hw, channels, dtype, g=g)
    pred_x0 = packed(batch, hw, channels, g=g)
    lowpass = 0.3 * torch.randn(batch, channels, *hw, generator=g)
    ref_x0 = packed(batch, ref_hw, channels, dtype, g=g)
    state = None
    if state_hw is not None:
        state = VelocityState(packed(batch, state_hw, channels, g=g), packed(batch, state_hw, channels, g=g), state_hw)
    return sample, pred_x0, lowpass, ref_x0, state


HW, REF_HW = (10, 14), (6, 8)
PAD, CROP = (12, 16), (8, 12)
GRIDS = [
    # (state grid or None, output grid): first step, same grid, swin pad / crop of the output,
    # and a state one pad / crop away from the current grid
    (None, HW),
    (None, PAD),
    (HW, HW),
    (HW, PAD),
    (HW, CROP),
    (PAD, HW),
    (CROP, HW),
    (PAD, CROP),
]


@pytest.mark.parametrize("state_hw, out_hw", GRIDS)
def test_guided_velocity_fp32_matches_reference(guidance_ops, state_hw, out_hw):
    case = make_case(2, 4, HW, REF_HW, state_hw, seed=GRIDS.index((state_hw, out_hw)))
    got = run_op(guidance_ops, *case, REF_HW, out_hw)
    want = oracle(*case, HW, REF_HW, out_hw)
    for name, g, w in zip(("x_next", "v", "v_ref"), got, want):
        assert not torch.isnan(g).any(), f"{name} has unwritten elements"
        assert rel_l2(g, w) <= 1e-5, name
    if out_hw[0] > HW[0]:  # the swin pad ring is exactly zero
        ring = L.unpack(got[0], *out_hw).clone()
        ring[..., 1:-1, 1:-1] = 0
        assert torch.count_nonzero(ring) == 0


@pytest.mark.parametrize("state_hw", [HW, PAD, CROP])
def test_guided_velocity_updates_state_in_place(guidance_ops, state_hw):
    """prev_mode 2: the state already on the output grid is read and overwritten in place."""
    case = make_case(1, 3, HW, REF_HW, state_hw, seed=11)
    got = run_op(guidance_ops, *case, REF_HW, state_hw, in_place=True)
    want = oracle(*case, HW, REF_HW, state_hw)
    for g, w in zip(got, want):
        assert rel_l2(g, w) <= 1e-5


def test_first_step_has_no_acceleration_term(guidance_ops):
    """With no state the result must differ from a step that has one (the term is really used)."""
    case = make_case(1, 2, HW, REF_HW, HW, seed=5)
    with_state = run_op(guidance_ops, *case, REF_HW, HW)[1]
    without = run_op(guidance_ops, *case[:4], None, REF_HW, HW)[1]
    assert rel_l2(with_state, without) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_guided_velocity_low_precision_inputs(guidance_ops, dtype):
    """bf16/fp16 latents: fp32 math inside, x_next rounded once to the dtype. Its error against
    the fp64 truth is at most 2x that of the same result computed by PyTorch and then rounded
    to the dtype (the unavoidable output rounding); v and v_ref stay fp32."""
    case = make_case(2, 4, HW, REF_HW, HW, dtype=dtype, seed=21)
    x_next, v, v_ref = run_op(guidance_ops, *case, REF_HW, PAD, out_dtype=dtype)
    assert x_next.dtype == dtype and v.dtype == torch.float32
    truth = oracle(*case, HW, REF_HW, PAD, dtype=torch.float64)
    torch_at_dtype = oracle(*case, HW, REF_HW, PAD)[0].to(dtype)
    assert rel_l2(x_next, truth[0]) <= 2 * rel_l2(torch_at_dtype, truth[0])
    assert rel_l2(v, truth[1]) <= 1e-5 and rel_l2(v_ref, truth[2]) <= 1e-5
