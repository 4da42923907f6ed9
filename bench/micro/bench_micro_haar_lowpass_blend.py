"""hiflow_fast::haar_lowpass_blend vs its reference: alpha * 2x2 block means of the difference."""

import pytest
import torch

from hiflow_fast.backend import load_triton_ops
from hiflow_fast.ref.haar_blend import haar_lowpass

# (batch, channels, latent grid): the swin-padded 4K latent on a GPU.
SHAPES = {"tiny": (1, 4, (8, 10)), "cpu": (1, 16, (66, 66)), "flux": (1, 16, (514, 514))}
ALPHA = 0.7


@pytest.mark.parametrize("path", ["triton", "ref"])
def test_haar_lowpass_blend(benchmark, micro, size, path):
    batch, channels, hw = SHAPES[size]
    g = torch.Generator().manual_seed(0)
    diff = torch.randn(batch, channels, *hw, generator=g).to(micro.device)
    if path == "triton":
        ops = load_triton_ops()
        work = diff.clone()

        def fn():
            ops.haar_lowpass_blend(work, ALPHA)

    else:

        def fn():
            return ALPHA * haar_lowpass(diff)

    nbytes = 4 * 2 * diff.numel()  # reads and writes the difference once (fp32)
    micro.run(benchmark, "haar_lowpass_blend", path, fn, nbytes=nbytes, batch=batch, channels=channels, latent_hw=list(hw))
