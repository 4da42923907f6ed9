"""hiflow_fast::haar_lowpass_blend (kernels/haar_lowpass_blend.py) and its native twin
hiflow_fast_native::haar_lowpass_blend (csrc/): diff <- alpha * LPhaar(diff) in place, LPhaar the
level-1 Haar low-pass (2x2 block means; odd edges paired with themselves).

Oracles: hiflow_fast.ref.haar_blend, and for even sizes an independent reshape-mean. Every test
runs on both implementations (`guidance_ops`, conftest.py); Triton through its interpreter on a
CPU."""

from __future__ import annotations

import pytest
import torch

from hiflow_fast.backend import load_triton_ops
from hiflow_fast.ref.haar_blend import haar_lowpass, haar_lowpass_blend

load_triton_ops()


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


SHAPES = [
    # (batch, channels, H, W)
    (2, 3, 8, 10),  # even, non-square, batch 2
    (1, 4, 9, 12),  # odd height
    (2, 2, 15, 7),  # both odd
    (1, 16, 66, 66),  # a swin-padded latent grid
    (1, 1, 1, 5),  # a single (odd) row
]


@pytest.mark.parametrize("batch, channels, height, width", SHAPES)
def test_haar_lowpass_matches_reference(guidance_ops, batch, channels, height, width):
    g = torch.Generator().manual_seed(height * 31 + width)
    diff = torch.randn(batch, channels, height, width, generator=g)
    want = 0.7 * haar_lowpass(diff)
    got = diff.clone()
    guidance_ops.haar_lowpass_blend(got, 0.7)
    assert rel_l2(got, want) <= 1e-6


@pytest.mark.parametrize("batch, channels, height, width", [s for s in SHAPES if s[2] % 2 == 0 and s[3] % 2 == 0])
def test_haar_lowpass_is_the_2x2_block_mean(guidance_ops, batch, channels, height, width):
    """Independent oracle for even sizes: every 2x2 block replaced by its mean."""
    diff = torch.randn(batch, channels, height, width, dtype=torch.float64).float()
    blocks = diff.double().reshape(batch, channels, height // 2, 2, width // 2, 2).mean(dim=(3, 5), keepdim=True)
    want = blocks.expand(-1, -1, -1, 2, -1, 2).reshape(diff.shape)
    got = diff.clone()
    guidance_ops.haar_lowpass_blend(got, 1.0)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


def test_blend_of_difference_matches_reference_blend(guidance_ops):
    """x0 + op(ref - x0) == x0 + alpha * (LPhaar(ref) - LPhaar(x0)) (linearity)."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 10, 14, generator=g)
    ref = torch.randn(2, 4, 10, 14, generator=g)
    diff = ref - x0
    guidance_ops.haar_lowpass_blend(diff, 0.45)
    want = haar_lowpass_blend(x0, ref, 0.45)
    assert rel_l2(x0 + diff, want) <= 1e-6
    assert rel_l2(x0, want) > 1e-2  # the blend really changed x0


def test_odd_edge_rows_average_only_themselves(guidance_ops):
    """PyWavelets' symmetric extension: the last row of an odd height pairs with itself."""
    diff = torch.arange(3 * 4, dtype=torch.float32).reshape(1, 1, 3, 4)
    guidance_ops.haar_lowpass_blend(diff, 1.0)
    want = torch.tensor([[2.5, 2.5, 4.5, 4.5], [2.5, 2.5, 4.5, 4.5], [8.5, 8.5, 10.5, 10.5]])
    torch.testing.assert_close(diff[0, 0], want)
