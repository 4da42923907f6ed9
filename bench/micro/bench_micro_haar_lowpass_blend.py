"""hiflow_fast::haar_lowpass_blend vs its reference: alpha * 2x2 block means of the difference."""

import pytest

from hiflow_fast.backend import load_triton_ops
from hiflow_fast.ref.haar_blend import haar_lowpass

ALPHA = 0.7


@pytest.mark.parametrize("path", ["triton", "ref"])
def test_haar_lowpass_blend(benchmark, micro, latent_difference, path):
    diff = latent_difference  # conftest.LOWPASS_SHAPES: the swin-padded 4K latent on a GPU
    if path == "triton":
        ops = load_triton_ops()
        work = diff.clone()

        def fn():  # in place: each call filters the previous output, the same work every call
            ops.haar_lowpass_blend(work, ALPHA)

    else:

        def fn():
            return ALPHA * haar_lowpass(diff)

    # Reads and writes the difference once (fp32).
    batch, channels, *hw = diff.shape
    micro.run(benchmark, "haar_lowpass_blend", path, fn, nbytes=4 * 2 * diff.numel(), batch=batch, channels=channels, latent_hw=hw)
