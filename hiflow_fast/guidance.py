"""One HiFlow high-resolution guidance step and the per-stage velocity state.

The step takes the transformer's velocity for the current latents and returns the next
latents, with the three alignments of HiFlow applied:

1. x0 = x - sigma * v (the *unguided* estimate is returned: it is the next stage's reference);
2. direction: x0 <- x0 + alpha * LP(ref - x0), LP an FFT Butterworth or a Haar low-pass, ref
   the previous stage's x0 at this timestep upsampled to the current grid;
3. acceleration and the Euler step (see `hiflow_fast.ref.guided_velocity`).

Tensors at this interface are packed [B, N, 4C], as in the official pipeline. The backend
(`ref`, `triton` or `native`) is chosen once by `hiflow_fast.backend` (argument, then
$HIFLOW_BACKEND, then "auto": Triton for CUDA tensors, the reference otherwise). `triton` and
`native` run the same ops (hiflow_fast::<op> and hiflow_fast_native::<op>, identical schemas)
through the same orchestration, `_guidance_step_kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import latents as L
from .backend import resolve_backend
from .bicubic import bicubic_resize
from .errors import HiFlowInputError
from .ref.butterworth import butterworth_lowpass_mask_rfft
from .ref.guided_velocity import VELOCITY_EPS, guided_velocity_update
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


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_GUIDANCE_KINDS = ("fft", "dwt")
# Largest element count the Triton kernels index with 32-bit offsets.
_MAX_KERNEL_ELEMENTS = 2**31 - 1


def _check_grid(field: str, hw, tokens: int | None = None) -> tuple[int, int]:
    if (
        not isinstance(hw, (tuple, list))
        or len(hw) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in hw)
        or not all(s > 0 and s % 2 == 0 for s in hw)
    ):
        raise HiFlowInputError(field, hw, "a pair (h, w) of positive even latent sizes")
    if tokens is not None and tokens != (hw[0] // 2) * (hw[1] // 2):
        raise HiFlowInputError(
            field, tuple(hw), f"a latent grid with (h/2)*(w/2) = {tokens} tokens, the packed tensor's length"
        )
    return int(hw[0]), int(hw[1])


def _check_packed(field: str, t, like: torch.Tensor | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise HiFlowInputError(field, type(t).__name__, "a torch.Tensor")
    if t.dim() != 3 or t.shape[-1] % 4 != 0 or t.shape[-1] == 0:
        raise HiFlowInputError(f"{field}.shape", tuple(t.shape), "packed latents [B, N, 4*C]")
    if t.dtype not in _FLOAT_DTYPES:
        raise HiFlowInputError(f"{field}.dtype", t.dtype, "float32, float16 or bfloat16")
    if like is not None:
        if t.device != like.device:
            raise HiFlowInputError(f"{field}.device", t.device, f"the sample's device ({like.device})")
        if t.shape[0] != like.shape[0] or t.shape[-1] != like.shape[-1]:
            raise HiFlowInputError(
                f"{field}.shape", tuple(t.shape), f"batch {like.shape[0]} and {like.shape[-1]} features, as the sample"
            )


def _check_step_inputs(sample, model_output, ref_x0, hw, ref_hw, next_hw, structure_guidance, filter_ratio,
                       butterworth_order, state) -> tuple[int, int]:
    """Validate the step's inputs; returns the output grid. Raises HiFlowInputError."""
    _check_packed("sample", sample)
    _check_packed("model_output", model_output, sample)
    if model_output.shape != sample.shape:
        raise HiFlowInputError("model_output.shape", tuple(model_output.shape), f"the sample's shape {tuple(sample.shape)}")
    _check_packed("ref_x0", ref_x0, sample)
    h, w = _check_grid("hw", hw, sample.shape[1])
    _check_grid("ref_hw", ref_hw, ref_x0.shape[1])
    out_hw = (h, w) if next_hw is None else _check_grid("next_hw", next_hw)
    if abs(out_hw[0] - h) not in (0, 2) or out_hw[0] - h != out_hw[1] - w:
        raise HiFlowInputError("next_hw", tuple(out_hw), f"{(h, w)}, {(h + 2, w + 2)} (swin pad) or {(h - 2, w - 2)} (crop)")
    if structure_guidance not in _GUIDANCE_KINDS:
        raise HiFlowInputError("structure_guidance", structure_guidance, "'fft' or 'dwt'")
    if not isinstance(butterworth_order, int) or isinstance(butterworth_order, bool) or not 1 <= butterworth_order <= 16:
        raise HiFlowInputError("butterworth_order", butterworth_order, "an integer from 1 to 16")
    if filter_ratio < 0:
        raise HiFlowInputError("filter_ratio", filter_ratio, "a number >= 0 (0 disables the low band)")
    if state is not None and not isinstance(state, VelocityState):
        raise HiFlowInputError("state", type(state).__name__, "a VelocityState or None")
    if state is not None and state.v is not None:
        if state.v_ref is None:
            raise HiFlowInputError("state.v_ref", None, "a tensor whenever state.v is set")
        sh, sw = _check_grid("state.hw", state.hw)
        if abs(sh - h) not in (0, 2) or sh - h != sw - w:
            raise HiFlowInputError("state.hw", tuple(state.hw), f"{(h, w)} or one swin pad/crop away from it")
        for name, t in (("state.v", state.v), ("state.v_ref", state.v_ref)):
            _check_packed(name, t, sample)
            if t.shape[1] != (sh // 2) * (sw // 2):
                raise HiFlowInputError(f"{name}.shape", tuple(t.shape), f"{(sh // 2) * (sw // 2)} tokens for state.hw={(sh, sw)}")
    biggest = max(sample.numel(), sample.shape[0] * sample.shape[-1] * (out_hw[0] // 2) * (out_hw[1] // 2))
    if biggest > _MAX_KERNEL_ELEMENTS:
        raise HiFlowInputError("sample.numel()", biggest, f"at most {_MAX_KERNEL_ELEMENTS} elements (32-bit kernel indexing)")
    return out_hw


def _reference_upsample(ref_x0: torch.Tensor, ref_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """`latent_reference` (bicubic, fp32 [B, C, h, w]). On a CPU as separable matrix products with
    PyTorch's weights (`hiflow_fast.bicubic`: banded for HiFlow's 2x stages, 2-4x faster than
    F.interpolate there, equal to ~1e-7); elsewhere, or when fp32 matmuls may be
    reduced-precision, F.interpolate itself."""
    if ref_x0.device.type != "cpu" or torch.get_float32_matmul_precision() != "highest":
        return latent_reference(ref_x0, ref_hw, hw)
    return bicubic_resize(L.unpack(ref_x0, *ref_hw), hw)


def _guidance_step_torch(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    ref_x0: torch.Tensor,
    *,
    hw: tuple[int, int],
    ref_hw: tuple[int, int],
    out_hw: tuple[int, int],
    sigma: float,
    sigma_next: float,
    alpha: float,
    beta: float,
    structure_guidance: str,
    filter_ratio: float,
    butterworth_order: int,
    state: VelocityState,
) -> GuidanceStepOutput:
    """The "ref" backend: the reference math (hiflow_fast.ref) arranged for the CPU.

    Same operations as `guidance_step_ref`, arranged so that a CPU moves few bytes and touches
    little fresh memory (on a CPU, the first write to a new page costs as much as several
    passes over it, so the peak of a step is also its time):

    * only the difference ref - x0 is unpacked (the FFT needs the image); it and its low-pass
      are packed back, and the velocity and Euler math runs on contiguous packed tensors;
    * one real FFT pair, 1 / (sigma + 1e-6) and alpha folded into the (small) mask; the Haar
      low-pass needs no unpacking at all (on even grids it is the mean of each token's patch);
    * the acceleration term as a lerp; the swin move onto `out_hw` as four phase copies per
      output (no unpack); packed temporaries are allocated at the larger grid's size, so that
      each moved output can reuse the memory of the temporary released before it.

    Peak beyond the four outputs, measured at the 2K and 4K latents: ~3 latents (the unpacked
    difference, its spectrum and irfft2's own temporaries; the packs' scratch comes later)."""
    h, w = hw
    # Contiguous fp32 (no copy when they already are): the layout copies view the packed
    # tensors in wider dtypes, which needs unit innermost strides.
    sample = sample.float().contiguous()
    model_output32 = model_output.float().contiguous()
    b, tokens, features = sample.shape
    channels = features // 4
    denom = sigma + VELOCITY_EPS
    moving = tuple(out_hw) != (h, w)
    out_shape = (b, (out_hw[0] // 2) * (out_hw[1] // 2), features)
    # Packed temporaries that later become outputs are sized for the larger grid, so that the
    # memory they release can hold the moved outputs.
    capacity = max(sample.numel(), b * out_shape[1] * features)

    def packed_buffer() -> torch.Tensor:
        storage = torch.empty(capacity, dtype=torch.float32, device=sample.device)
        return storage[: sample.numel()].view(sample.shape)

    pred_x0 = torch.add(sample, model_output32, alpha=-sigma)  # x0 = x - sigma * v_model
    image = _reference_upsample(ref_x0, ref_hw, hw)  # bicubic reference, fp32 [B, C, h, w]
    # lowpass = alpha * LP(ref - x0) / d (alpha and the velocity's 1 / d folded in), packed.
    if structure_guidance == "fft":
        work = torch.empty_like(image)
        image.sub_(L.unpack_into(work, pred_x0))  # image = ref - x0
        difference = L.pack_into(packed_buffer(), image, scratch=work)
        del work  # (released before the FFT pair and its own temporaries)
        spectrum = torch.fft.rfft2(image, dim=(-2, -1))
        mask = butterworth_lowpass_mask_rfft(h, w, filter_ratio, butterworth_order, device=sample.device)
        spectrum.mul_(mask * (alpha / denom))
        torch.fft.irfft2(spectrum, s=(h, w), dim=(-2, -1), out=image)  # image = lowpass
        del spectrum
        lowpass = L.pack_into(packed_buffer(), image).view(b, tokens, channels, 4)
        del image
    else:
        difference = L.pack_into(packed_buffer(), image).sub_(pred_x0)
        del image
        # Haar on an even grid: every 2x2 patch replaced by its mean; [B, N, C, 1] broadcasts.
        lowpass = difference.view(b, tokens, channels, 4).mean(dim=-1, keepdim=True).mul_(alpha / denom)

    # (x - x0) / d = sigma * v_model / d (equal to rounding); ref = x0 + difference.
    v_ref = difference.mul_(-1.0 / denom).add_(model_output32, alpha=sigma / denom)  # (x - ref) / d
    if lowpass.shape[-1] == 4:  # v = (x - (x0 + alpha * LP)) / d, in the low-pass buffer
        v = lowpass.neg_().view(sample.shape).add_(model_output32, alpha=sigma / denom)
    else:
        v = packed_buffer()
        torch.mul(model_output32, sigma / denom, out=v)
        v.view(b, tokens, channels, 4).sub_(lowpass)
    del lowpass, difference
    if state.v is not None:
        # v <- v + beta * ((v_prev - v_ref_prev) - (v - v_ref))
        #    = lerp(v, v_ref, beta) + beta * (v_prev - v_ref_prev)
        # (The difference first, then one add: the same arithmetic whether the state arrives on
        # this grid or is moved here, so folding the swin moves into the step changes no bit.)
        v.lerp_(v_ref, beta)
        state_delta = torch.sub(state.v.float(), state.v_ref.float())  # fp32 before subtracting
        if tuple(state.hw) != (h, w):
            state_delta = L.swin_move_into(torch.empty_like(v), state_delta, tuple(state.hw))
        v.add_(state_delta, alpha=beta)
        del state_delta

    step = sigma_next - sigma
    if not moving:
        x_next = torch.empty(sample.shape, dtype=model_output.dtype, device=sample.device)
        torch.add(sample, v, alpha=step, out=x_next)
        return GuidanceStepOutput(prev_sample=x_next, pred_x0=pred_x0, state=VelocityState(v, v_ref, (h, w)))

    def moved(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return L.swin_move_into(torch.empty(out_shape, dtype=dtype, device=sample.device), t, (h, w))

    # x' on this grid, then moved: bit-identical to a step without next_hw plus a separate pad or
    # crop (the same add on the same layout), and rounded once to the output dtype.
    x_here = torch.add(sample, v, alpha=step)
    v_ref_out = moved(v_ref, torch.float32)
    del v_ref
    v_out = moved(v, torch.float32)
    del v
    x_next = moved(x_here, model_output.dtype)
    return GuidanceStepOutput(prev_sample=x_next, pred_x0=pred_x0, state=VelocityState(v_out, v_ref_out, tuple(out_hw)))


def _guidance_step_kernels(
    ops,
    sample: torch.Tensor,
    model_output: torch.Tensor,
    ref_x0: torch.Tensor,
    *,
    hw: tuple[int, int],
    ref_hw: tuple[int, int],
    out_hw: tuple[int, int],
    sigma: float,
    sigma_next: float,
    alpha: float,
    beta: float,
    structure_guidance: str,
    filter_ratio: float,
    butterworth_order: int,
    state: VelocityState,
) -> GuidanceStepOutput:
    """The step as three fused kernels (plus torch's rfft2/irfft2 pair in "fft" mode), from the
    op namespace `ops`: torch.ops.hiflow_fast (Triton) or torch.ops.hiflow_fast_native (csrc/).

    Temporaries: one fp32 latent (the difference, low-passed in place) and, in "fft" mode, its
    rfft2 spectrum. Outputs: x_next (on out_hw), pred_x0 (fp32, current grid), v and v_ref (fp32
    on out_hw; the incoming state's buffers are reused when they are already on out_hw)."""
    sample = sample.contiguous()
    model_output = model_output.contiguous()
    ref_x0 = ref_x0.contiguous()
    b, _, features = sample.shape
    channels = features // 4
    h, w = hw
    oh, ow = out_hw
    f32 = dict(dtype=torch.float32, device=sample.device)
    pred_x0 = torch.empty(sample.shape, **f32)
    diff = torch.empty((b, channels, h, w), **f32)
    ops.reference_flow(sample, model_output, ref_x0, ref_hw[0], ref_hw[1], sigma, pred_x0, diff)
    if structure_guidance == "fft":
        ops.spectral_lowpass_blend(diff, filter_ratio, butterworth_order, alpha)
    else:
        ops.haar_lowpass_blend(diff, alpha)

    out_shape = (b, (oh // 2) * (ow // 2), features)
    x_next = torch.empty(out_shape, dtype=model_output.dtype, device=sample.device)
    v_prev = v_ref_prev = None
    state_h, state_w = out_hw
    if state.v is None:
        prev_mode = 0
        v, v_ref = torch.empty(out_shape, **f32), torch.empty(out_shape, **f32)
    elif (
        tuple(state.hw) == tuple(out_hw)
        and all(t.dtype == torch.float32 and t.is_contiguous() for t in (state.v, state.v_ref))
        and state.v is not state.v_ref
    ):
        prev_mode = 2  # update the state's own buffers in place
        v, v_ref = state.v, state.v_ref
    else:
        prev_mode = 1
        v_prev, v_ref_prev = state.v.contiguous(), state.v_ref.contiguous()
        state_h, state_w = state.hw
        v, v_ref = torch.empty(out_shape, **f32), torch.empty(out_shape, **f32)
    ops.guided_velocity(
        sample, pred_x0, diff, ref_x0, v_prev, v_ref_prev,
        ref_hw[0], ref_hw[1], state_h, state_w, oh, ow,
        sigma, sigma_next, beta, prev_mode, x_next, v, v_ref,
    )
    return GuidanceStepOutput(prev_sample=x_next, pred_x0=pred_x0, state=VelocityState(v, v_ref, (oh, ow)))


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
    next_hw: tuple[int, int] | None = None,
) -> GuidanceStepOutput:
    """One HiFlow guidance step on the chosen backend (see `guidance_step_ref` for the math).

    sample, model_output: packed [B, N, 4C] on the latent grid `hw`; ref_x0: the previous stage's
    packed x0 on `ref_hw`; state: the previous step's VelocityState (any grid one swin pad/crop
    away) or None on a stage's first step. backend: "triton", "native", "ref", "auto" or None
    ($HIFLOW_BACKEND, else "auto"). next_hw: the grid the *next* step runs on (hw, or hw +- 2
    with swin patchify); prev_sample and the returned state are written straight on it, so the
    caller needs no pad or crop. Default: hw (the official layout: the caller pads/crops).

    With the triton and native backends the incoming state's buffers are updated in place when they are
    fp32, contiguous and already on next_hw (the returned state then holds the same tensors).
    Bad input raises HiFlowInputError.
    """
    out_hw = _check_step_inputs(sample, model_output, ref_x0, hw, ref_hw, next_hw, structure_guidance,
                                filter_ratio, butterworth_order, state)
    hw = (int(hw[0]), int(hw[1]))
    ref_hw = (int(ref_hw[0]), int(ref_hw[1]))
    state = state or VelocityState()
    kwargs = dict(
        hw=hw, ref_hw=ref_hw, sigma=sigma, sigma_next=sigma_next, alpha=alpha, beta=beta,
        structure_guidance=structure_guidance, filter_ratio=filter_ratio,
        butterworth_order=butterworth_order, state=state,
    )
    chosen = resolve_backend(backend, device=sample.device)
    if chosen in ("triton", "native"):
        ops = torch.ops.hiflow_fast if chosen == "triton" else torch.ops.hiflow_fast_native
        return _guidance_step_kernels(ops, sample, model_output, ref_x0, out_hw=out_hw, **kwargs)
    if torch.compiler.is_compiling():
        # Under torch.compile the plain composition is the better input: Inductor fuses it, and
        # the eager path's strided `out=` writes are not traceable.
        out = guidance_step_ref(sample, model_output, ref_x0, **kwargs)
        if out_hw == hw:
            return out
        move = L.swin_pad_packed if out_hw[0] > hw[0] else L.swin_crop_packed
        return GuidanceStepOutput(move(out.prev_sample, *hw), out.pred_x0, out.state.to_grid(out_hw))
    return _guidance_step_torch(sample, model_output, ref_x0, out_hw=out_hw, **kwargs)
