"""hiflow_fast::spectral_lowpass_blend vs its reference: alpha * Butterworth low-pass of the difference."""

import pytest
import torch

from hiflow_fast.backend import load_triton_ops
from hiflow_fast.ref.spectral_blend import spectral_lowpass

# (batch, channels, latent grid): the swin-padded 4K latent on a GPU.
SHAPES = {"tiny": (1, 4, (8, 10)), "cpu": (1, 16, (66, 66)), "flux": (1, 16, (514, 514))}
RATIO, ORDER, ALPHA = 0.2, 4, 0.7


@pytest.mark.parametrize("path", ["triton", "ref"])
def test_spectral_lowpass_blend(benchmark, micro, size, path):
    batch, channels, hw = SHAPES[size]
    g = torch.Generator().manual_seed(0)
    diff = torch.randn(batch, channels, *hw, generator=g).to(micro.device)
    if path == "triton":
        ops = load_triton_ops()
        work = diff.clone()

        def fn():  # in place, so each call filters the previous output: same work every call
            ops.spectral_lowpass_blend(work, RATIO, ORDER, ALPHA)

    else:

        def fn():
            return ALPHA * spectral_lowpass(diff, RATIO, ORDER)

    # Reads and writes the difference once (fp32); the FFTs' own traffic is above the floor.
    nbytes = 4 * 2 * diff.numel()
    micro.run(benchmark, "spectral_lowpass_blend", path, fn, nbytes=nbytes, batch=batch, channels=channels, latent_hw=list(hw))
