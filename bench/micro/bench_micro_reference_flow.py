"""hiflow_fast::reference_flow vs its reference: x0 = x - sigma v (packed) and bicubic(ref) - x0."""

import pytest
import torch

from hiflow_fast.backend import load_triton_ops
from hiflow_fast.latents import unpack
from hiflow_fast.ref.reference_flow import latent_reference

# (batch, channels, latent grid, reference grid): the 4K latent against the 2K reference on a GPU.
SHAPES = {"tiny": (1, 4, (8, 10), (6, 6)), "cpu": (1, 16, (64, 64), (32, 32)), "flux": (1, 16, (512, 512), (256, 256))}
SIGMA = 0.6


@pytest.mark.parametrize("path", ["triton", "ref"])
def test_reference_flow(benchmark, micro, size, path):
    batch, channels, hw, ref_hw = SHAPES[size]
    g = torch.Generator().manual_seed(0)
    sample, model_output = micro.packed(batch, hw, channels, g=g), micro.packed(batch, hw, channels, g=g)
    ref_x0 = micro.packed(batch, ref_hw, channels, g=g)
    if path == "triton":
        ops = load_triton_ops()
        pred_x0 = torch.empty_like(sample)
        diff = torch.empty(batch, channels, *hw, device=micro.device)

        def fn():
            ops.reference_flow(sample, model_output, ref_x0, ref_hw[0], ref_hw[1], SIGMA, pred_x0, diff)

    else:

        def fn():
            x0 = sample - SIGMA * model_output
            return x0, latent_reference(ref_x0, ref_hw, hw) - unpack(x0, *hw)

    # Reads x, v and the reference; writes x0 and the difference (all fp32).
    nbytes = 4 * (4 * sample.numel() + ref_x0.numel())
    micro.run(benchmark, "reference_flow", path, fn, nbytes=nbytes, batch=batch, channels=channels, latent_hw=list(hw), ref_hw=list(ref_hw))
