"""One HiFlow high-resolution guidance step and the per-stage velocity state.

The step takes the transformer's velocity for the current latents and returns the next
latents, with the three alignments of HiFlow applied:

1. x0 = x - sigma * v (the *unguided* estimate is returned: it is the next stage's reference);
2. direction: x0 <- x0 + alpha * LP(ref - x0), LP an FFT Butterworth or a Haar low-pass, ref
   the previous stage's x0 at this timestep upsampled to the current grid;
3. acceleration and the Euler step (see `hiflow_fast.ref.guided_velocity`).

Tensors at this interface are packed [B, N, 4C], as in the official pipeline. The backend
(`ref` or `triton`) is chosen once by `hiflow_fast.backend`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import latents as L
from .ref.guided_velocity import guided_velocity_update
from .ref.haar_blend import haar_lowpass_blend
from .ref.reference_flow import latent_reference
from .ref.spectral_blend import spectral_lowpass_blend


@dataclass
class VelocityState:
    """The acceleration-alignment state of a stage: the previous step's final velocity and
    reference velocity, packed at the grid they were computed on (None before the first step)."""

    v: torch.Tensor | None = None
    v_ref: torch.Tensor | None = None
    hw: tuple[int, int] | None = None

    def to_grid(self, hw: tuple[int, int]) -> "VelocityState":
        """Zero-pad or crop the state to the latent grid `hw` (swin patchify moves by 2)."""
        if self.v is None or self.hw == hw:
            return self
        h0, w0 = self.hw
        if (hw[0] - h0, hw[1] - w0) == (2, 2):
            move = L.swin_pad_packed
        elif (h0 - hw[0], w0 - hw[1]) == (2, 2):
            move = L.swin_crop_packed
        else:
            raise ValueError(f"velocity state on a {self.hw} grid cannot move to {hw}")
        return VelocityState(move(self.v, h0, w0), move(self.v_ref, h0, w0), hw)


@dataclass
class GuidanceStepOutput:
    prev_sample: torch.Tensor  # x_{t-1}, packed
    pred_x0: torch.Tensor  # the unguided x0 = x - sigma * v, packed: the next stage's reference
    state: VelocityState  # the state written by this step


def guidance_step_ref(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    ref_x0: torch.Tensor,
    *,
    hw: tuple[int, int],
    ref_hw: tuple[int, int],
    sigma: float,
    sigma_next: float,
    alpha: float,
    beta: float,
    structure_guidance: str = "fft",
    filter_ratio: float = 0.2,
    butterworth_order: int = 4,
    state: VelocityState | None = None,
) -> GuidanceStepOutput:
    """The reference HiFlow step (plain PyTorch, fp32 math)."""
    state = state or VelocityState()
    sample = sample.float()
    pred_x0 = sample - model_output.float() * sigma
    x = L.unpack(sample, *hw)
    x0 = L.unpack(pred_x0, *hw)
    ref = latent_reference(ref_x0, ref_hw, hw)
    if structure_guidance == "fft":
        x0_guided = spectral_lowpass_blend(x0, ref, alpha, filter_ratio, butterworth_order)
    elif structure_guidance == "dwt":
        x0_guided = haar_lowpass_blend(x0, ref, alpha)
    else:
        raise ValueError(f"structure_guidance={structure_guidance!r}: expected 'fft' or 'dwt'")
    prev = state.to_grid(hw) if state.v is not None else state
    v_prev = L.unpack(prev.v, *hw) if prev.v is not None else None
    v_ref_prev = L.unpack(prev.v_ref, *hw) if prev.v_ref is not None else None
    x_next, v, v_ref = guided_velocity_update(x, x0_guided, ref, sigma, sigma_next, beta, v_prev, v_ref_prev)
    return GuidanceStepOutput(
        prev_sample=L.pack(x_next).to(model_output.dtype),
        pred_x0=pred_x0,
        state=VelocityState(L.pack(v), L.pack(v_ref), tuple(hw)),
    )


def guidance_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    ref_x0: torch.Tensor,
    *,
    hw: tuple[int, int],
    ref_hw: tuple[int, int],
    sigma: float,
    sigma_next: float,
    alpha: float,
    beta: float,
    structure_guidance: str = "fft",
    filter_ratio: float = 0.2,
    butterworth_order: int = 4,
    state: VelocityState | None = None,
    backend: str | None = None,
) -> GuidanceStepOutput:
    """One HiFlow guidance step on the chosen backend (see `guidance_step_ref` for the math)."""
    return guidance_step_ref(
        sample,
        model_output,
        ref_x0,
        hw=hw,
        ref_hw=ref_hw,
        sigma=sigma,
        sigma_next=sigma_next,
        alpha=alpha,
        beta=beta,
        structure_guidance=structure_guidance,
        filter_ratio=filter_ratio,
        butterworth_order=butterworth_order,
        state=state,
    )
