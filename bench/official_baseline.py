"""The official way of doing HiFlow's work, re-implemented as a benchmark baseline.

Written from the behaviour recorded in ../shared/golden/README.md §6 (not copied from the official
source). It does the same work as `HiFlowPipeline` -- same schedule, same stage entries, same
guidance math -- the way the official implementation does it, so that a benchmark can time the
two on the same model, plan and inputs in one process:

* transformer: the base stage with diffusers' stock `FluxAttnProcessor`; every high-res stage
  with a processor that does the stock projections, rotates q and k unfused in fp32 (copies of q
  and k) from float64 RoPE tables with theta x ntk, and calls SDPA with the proportional-attention
  scale: `hiflow_fast.transformer.patched_transformer`, our reference path, is exactly that;
* guidance step: x0 and the velocities in fp32 on unpacked copies; the Butterworth mask rebuilt
  at every step by a Python double loop (one indexed assignment per latent pixel, i.e. one tiny
  kernel launch each on a GPU); two full complex FFT pairs with fftshift (one for x0, one for the
  reference); the swin pad/crop of the latents and of both velocity states through
  unpack -> F.pad / slice -> pack copies;
* stage entry and final decode: the same diffusers VAE calls as ours (decode, bicubic resize,
  sharpen, encode; tiling on after the base stage), which is what the official code runs.

Supported: fft structure guidance, latent upsampling, no text duplication (the official defaults,
and what the benchmarks run). The official pipeline also writes a PNG per stage; that file I/O is
left out here (it is not part of the generation's device work).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from hiflow_fast import latents as L
from hiflow_fast import vae as V
from hiflow_fast.config import HiFlowConfig
from hiflow_fast.errors import HiFlowInputError
from hiflow_fast.pipeline import HiFlowOutput, StageStart, StepEnd
from hiflow_fast.ref.guided_velocity import VELOCITY_EPS
from hiflow_fast.ref.reference_flow import renoise
from hiflow_fast.schedule import base_schedule
from hiflow_fast.transformer import patched_transformer


# ---- guidance step --------------------------------------------------------------------------


def official_butterworth_mask(shape: tuple[int, ...], ratio: float, order: int, device) -> torch.Tensor:
    """The centred Butterworth mask of an x0 of `shape` [B, C, H, W], built as the official code
    does at every step: a zero tensor on the device, then one Python iteration and one indexed
    assignment (over batch and channels) per latent pixel."""
    height, width = shape[-2], shape[-1]
    mask = torch.zeros(shape, device=device)
    if ratio == 0:
        return mask
    for h in range(height):
        for w in range(width):
            d_square = (2 * h / height - 1) ** 2 + (2 * w / width - 1) ** 2
            mask[..., h, w] = 1 / (1 + (d_square / ratio**2) ** order)
    return mask


def official_fft_lowpass(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Re(ifft2(ifftshift(fftshift(fft2(x)) * mask))): one full complex FFT pair."""
    dims = (-2, -1)
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.float(), dim=dims), dim=dims)
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum * mask, dim=dims), dim=dims).real


def swin_move_packed(packed: torch.Tensor, hw: tuple[int, int], to_hw: tuple[int, int]) -> torch.Tensor:
    """Move packed latents between the plain and the swin-padded grid the official way: unpack,
    F.pad (or slice), pack -- three full copies."""
    if tuple(hw) == tuple(to_hw):
        return packed
    unpacked = L.unpack(packed, *hw)
    if to_hw[0] > hw[0]:
        return L.pack(F.pad(unpacked, (1, 1, 1, 1), mode="constant", value=0.0))
    return L.pack(unpacked[:, :, 1:-1, 1:-1].contiguous())


