"""hiflow_fast::spectral_lowpass_blend (kernels/spectral_lowpass_blend.py) and its native twin
hiflow_fast_native::spectral_lowpass_blend (csrc/): diff <- alpha * LP(diff) with the
Butterworth mask evaluated inside the kernel on the rfft2 spectrum. Every test runs on both
implementations (`guidance_ops`, conftest.py); the native mask step is reached through its own
op, hiflow_fast_native::spectral_lowpass_scale.

Oracles: the rfft-layout mask and low-pass of hiflow_fast.ref, the official two-FFT centred
blend (fftshift + complex FFT pairs, an independent formulation that checks the odd-size
symmetrisation), and the recorded golden masks. Runs through Triton's interpreter on a CPU."""

from __future__ import annotations

import pytest
import torch
import triton

from hiflow_fast.backend import load_triton_ops
from hiflow_fast.ref.butterworth import butterworth_lowpass_mask, butterworth_lowpass_mask_rfft
from hiflow_fast.ref.spectral_blend import spectral_lowpass, spectral_lowpass_blend_official

load_triton_ops()

from hiflow_fast.kernels.spectral_lowpass_blend import (  # noqa: E402  (after the interpreter is set up)
    BLOCK_SIZE,
    SLICES_PER_PROGRAM,
    spectral_lowpass_kernel,
)


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def kernel_mask(ops, height: int, width: int, ratio: float, order: int, alpha: float = 1.0, slices: int = 1) -> torch.Tensor:
    """The gain the kernel of `ops` applies to each rfft bin: run it on a spectrum of ones (re = im = 1)."""
    spectrum = torch.ones(slices, height, width // 2 + 1, 2)
    if ops is torch.ops.hiflow_fast_native:
        ops.spectral_lowpass_scale(spectrum, height, width, ratio, order, alpha)
    else:
        bins = height * (width // 2 + 1)
        grid = (triton.cdiv(bins, BLOCK_SIZE), triton.cdiv(slices, SLICES_PER_PROGRAM))
        spectral_lowpass_kernel[grid](
            spectrum, slices, height, width, 1.0 / ratio**2, alpha, ORDER=order, BLOCK=BLOCK_SIZE, SLICES=SLICES_PER_PROGRAM
        )
    assert torch.equal(spectrum[..., 0], spectrum[..., 1]), "real and imaginary parts scaled differently"
    return spectrum[..., 0]


@pytest.mark.parametrize("height, width", [(16, 16), (9, 12), (15, 7), (8, 5), (66, 66)])
@pytest.mark.parametrize("ratio, order", [(0.2, 4), (0.5, 2), (1.3, 1)])
def test_in_kernel_mask_equals_reference_rfft_mask(guidance_ops, height, width, ratio, order):
    got = kernel_mask(guidance_ops, height, width, ratio, order, slices=3)
    want = butterworth_lowpass_mask_rfft(height, width, ratio, order)
    for s in range(3):  # every slice gets the same mask (the mask is computed once per bin)
        torch.testing.assert_close(got[s], want, rtol=0, atol=2e-6)


def test_in_kernel_mask_matches_recorded_official_masks(guidance_ops, golden):
    """The official centred masks recorded by the golden run (full or reduced copy), moved to
    the unshifted rfft layout."""
    case, params, _ = golden
    seen = set()
    for k, stage in enumerate(case["stages"][1:]):
        ratio = params["filter_ratio"][k]
        for step in stage["steps"]:
            if "freq_filter" not in step:  # the reduced copy drops some unit tensors
                continue
            centred = step["freq_filter"]
            h, w = centred.shape
            unshifted = torch.fft.ifftshift(centred, dim=(-2, -1))[:, : w // 2 + 1]
            torch.testing.assert_close(kernel_mask(guidance_ops, h, w, ratio, 4)[0], unshifted, rtol=0, atol=2e-6)
            seen.add((h, w))
    assert {(66, 66), (64, 64), (130, 130)} <= seen  # padded and unpadded grids of both stages


SHAPES = [
    # (batch, channels, H, W): square, odd, non-square, padded-like
    (2, 3, 16, 16),
    (1, 4, 9, 12),
    (2, 2, 15, 7),
    (1, 16, 18, 18),
]


@pytest.mark.parametrize("batch, channels, height, width", SHAPES)
@pytest.mark.parametrize("ratio, alpha", [(0.2, 0.7), (0.45, 1.0)])
def test_lowpass_of_difference_matches_reference(guidance_ops, batch, channels, height, width, ratio, alpha):
    g = torch.Generator().manual_seed(height * 100 + width)
    diff = torch.randn(batch, channels, height, width, generator=g)
    want = alpha * spectral_lowpass(diff, ratio, 4)
    got = diff.clone()
    guidance_ops.spectral_lowpass_blend(got, ratio, 4, alpha)
    assert rel_l2(got, want) <= 1e-5


@pytest.mark.parametrize("batch, channels, height, width", SHAPES)
def test_blend_matches_official_two_fft_centred_blend(guidance_ops, batch, channels, height, width):
    """x0 + alpha * LP(ref - x0) == the official x0 + alpha * (LP(ref) - LP(x0)), where the
    official LP is Re(ifft2(ifftshift(M * fftshift(fft2(.))))) with the centred mask M. For odd
    sizes this is what checks that the kernel symmetrises M correctly."""
    g = torch.Generator().manual_seed(7 + height * width)
    x0 = torch.randn(batch, channels, height, width, generator=g)
    ref = torch.randn(batch, channels, height, width, generator=g)
    want = spectral_lowpass_blend_official(x0, ref, 0.6, 0.3, 4)
    diff = ref - x0
    guidance_ops.spectral_lowpass_blend(diff, 0.3, 4, 0.6)
    assert rel_l2(x0 + diff, want) <= 1e-5
    # The low-frequency part really moved (a test that cannot pass by returning x0).
    assert rel_l2(x0, want) > 1e-2


def test_zero_ratio_means_no_low_band(guidance_ops):
    diff = torch.randn(2, 2, 8, 10)
    guidance_ops.spectral_lowpass_blend(diff, 0.0, 4, 0.8)
    assert torch.equal(diff, torch.zeros_like(diff))
    assert torch.equal(butterworth_lowpass_mask(8, 10, 0.0), torch.zeros(8, 10))


def test_alpha_is_folded_in_linearly(guidance_ops):
    base = torch.randn(1, 3, 12, 10)
    half, full = base.clone(), base.clone()
    guidance_ops.spectral_lowpass_blend(half, 0.25, 4, 0.5)
    guidance_ops.spectral_lowpass_blend(full, 0.25, 4, 1.0)
    torch.testing.assert_close(half * 2, full, rtol=1e-5, atol=1e-6)
