"""The HiFlow stage plan and every knob of the official implementation, validated once.

`HiFlowConfig` is immutable. Build it directly, or from the official pipeline's keyword
names with `HiFlowConfig.from_official_kwargs` (the golden cases' `params` use those names,
including the official spelling `swin_pachify`).
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence, Union

import numpy as np

from .errors import HiFlowInputError

# A latent pixel is 8 image pixels and Flux packs 2x2 latent pixels into one token, so every
# image side must be a multiple of 16 for the token grid to be whole.
SIZE_MULTIPLE = 16

# Upper size bound of every stage (README "Limits"). The binding limit is 32-bit indexing: the
# Triton kernels and several torch CPU kernels index a tensor with int32 offsets, so a tensor must
# stay under 2**31 elements. FLUX.1-dev's joint hidden state is [B, tokens + 512 text, 3072] and a
# token is 16x16 pixels, so B = 1 allows (2**31 / 3072 - 512) * 256 = 1.79e8 pixels; 2**27
# (1.34e8, e.g. 11584x11584 or 8192x16384) leaves room for the swin padding and the text.
# The schedule fails far later (its time shift exp(mu) overflows a float64 at ~4.2e6 base
# tokens, ~1.07e9 pixels, the 100000x100000 failure) and one side is capped at 16384 px
# (2048 latent pixels) so a thin image cannot reach those limits along one axis.
MAX_SIDE = 16384
MAX_PIXELS = 2**27
# The scheduler's training timesteps: more steps than it has timesteps are not a schedule.
MAX_STEPS = 1000

# The guidance weights' ranges, from the method's definition (README "Ranges"):
#   alpha  x0 <- x0 + alpha * LP(ref - x0): a blend of the low band of x0 towards the reference's,
#          0 = none, 1 = the reference's low band; outside [0, 1] it overshoots or repels.
#   beta   v <- v + beta * (acceleration of the reference - acceleration of v): 0 = none,
#          1 = the reference's acceleration; outside [0, 1] it overshoots or repels.
#   filter_ratio  the Butterworth cutoff radius in the normalised spectrum, whose corners lie at
#          distance sqrt(2): 0 = no low band; above sqrt(2) every frequency is in the pass band.
ALPHA_RANGE = (0.0, 1.0)
BETA_RANGE = (0.0, 1.0)
FILTER_RATIO_RANGE = (0.0, math.sqrt(2.0))
# NTK-aware RoPE scaling multiplies the RoPE base by ntk_factor: >= 1 stretches the wavelengths
# for a larger grid (< 1 would shrink them). The upper ends here and below are sanity bounds, far
# above the official plans' values (ntk 10, guidance 3.5-6, sigma 0.1-2, amount 1).
NTK_RANGE = (1.0, 1.0e4)
GUIDANCE_RANGE = (0.0, 100.0)
SHARPENING_SIGMA_MAX = 100.0
SHARPENING_AMOUNT_RANGE = (0.0, 100.0)
MAX_BUTTERWORTH_ORDER = 64

STRUCTURE_GUIDANCE = ("fft", "dwt")
UPSAMPLING = ("latent", "pixel")
FLOW_CHOICES = ("v_theta",)

SharpeningSigma = Union[float, Sequence[float], str]


def as_int(value: Any) -> int | None:
    """`value` as a Python int when it is an integer (numpy integers included, bools not)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        return None
    return operator.index(value)