def official_guidance_step(
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
    filter_ratio: float,
    butterworth_order: int,
    v_prev: torch.Tensor | None,
    v_ref_prev: torch.Tensor | None,
    mask_fn: Callable[..., torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One official high-res step on packed tensors (the states already on `hw`).

    Returns (x_next packed in the model's dtype, unguided x0 packed fp32, v, v_ref packed fp32).
    `mask_fn(shape, ratio, order, device)` builds the mask (default: the official per-pixel loop,
    `official_butterworth_mask`; bench_guidance swaps in a vectorised build of the same tensor
    only where a CPU memory profiler would otherwise record every per-pixel assignment)."""
    sample = sample.float()
    pred_x0 = sample - sigma * model_output.float()
    x = L.unpack(sample, *hw)
    x0 = L.unpack(pred_x0, *hw)
    ref = F.interpolate(L.unpack(ref_x0, *ref_hw).float(), size=tuple(hw), mode="bicubic", align_corners=False)
    mask = (mask_fn or official_butterworth_mask)(tuple(x0.shape), filter_ratio, butterworth_order, x0.device)
    x0 = x0 + alpha * (official_fft_lowpass(ref, mask) - official_fft_lowpass(x0, mask))
    v = (x - x0) / (sigma + VELOCITY_EPS)
    v_ref = (x - ref) / (sigma + VELOCITY_EPS)
    if v_prev is not None:
        v = v + beta * ((L.unpack(v_prev, *hw) - L.unpack(v_ref_prev, *hw)) - (v - v_ref))
    x_next = x + (sigma_next - sigma) * v
    return L.pack(x_next).to(model_output.dtype), pred_x0, L.pack(v), L.pack(v_ref)


# ---- transformer ----------------------------------------------------------------------------


# ---- pipeline -------------------------------------------------------------------------------


class OfficialWayPipeline:
    """The HiFlow cascade the official way, on the same diffusers components as `HiFlowPipeline`.

    Call with prompt embeddings, the base noise (unpacked) and one packed noise per high-res stage
    (the benchmark draws them once and gives both paths the same). The callback receives the same
    `StageStart` / `StepEnd` events as `HiFlowPipeline`'s."""

    def __init__(self, transformer, vae, scheduler):
        self.transformer = transformer
        self.vae = vae
        self.scheduler = scheduler

    @torch.no_grad()
    def __call__(
        self,
        *,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        config: HiFlowConfig,
        latents: torch.Tensor,
        stage_noises: list[torch.Tensor],
        output_type: str = "pt",
        callback: Callable[[StageStart | StepEnd], None] | None = None,
    ) -> HiFlowOutput:
        if config.structure_guidance != "fft" or config.upsampling != "latent" or config.text_duplication:
            raise HiFlowInputError(
                "config", (config.structure_guidance, config.upsampling, config.text_duplication),
                "structure_guidance='fft', upsampling='latent', text_duplication=False (the baseline's scope)",
            )
        if not isinstance(config.sharpening_sigma, (int, float)):
            raise HiFlowInputError("sharpening_sigma", config.sharpening_sigma, "one number (the baseline draws nothing)")
        if output_type not in ("pt", "latent"):
            raise HiFlowInputError("output_type", output_type, "'pt' or 'latent'")
        transformer, vae = self.transformer, self.vae
        device = next(transformer.parameters()).device
        dtype = transformer.dtype
        embeds = prompt_embeds.to(device=device, dtype=dtype)
        pooled = pooled_prompt_embeds.to(device=device, dtype=dtype)
        txt_ids = L.text_ids(embeds.shape[1], device=device, dtype=dtype)
        hw = L.latent_hw(config.height, config.width)
        schedule = base_schedule(self.scheduler, config.num_inference_steps, (hw[0] // 2) * (hw[1] // 2))
        timesteps, sigmas = schedule.timesteps.to(device), schedule.sigmas.to(device)
        x = L.pack(latents.to(device=device, dtype=dtype))
        pred_x0_by_index: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}

        def forward(x, index, guidance, img_ids):
            return transformer(
                hidden_states=x, timestep=timesteps[index].expand(x.shape[0]).to(x.dtype) / 1000,
                guidance=guidance, pooled_projections=pooled, encoder_hidden_states=embeds,
                txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
            )[0]

        tiling_before = getattr(vae, "use_tiling", False)
        # The official processor (stock projections, diffusers-style fp32 RoPE from float64 tables with
        # theta x ntk, SDPA with the proportional scale, always on) is our reference path exactly;
        # the official code installs it for good, here it is undone afterwards.
        with patched_transformer(transformer, proportional=True, attention="sdpa") as patch:
            patch.use_base()
            # Base stage: stock processors and RoPE, a plain Euler step.
            guidance = self._guidance(config.guidance_scale, x.shape[0], device)
            img_ids = L.image_ids(*hw, device=device, dtype=dtype)
            for i in range(schedule.num_steps):
                v = forward(x, i, guidance, img_ids)
                sample = x.float()
                pred_x0 = sample - sigmas[i] * v
                x = (sample + (sigmas[i + 1] - sigmas[i]) * v).to(v.dtype)
                pred_x0_by_index[i] = (pred_x0, hw)
                if callback is not None:
                    callback(StepEnd(0, i, i, hw, x, pred_x0))
            L.check_finite(x, "after the base stage (official baseline)")
            vae.use_tiling = True  # the official pipeline tiles the VAE from here on
            try:
                for k, stage in enumerate(config.stages, start=1):
                    size = (stage.height, stage.width)
                    guidance_latents, _ = V.guidance_latents(
                        vae, x, hw, size, sigma=float(config.sharpening_sigma),
                        kernel_size=config.sharpening_kernel_size, amount=config.sharpening_amount,
                    )
                    start = schedule.stage_start(stage.steps)
                    sigma_start = schedule.sigmas[start].to(device)
                    x = renoise(guidance_latents.to(dtype), stage_noises[k - 1].to(device=device, dtype=dtype), sigma_start).to(dtype)
                    hw = L.latent_hw(*size)
                    if callback is not None:
                        callback(StageStart(k, guidance_latents, x, float(sigma_start)))
                    patch.use_highres(stage.ntk_factor)
                    x, hw = self._highres_stage(
                        k, x, hw, stage, start, schedule, forward, pred_x0_by_index, config, device, callback
                    )
                    L.check_finite(x, f"after high-res stage {k} (official baseline)")
                image = V.decode(vae, x, hw) if output_type == "pt" else None
            finally:
                vae.use_tiling = tiling_before
        images = None if image is None else (image.float() / 2 + 0.5).clamp(0, 1)
        return HiFlowOutput(images=images, latents=x, latent_hw=hw, seed=None)

    def _guidance(self, scale: float, batch: int, device):
        """The guidance-embedding input (FLUX.1-dev is guidance-distilled), None for a model without one."""
        if not self.transformer.config.guidance_embeds:
            return None
        return torch.full([batch], scale, device=device, dtype=torch.float32)

    def _highres_stage(self, k, x, hw, stage, start, schedule, forward, pred_x0_by_index, config, device, callback):
        guidance = self._guidance(stage.guidance_scale, x.shape[0], device)
        v_prev = v_ref_prev = None
        state_hw = hw
        for i in range(stage.steps):
            index = start + i
            if config.swin_patchify:
                new_hw = (hw[0] + 2, hw[1] + 2) if i % 2 == 0 else (hw[0] - 2, hw[1] - 2)
                x = swin_move_packed(x, hw, new_hw)
                hw = new_hw
            if v_prev is not None:
                v_prev = swin_move_packed(v_prev, state_hw, hw)
                v_ref_prev = swin_move_packed(v_ref_prev, state_hw, hw)
            img_ids = L.image_ids(*hw, device=device, dtype=x.dtype)
            v = forward(x, index, guidance, img_ids)
            decay = (stage.steps - i) / stage.steps
            ref_x0, ref_hw = pred_x0_by_index[index]
            x, pred_x0, v_prev, v_ref_prev = official_guidance_step(
                x, v, ref_x0, hw=hw, ref_hw=ref_hw,
                sigma=schedule.sigma(index), sigma_next=schedule.sigma(index + 1),
                alpha=stage.alpha * decay, beta=stage.beta * decay,
                filter_ratio=stage.filter_ratio, butterworth_order=config.butterworth_order,
                v_prev=v_prev, v_ref_prev=v_ref_prev,
            )
            state_hw = hw
            pred_x0_by_index[index] = (pred_x0, hw)
            if callback is not None:
                callback(StepEnd(k, i, index, hw, x, pred_x0))
        return x, hw
