"""hiflow_fast::spectral_lowpass_blend vs its reference: alpha * Butterworth low-pass of the difference."""

import pytest

from hiflow_fast.backend import load_triton_ops
from hiflow_fast.ref.spectral_blend import spectral_lowpass

RATIO, ORDER, ALPHA = 0.2, 4, 0.7


@pytest.mark.parametrize("path", ["triton", "ref"])
def test_spectral_lowpass_blend(benchmark, micro, latent_difference, path):
    diff = latent_difference  # conftest.LOWPASS_SHAPES: the swin-padded 4K latent on a GPU
    if path == "triton":
        ops = load_triton_ops()
        work = diff.clone()

        def fn():  # in place: each call filters the previous output, the same work every call
            ops.spectral_lowpass_blend(work, RATIO, ORDER, ALPHA)

    else:

        def fn():
            return ALPHA * spectral_lowpass(diff, RATIO, ORDER)

    # Reads and writes the difference once (fp32); the FFTs' own traffic is above the floor.
    batch, channels, *hw = diff.shape
    micro.run(benchmark, "spectral_lowpass_blend", path, fn, nbytes=4 * 2 * diff.numel(), batch=batch, channels=channels, latent_hw=hw)