def as_real(value: Any) -> float | None:
    """`value` as a Python float when it is a real number (numpy scalars included, bools not)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _check_size(name: str, value: Any, where: str | None = None) -> int:
    size = as_int(value)
    if size is None or size <= 0 or size % SIZE_MULTIPLE:
        raise HiFlowInputError(name, value, f"a positive integer multiple of {SIZE_MULTIPLE} (image pixels)", where=where)
    if size > MAX_SIDE:
        raise HiFlowInputError(name, value, f"at most {MAX_SIDE} pixels per side", where=where)
    return size


def check_area(name: str, height: int, width: int, where: str | None = None) -> None:
    if height * width > MAX_PIXELS:
        raise HiFlowInputError(
            name,
            f"{height}x{width}",
            f"HEIGHTxWIDTH of at most {MAX_PIXELS} pixels (e.g. 11584x11584 or 8192x16384): 32-bit "
            "indexing bounds the transformer's hidden state",
            where=where,
        )


def _check_finite(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
    where: str | None = None,
) -> float:
    number = as_real(value)
    if number is None or not math.isfinite(number):
        raise HiFlowInputError(name, value, "a finite number" + _range_text(minimum, maximum, positive), where=where)
    if (positive and number <= 0) or (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise HiFlowInputError(name, value, "a number" + _range_text(minimum, maximum, positive), where=where)
    return number


def _range_text(minimum: float | None, maximum: float | None, positive: bool) -> str:
    low = "> 0" if positive else (f">= {minimum:.6g}" if minimum is not None else None)
    if maximum is None:
        return f" {low}" if low else ""
    if positive:
        return f" > 0 and <= {maximum:.6g}"
    if minimum is not None:
        return f" from {minimum:.6g} to {maximum:.6g}"
    return f" <= {maximum:.6g}"


def _check_steps(name: str, value: Any, where: str | None = None) -> int:
    steps = as_int(value)
    if steps is None or not 1 <= steps <= MAX_STEPS:
        raise HiFlowInputError(name, value, f"an integer from 1 to {MAX_STEPS}", where=where)
    return steps


@dataclass(frozen=True)
class HiResStage:
    """One high-resolution stage: its target size and the guidance it runs with.

    `alpha` and `beta` are the stage's starting weights; both decay linearly within the stage,
    alpha_i = alpha * (steps - i) / steps, as in the official code.

    Ranges (from the method's definition; see the module constants and README "Ranges"):
    height, width: multiples of 16 up to 16384, height * width <= 2**27; steps: 1 to the base
    steps; alpha, beta: 0 to 1; filter_ratio: 0 to sqrt(2); ntk_factor: 1 to 1e4;
    guidance_scale: 0 to 100.
    """

    height: int
    width: int
    steps: int
    guidance_scale: float = 4.5
    filter_ratio: float = 0.2
    alpha: float = 1.0
    beta: float = 0.5
    ntk_factor: float = 10.0

    def validate(self, index: int, count: int | None = None) -> None:
        """Check every field (numpy scalars are accepted and stored as Python numbers)."""
        name = f"stages[{index}]"
        where = f"high-res stage {index + 1}" + (f" of {count}" if count else "")
        checked = {
            "height": _check_size(f"{name}.height", self.height, where),
            "width": _check_size(f"{name}.width", self.width, where),
            "steps": _check_steps(f"{name}.steps", self.steps, where),
            "guidance_scale": _check_finite(
                f"{name}.guidance_scale", self.guidance_scale, minimum=GUIDANCE_RANGE[0], maximum=GUIDANCE_RANGE[1], where=where
            ),
            "filter_ratio": _check_finite(
                f"{name}.filter_ratio", self.filter_ratio, minimum=FILTER_RATIO_RANGE[0], maximum=FILTER_RATIO_RANGE[1], where=where
            ),
            "alpha": _check_finite(f"{name}.alpha", self.alpha, minimum=ALPHA_RANGE[0], maximum=ALPHA_RANGE[1], where=where),
            "beta": _check_finite(f"{name}.beta", self.beta, minimum=BETA_RANGE[0], maximum=BETA_RANGE[1], where=where),
            "ntk_factor": _check_finite(
                f"{name}.ntk_factor", self.ntk_factor, minimum=NTK_RANGE[0], maximum=NTK_RANGE[1], where=where
            ),
        }
        check_area(f"{name}.height/width", checked["height"], checked["width"], where)
        for key, value in checked.items():
            object.__setattr__(self, key, value)


@dataclass(frozen=True)
class HiFlowConfig:
    """Everything a HiFlow generation needs besides the prompt, the model and the seed.

    Deliberate differences from the official code, each with its switch back:

    * `sharpening_sigma`: the official code draws the blur sigma from the *global* torch RNG.
      Here it is a float (used for every draw), a sequence (one per draw, in the official draw
      order) or ``"seeded"`` (the default): drawn U(range) from a private CPU generator
      seeded with the call's seed, which reproduces the official draws of a process that ran
      ``torch.manual_seed(seed)`` first, as the official front end does. The global RNG is
      never touched.
    * `official_compat=True` restores two official quirks: a stage that ends on the padded
      swin grid returns the padded (+16 px) size, and high-res stages always use
      proportional attention whatever `proportional_attention` says.
    * Nothing carries over between calls (the official pipeline's second call differs).
    """

    height: int = 1024
    width: int = 1024
    num_inference_steps: int = 30
    guidance_scale: float = 3.5
    stages: tuple[HiResStage, ...] = field(
        default_factory=lambda: (
            HiResStage(2048, 2048, 16, guidance_scale=4.5, alpha=1.0),
            HiResStage(4096, 4096, 10, guidance_scale=6.0, alpha=0.25),
        )
    )
    structure_guidance: str = "fft"
    upsampling: str = "latent"
    flow_choice: str = "v_theta"
    swin_patchify: bool = True
    proportional_attention: bool = True
    text_duplication: bool = False
    sharpening_kernel_size: int = 3
    sharpening_sigma: SharpeningSigma = "seeded"
    sharpening_sigma_range: tuple[float, float] = (0.1, 2.0)
    sharpening_amount: float = 1.0
    butterworth_order: int = 4
    max_sequence_length: int = 512
    official_compat: bool = False

    def __post_init__(self) -> None:
        stages = self.stages
        if isinstance(stages, HiResStage):
            stages = (stages,)
        if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, (Sequence, tuple, list)):
            raise HiFlowInputError(
                "stages", stages, "a list of HiResStage, one per high-res stage (an empty list: the base stage only)"
            )
        object.__setattr__(self, "stages", tuple(stages))
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        height = _check_size("height", self.height)
        width = _check_size("width", self.width)
        check_area("height/width", height, width)
        object.__setattr__(self, "height", height)
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "num_inference_steps", _check_steps("num_inference_steps", self.num_inference_steps))
        object.__setattr__(
            self,
            "guidance_scale",
            _check_finite("guidance_scale", self.guidance_scale, minimum=GUIDANCE_RANGE[0], maximum=GUIDANCE_RANGE[1]),
        )
        prev_h, prev_w = self.height, self.width
        count = len(self.stages)
        for k, stage in enumerate(self.stages):
            if not isinstance(stage, HiResStage):
                raise HiFlowInputError(f"stages[{k}]", stage, "a HiResStage")
            stage.validate(k, count)
            where = f"high-res stage {k + 1} of {count}"
            if stage.height < prev_h or stage.width < prev_w or stage.height * stage.width <= prev_h * prev_w:
                raise HiFlowInputError(
                    f"stages[{k}].height/width",
                    f"{stage.height}x{stage.width}",
                    f"a HEIGHTxWIDTH that grows from the previous stage's {prev_h}x{prev_w} "
                    "(no side may shrink and the area must increase)",
                    where=where,
                )
            if stage.steps > self.num_inference_steps:
                raise HiFlowInputError(
                    f"stages[{k}].steps",
                    stage.steps,
                    f"at most num_inference_steps={self.num_inference_steps}: a high-res stage runs "
                    "the last `steps` timesteps of the base schedule",
                    where=where,
                )
            prev_h, prev_w = stage.height, stage.width
        for name, value, allowed in (
            ("structure_guidance", self.structure_guidance, STRUCTURE_GUIDANCE),
            ("upsampling", self.upsampling, UPSAMPLING),
            ("flow_choice", self.flow_choice, FLOW_CHOICES),
        ):
            if value not in allowed:
                raise HiFlowInputError(name, value, f"one of {', '.join(map(repr, allowed))}")
        for name in ("swin_patchify", "proportional_attention", "text_duplication", "official_compat"):
            if not isinstance(getattr(self, name), bool):
                raise HiFlowInputError(name, getattr(self, name), "True or False")
        k = as_int(self.sharpening_kernel_size)
        if k is None or k < 1 or k % 2 == 0:
            raise HiFlowInputError("sharpening_kernel_size", self.sharpening_kernel_size, "a positive odd integer")
        object.__setattr__(self, "sharpening_kernel_size", k)
        lo_hi = self.sharpening_sigma_range
        values = [as_real(v) for v in lo_hi] if isinstance(lo_hi, (tuple, list)) else []
        if (
            len(values) != 2
            or not all(v is not None and math.isfinite(v) and 0 < v <= SHARPENING_SIGMA_MAX for v in values)
            or values[0] > values[1]
        ):
            raise HiFlowInputError(
                "sharpening_sigma_range", lo_hi, f"(low, high) with 0 < low <= high <= {SHARPENING_SIGMA_MAX:g}"
            )
        object.__setattr__(self, "sharpening_sigma_range", (values[0], values[1]))
        sigma = self.sharpening_sigma
        allowed = f"'seeded', a number > 0 and <= {SHARPENING_SIGMA_MAX:g}, or a sequence of them"
        if isinstance(sigma, str):
            if sigma != "seeded":
                raise HiFlowInputError("sharpening_sigma", sigma, allowed)
        elif as_real(sigma) is not None:
            object.__setattr__(
                self, "sharpening_sigma", _check_finite("sharpening_sigma", sigma, positive=True, maximum=SHARPENING_SIGMA_MAX)
            )
        else:
            try:
                values = tuple(as_real(v) for v in sigma)
            except TypeError:
                raise HiFlowInputError("sharpening_sigma", sigma, allowed) from None
            needed = self.num_sharpening_draws
            if len(values) < needed or not all(
                v is not None and math.isfinite(v) and 0 < v <= SHARPENING_SIGMA_MAX for v in values
            ):
                raise HiFlowInputError(
                    "sharpening_sigma",
                    sigma,
                    f"a sequence of at least {needed} numbers > 0 and <= {SHARPENING_SIGMA_MAX:g} (one per draw)",
                )
            object.__setattr__(self, "sharpening_sigma", values)
        object.__setattr__(
            self,
            "sharpening_amount",
            _check_finite(
                "sharpening_amount", self.sharpening_amount, minimum=SHARPENING_AMOUNT_RANGE[0], maximum=SHARPENING_AMOUNT_RANGE[1]
            ),
        )
        order = as_int(self.butterworth_order)
        if order is None or not 1 <= order <= MAX_BUTTERWORTH_ORDER:
            raise HiFlowInputError("butterworth_order", self.butterworth_order, f"an integer from 1 to {MAX_BUTTERWORTH_ORDER}")
        object.__setattr__(self, "butterworth_order", order)
        msl = as_int(self.max_sequence_length)
        if msl is None or not 1 <= msl <= 512:
            raise HiFlowInputError("max_sequence_length", self.max_sequence_length, "an integer from 1 to 512")
        object.__setattr__(self, "max_sequence_length", msl)

    # -- derived ------------------------------------------------------------------------------
    @property
    def num_sharpening_draws(self) -> int:
        """How many blur sigmas a generation draws: one per stage entry, plus one per high-res
        step in pixel-upsampling mode (the official draw order)."""
        per_step = self.upsampling == "pixel"
        return sum(1 + (stage.steps if per_step else 0) for stage in self.stages)

    def replace(self, **changes: Any) -> "HiFlowConfig":
        return replace(self, **changes)

    # -- the official keyword names -----------------------------------------------------------
    @classmethod
    def from_official_kwargs(cls, params: Mapping[str, Any], **overrides: Any) -> "HiFlowConfig":
        """Build a config from the official pipeline's keyword arguments.

        Per-stage lists (`target_heights`, `target_widths`, `num_inference_steps_highres`,
        `filter_ratio`, `guidance_scale_highres`, `alphas`, `betas`, `ntk_factor`) must all have
        one entry per stage.
        """
        per_stage = {
            "target_heights": "height",
            "target_widths": "width",
            "num_inference_steps_highres": "steps",
            "guidance_scale_highres": "guidance_scale",
            "filter_ratio": "filter_ratio",
            "alphas": "alpha",
            "betas": "beta",
            "ntk_factor": "ntk_factor",
        }
        lists = {}
        for key in per_stage:
            if key not in params:
                raise HiFlowInputError(key, None, "a list with one value per high-res stage (missing)")
            value = params[key]
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise HiFlowInputError(key, value, "a list with one value per high-res stage")
            lists[key] = list(value)
        n = len(lists["target_heights"])
        for key, value in lists.items():
            if len(value) != n:
                raise HiFlowInputError(
                    key, value, f"a list of {n} values, one per high-res stage (target_heights has {n})"
                )
        stages = tuple(
            HiResStage(**{per_stage[key]: lists[key][k] for key in per_stage}) for k in range(n)
        )
        kwargs: dict[str, Any] = dict(
            height=params.get("height", 1024),
            width=params.get("width", 1024),
            num_inference_steps=params.get("num_inference_steps", 30),
            guidance_scale=params.get("guidance_scale", 3.5),
            stages=stages,
            structure_guidance=params.get("structure_guidance", "fft"),
            upsampling=params.get("upsampling_choice", "latent"),
            flow_choice=params.get("flow_choice", "v_theta"),
            swin_patchify=params.get("swin_pachify", params.get("swin_patchify", True)),
            proportional_attention=params.get("proportional_attention", True),
            text_duplication=params.get("text_duplication", False),
            sharpening_kernel_size=params.get("sharpening_kernel_size", 3),
            sharpening_sigma_range=tuple(params.get("sharpening_sigma", (0.1, 2.0))),
            sharpening_amount=params.get("sharpening_alpha", 1.0),
            max_sequence_length=params.get("max_sequence_length", 512),
        )
        kwargs.update(overrides)
        return cls(**kwargs)
