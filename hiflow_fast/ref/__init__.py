"""Plain-PyTorch reference of every HiFlow operation: the CPU path and the tests' oracle."""

from .attention import (
    attention,
    duplicate_text,
    proportional_attention_scale,
    text_duplication_factors,
)
from .butterworth import butterworth_lowpass_mask, butterworth_lowpass_mask_rfft
from .guided_velocity import VELOCITY_EPS, guided_velocity_update
from .haar_blend import haar_lowpass, haar_lowpass_blend
from .reference_flow import latent_reference, renoise
from .rope import apply_rope, ntk_rope_cos_sin
from .sharpen import gaussian_blur, gaussian_kernel1d, sharpen
from .spectral_blend import (
    fft_lowpass_official,
    spectral_lowpass,
    spectral_lowpass_blend,
    spectral_lowpass_blend_official,
)

__all__ = [
    "VELOCITY_EPS",
    "apply_rope",
    "attention",
    "butterworth_lowpass_mask",
    "butterworth_lowpass_mask_rfft",
    "duplicate_text",
    "fft_lowpass_official",
    "gaussian_blur",
    "gaussian_kernel1d",
    "guided_velocity_update",
    "haar_lowpass",
    "haar_lowpass_blend",
    "latent_reference",
    "ntk_rope_cos_sin",
    "proportional_attention_scale",
    "renoise",
    "sharpen",
    "spectral_lowpass",
    "spectral_lowpass_blend",
    "spectral_lowpass_blend_official",
    "text_duplication_factors",
]
