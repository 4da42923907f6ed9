"""hiflow_fast::guided_velocity vs its reference: direction + acceleration + Euler step."""

import pytest
import torch

from hiflow_fast.backend import load_triton_ops
from hiflow_fast.latents import pack, unpack
from hiflow_fast.ref.guided_velocity import guided_velocity_update
from hiflow_fast.ref.reference_flow import latent_reference

# (batch, channels, latent grid, reference grid); the velocity state is on the latent grid.
SHAPES = {"tiny": (1, 4, (8, 10), (6, 6)), "cpu": (1, 16, (64, 64), (32, 32)), "flux": (1, 16, (512, 512), (256, 256))}
SIGMA, SIGMA_NEXT, BETA = 0.6, 0.55, 0.3
PREV_SEPARATE = 1  # hiflow_fast.ops.guidance_ops.PREV_SEPARATE: the state in v_prev / v_ref_prev


@pytest.mark.parametrize("path", ["triton", "ref"])
def test_guided_velocity(benchmark, micro, size, path):
    batch, channels, hw, ref_hw = SHAPES[size]
    g = torch.Generator().manual_seed(0)
    sample, pred_x0 = micro.packed(batch, hw, channels, g=g), micro.packed(batch, hw, channels, g=g)
    v_prev, v_ref_prev = micro.packed(batch, hw, channels, g=g), micro.packed(batch, hw, channels, g=g)
    ref_x0 = micro.packed(batch, ref_hw, channels, g=g)
    lowpass = torch.randn(batch, channels, *hw, generator=g).to(micro.device)
    if path == "triton":
        ops = load_triton_ops()
        x_next, v, v_ref = torch.empty_like(sample), torch.empty_like(sample), torch.empty_like(sample)

        def fn():
            ops.guided_velocity(
                sample, pred_x0, lowpass, ref_x0, v_prev, v_ref_prev, ref_hw[0], ref_hw[1], hw[0], hw[1], hw[0], hw[1],
                SIGMA, SIGMA_NEXT, BETA, PREV_SEPARATE, x_next, v, v_ref,
            )

    else:

        def fn():
            ref = latent_reference(ref_x0, ref_hw, hw)
            x0_guided = unpack(pred_x0, *hw) + lowpass
            outs = guided_velocity_update(
                unpack(sample, *hw), x0_guided, ref, SIGMA, SIGMA_NEXT, BETA, unpack(v_prev, *hw), unpack(v_ref_prev, *hw)
            )
            return tuple(pack(t) for t in outs)

    # Reads x, x0, the low-pass, both state tensors and the reference; writes x_next, v, v_ref.
    nbytes = 4 * (8 * sample.numel() + ref_x0.numel())
    micro.run(benchmark, "guided_velocity", path, fn, nbytes=nbytes, batch=batch, channels=channels, latent_hw=list(hw), ref_hw=list(ref_hw))
