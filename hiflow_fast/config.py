"""The HiFlow stage plan and every knob of the official implementation, validated once.

`HiFlowConfig` is immutable. Build it directly, or from the official pipeline's keyword
names with `HiFlowConfig.from_official_kwargs` (the golden cases' `params` use those names,
including the official spelling `swin_pachify`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence, Union

from .errors import HiFlowInputError

# A latent pixel is 8 image pixels and Flux packs 2x2 latent pixels into one token, so every
# image side must be a multiple of 16 for the token grid to be whole.
SIZE_MULTIPLE = 16

STRUCTURE_GUIDANCE = ("fft", "dwt")
UPSAMPLING = ("latent", "pixel")
FLOW_CHOICES = ("v_theta",)

SharpeningSigma = Union[float, Sequence[float], str]


def _check_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % SIZE_MULTIPLE:
        raise HiFlowInputError(name, value, f"a positive integer multiple of {SIZE_MULTIPLE} (image pixels)")
    return value


def _check_finite(name: str, value: Any, *, minimum: float | None = None, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HiFlowInputError(name, value, "a finite number")
    if positive and value <= 0:
        raise HiFlowInputError(name, value, "a number > 0")
    if minimum is not None and value < minimum:
        raise HiFlowInputError(name, value, f"a number >= {minimum}")
    return float(value)


def _check_steps(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HiFlowInputError(name, value, "an integer >= 1")
    return value


@dataclass(frozen=True)
class HiResStage:
    """One high-resolution stage: its target size and the guidance it runs with.

    `alpha` and `beta` are the stage's starting weights; both decay linearly within the stage,
    alpha_i = alpha * (steps - i) / steps, as in the official code.
    """

    height: int
    width: int
    steps: int
    guidance_scale: float = 4.5
    filter_ratio: float = 0.2
    alpha: float = 1.0
    beta: float = 0.5
    ntk_factor: float = 10.0

    def validate(self, index: int) -> None:
        where = f"stages[{index}]"
        _check_size(f"{where}.height", self.height)
        _check_size(f"{where}.width", self.width)
        _check_steps(f"{where}.steps", self.steps)
        _check_finite(f"{where}.guidance_scale", self.guidance_scale)
        _check_finite(f"{where}.filter_ratio", self.filter_ratio, minimum=0.0)
        _check_finite(f"{where}.alpha", self.alpha)
        _check_finite(f"{where}.beta", self.beta)
        _check_finite(f"{where}.ntk_factor", self.ntk_factor, positive=True)


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
        object.__setattr__(self, "stages", tuple(self.stages))
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        _check_size("height", self.height)
        _check_size("width", self.width)
        _check_steps("num_inference_steps", self.num_inference_steps)
        _check_finite("guidance_scale", self.guidance_scale)
        prev_h, prev_w = self.height, self.width
        for k, stage in enumerate(self.stages):
            if not isinstance(stage, HiResStage):
                raise HiFlowInputError(f"stages[{k}]", stage, "a HiResStage")
            stage.validate(k)
            if stage.height < prev_h or stage.width < prev_w or stage.height * stage.width <= prev_h * prev_w:
                raise HiFlowInputError(
                    f"stages[{k}].height/width",
                    (stage.height, stage.width),
                    f"a size that grows from the previous stage's {prev_h}x{prev_w} "
                    "(no side may shrink and the area must increase)",
                )
            if stage.steps > self.num_inference_steps:
                raise HiFlowInputError(
                    f"stages[{k}].steps",
                    stage.steps,
                    f"at most num_inference_steps={self.num_inference_steps}: a high-res stage runs "
                    "the last `steps` timesteps of the base schedule",
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
        k = self.sharpening_kernel_size
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise HiFlowInputError("sharpening_kernel_size", k, "a positive odd integer")
        lo_hi = self.sharpening_sigma_range
        if (
            not isinstance(lo_hi, (tuple, list))
            or len(lo_hi) != 2
            or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in lo_hi)
            or lo_hi[0] > lo_hi[1]
        ):
            raise HiFlowInputError("sharpening_sigma_range", lo_hi, "(low, high) with 0 < low <= high")
        object.__setattr__(self, "sharpening_sigma_range", (float(lo_hi[0]), float(lo_hi[1])))
        sigma = self.sharpening_sigma
        if isinstance(sigma, str):
            if sigma != "seeded":
                raise HiFlowInputError("sharpening_sigma", sigma, "'seeded', a number > 0 or a sequence of them")
        elif isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
            _check_finite("sharpening_sigma", sigma, positive=True)
        else:
            try:
                values = tuple(float(v) for v in sigma)
            except TypeError:
                raise HiFlowInputError("sharpening_sigma", sigma, "'seeded', a number > 0 or a sequence of them") from None
            needed = self.num_sharpening_draws
            if len(values) < needed or not all(math.isfinite(v) and v > 0 for v in values):
                raise HiFlowInputError(
                    "sharpening_sigma", sigma, f"a sequence of at least {needed} positive numbers (one per draw)"
                )
            object.__setattr__(self, "sharpening_sigma", values)
        _check_finite("sharpening_amount", self.sharpening_amount)
        if isinstance(self.butterworth_order, bool) or not isinstance(self.butterworth_order, int) or self.butterworth_order < 1:
            raise HiFlowInputError("butterworth_order", self.butterworth_order, "an integer >= 1")
        msl = self.max_sequence_length
        if isinstance(msl, bool) or not isinstance(msl, int) or not 1 <= msl <= 512:
            raise HiFlowInputError("max_sequence_length", msl, "an integer from 1 to 512")

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
