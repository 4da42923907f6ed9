"""hiflow_fast::reference_flow (kernels/reference_flow.py) and hiflow_fast_native::reference_flow
(csrc/) against the plain-PyTorch reference: x0 = x - sigma * v (packed) and bicubic(ref) - x0
(unpacked), bicubic = F.interpolate(bicubic, align_corners=False). Every test runs on both
implementations (the `guidance_ops` fixture of conftest.py); Triton through its interpreter on
a CPU."""

from __future__ import annotations

import pytest
import torch

from hiflow_fast.backend import load_triton_ops
from hiflow_fast.latents import pack, unpack
from hiflow_fast.ref.reference_flow import latent_reference

load_triton_ops()


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def packed(b: int, hw: tuple[int, int], channels: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, (hw[0] // 2) * (hw[1] // 2), 4 * channels, generator=g).to(dtype)


def run_kernel(ops, sample, model_output, ref_x0, hw, ref_hw, sigma):
    b, _, features = sample.shape
    pred_x0 = torch.full(sample.shape, float("nan"))  # poisoned: unwritten elements show
    diff = torch.full((b, features // 4, *hw), float("nan"))
    ops.reference_flow(sample, model_output, ref_x0, ref_hw[0], ref_hw[1], sigma, pred_x0, diff)
    return pred_x0, diff


def expected(sample, model_output, ref_x0, hw, ref_hw, sigma, dtype=torch.float32):
    """The reference (fp32: hiflow_fast.ref; fp64: the same formulas, the truth for
    low-precision comparisons)."""
    x0 = sample.to(dtype) - model_output.to(dtype) * sigma
    if dtype == torch.float32:
        ref = latent_reference(ref_x0, ref_hw, hw)
    else:
        ref = torch.nn.functional.interpolate(unpack(ref_x0.to(dtype), *ref_hw), size=hw, mode="bicubic", align_corners=False)
    return x0, ref - unpack(x0, *hw)


SHAPES = [
    # (batch, channels, current grid, reference grid)
    (2, 4, (10, 14), (6, 8)),  # non-square, non-integer scale, batch 2
    (1, 16, (12, 12), (6, 6)),  # exactly 2x (the unpadded cascade)
    (1, 3, (14, 10), (8, 6)),  # swin-padded current grid vs an unpadded reference
    (2, 2, (6, 10), (10, 14)),  # downsampling (scale > 1) still follows PyTorch's formula
    (1, 4, (8, 8), (8, 8)),  # identity resize
]


@pytest.mark.parametrize("batch, channels, hw, ref_hw", SHAPES)
def test_reference_flow_fp32_matches_reference(guidance_ops, batch, channels, hw, ref_hw):
    sample = packed(batch, hw, channels, seed=1)
    model_output = packed(batch, hw, channels, seed=2)
    ref_x0 = packed(batch, ref_hw, channels, seed=3)
    pred_x0, diff = run_kernel(guidance_ops, sample, model_output, ref_x0, hw, ref_hw, 0.62)
    want_x0, want_diff = expected(sample, model_output, ref_x0, hw, ref_hw, 0.62)
    assert not torch.isnan(pred_x0).any() and not torch.isnan(diff).any()
    assert rel_l2(pred_x0, want_x0) <= 1e-6
    assert rel_l2(diff, want_diff) <= 1e-5


def test_reference_flow_bicubic_borders_are_clamped(guidance_ops):
    """A reference that is constant except on its border: clamped taps (not zero padding) give a
    constant interior next to a border that follows the reference's edge values."""
    hw, ref_hw = (12, 12), (6, 6)
    ref = torch.ones(1, 1, *ref_hw)
    ref[..., 0, :] = 3.0
    ref_x0 = pack(ref.repeat(1, 2, 1, 1))
    zeros = torch.zeros(1, 36, 8)
    _, diff = run_kernel(guidance_ops, zeros, zeros, ref_x0, hw, ref_hw, 0.5)
    want = torch.nn.functional.interpolate(ref, size=hw, mode="bicubic", align_corners=False)
    torch.testing.assert_close(diff[:, :1], want, rtol=0, atol=2e-6)
    assert torch.allclose(diff[0, 0, -1], torch.ones(12), atol=1e-6)  # far from the hot edge


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_flow_low_precision_inputs_use_fp32_math(guidance_ops, dtype):
    hw, ref_hw = (10, 14), (6, 8)
    sample = packed(2, hw, 4, dtype, seed=4)
    model_output = packed(2, hw, 4, dtype, seed=5)
    ref_x0 = packed(2, ref_hw, 4, dtype, seed=6)
    pred_x0, diff = run_kernel(guidance_ops, sample, model_output, ref_x0, hw, ref_hw, 0.37)
    truth_x0, truth_diff = expected(sample, model_output, ref_x0, hw, ref_hw, 0.37, torch.float64)
    # The same math done in PyTorch at the input dtype: the error a low-precision path makes.
    x0_lp = sample - model_output * 0.37
    diff_lp = torch.nn.functional.interpolate(
        unpack(ref_x0, *ref_hw).float(), size=hw, mode="bicubic", align_corners=False
    ).to(dtype) - unpack(x0_lp, *hw)
    assert rel_l2(pred_x0, truth_x0) <= max(2 * rel_l2(x0_lp, truth_x0), 1e-6)
    assert rel_l2(diff, truth_diff) <= max(2 * rel_l2(diff_lp, truth_diff), 1e-6)
    # fp32 math inside: much closer than the low-precision path, not merely within 2x.
    assert rel_l2(diff, truth_diff) <= 1e-5
