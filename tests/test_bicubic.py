"""hiflow_fast.bicubic (the CPU reference upsampling) against F.interpolate(mode="bicubic")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hiflow_fast.bicubic import BandedResize, bicubic_matrix, bicubic_resize

# fp32 relative L2 against F.interpolate: the same weights, summed in another order (measured
# <= 6e-7; PyTorch's own fp32 kernel is ~1e-7 from float64).
TOL = 2e-6

CASES = [
    # (batch, channels, (h, w) in, (h, w) out)
    (1, 16, (64, 64), (128, 128)),  # HiFlow's 2x stage
    (2, 3, (6, 8), (10, 14)),  # tiny, non-square, batch 2, blocks overhang the output
    (1, 4, (13, 9), (26, 18)),  # odd sizes
    (2, 2, (7, 11), (31, 17)),  # ratios with periods 31 and 17
    (1, 4, (64, 48), (96, 72)),  # 1.5x: fp32 positions do not repeat, the dense path
    (1, 2, (258, 130), (514, 258)),  # swin-padded grids: ratios just off 2
    (1, 2, (129, 64), (200, 100)),
    (1, 2, (64, 48), (32, 24)),  # down
    (1, 2, (64, 64), (2, 3)),  # far down
    (1, 3, (5, 5), (9, 9)),
]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("batch, channels, size_in, size_out", CASES)
def test_resize_matches_interpolate(batch, channels, size_in, size_out):
    g = torch.Generator().manual_seed(size_in[0] * 1000 + size_out[1])
    x = torch.randn(batch, channels, *size_in, generator=g)
    want = F.interpolate(x, size=size_out, mode="bicubic", align_corners=False)
    got = bicubic_resize(x, size_out)
    assert got.shape == want.shape and got.dtype == torch.float32 and got.is_contiguous()
    assert rel_l2(got, want) <= TOL


def test_low_precision_input_is_resized_in_fp32():
    x = torch.randn(2, 4, 12, 10, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    want = F.interpolate(x.float(), size=(24, 20), mode="bicubic", align_corners=False)
    assert rel_l2(bicubic_resize(x, (24, 20)), want) <= TOL


def test_banded_plan_taken_for_two_x_and_equal_to_the_dense_matrix():
    """The 2x stages take the banded product; its blocks rebuild the dense matrix exactly."""
    n_in, n_out = 40, 80
    plan = BandedResize.plan(n_in, n_out)
    assert plan is not None and plan.rows % 2 == 0
    dense = torch.zeros(plan.blocks * plan.rows, n_in + plan.pad_before + plan.pad_after)
    for block in range(plan.blocks):
        first = plan.start + block * plan.stride
        dense[block * plan.rows:(block + 1) * plan.rows, first:first + plan.k] = plan.weight
    # Fold the replicate padding back onto the border inputs (what clamping does).
    folded = dense[:, plan.pad_before:plan.pad_before + n_in].clone()
    folded[:, 0] += dense[:, :plan.pad_before].sum(1)
    folded[:, -1] += dense[:, plan.pad_before + n_in:].sum(1)
    assert torch.allclose(folded[:n_out], bicubic_matrix(n_in, n_out), atol=1e-7)


def test_non_repeating_weights_fall_back_to_the_dense_matrix():
    assert BandedResize.plan(64, 96) is None  # 1.5x: fp32 source positions drift
    assert BandedResize.plan(3, 1000) is None  # period 1000 > the longest taken
    assert BandedResize.plan(2048, 2) is None  # downsampling: windows would span the input


def test_blocks_never_exceed_the_output():
    """Short outputs take short blocks: the windows stay within a few inputs of the image."""
    plan = BandedResize.plan(5, 10)
    assert plan is not None and plan.rows <= 10 and plan.pad_before + plan.pad_after <= 4
