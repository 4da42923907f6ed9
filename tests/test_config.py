"""HiFlowConfig validation: every bad setting names itself, its value and what is allowed."""

import pytest

from hiflow_fast import HiFlowConfig, HiFlowInputError, HiResStage
from hiflow_fast.config import SIZE_MULTIPLE

OFFICIAL = {
    "height": 256, "width": 256, "num_inference_steps": 8, "guidance_scale": 3.5,
    "target_heights": [512, 1024], "target_widths": [512, 1024], "num_inference_steps_highres": [4, 3],
    "filter_ratio": [0.2, 0.2], "guidance_scale_highres": [4.5, 6.0], "structure_guidance": "fft",
    "alphas": [1.0, 0.25], "betas": [0.5, 0.5], "upsampling_choice": "latent", "flow_choice": "v_theta",
    "ntk_factor": [10.0, 10.0], "proportional_attention": True, "text_duplication": False, "swin_pachify": True,
}


def test_official_kwargs_round_trip():
    config = HiFlowConfig.from_official_kwargs(OFFICIAL)
    assert [(s.height, s.width, s.steps) for s in config.stages] == [(512, 512, 4), (1024, 1024, 3)]
    assert config.stages[1].alpha == 0.25 and config.stages[1].guidance_scale == 6.0
    assert config.swin_patchify and config.upsampling == "latent"
    assert config.num_sharpening_draws == 2
    assert HiFlowConfig.from_official_kwargs(dict(OFFICIAL, upsampling_choice="pixel")).num_sharpening_draws == 2 + 4 + 3


def test_defaults_are_the_official_plan():
    config = HiFlowConfig()
    assert (config.height, config.num_inference_steps) == (1024, 30)
    assert [(s.height, s.steps, s.guidance_scale, s.alpha, s.beta, s.ntk_factor) for s in config.stages] == [
        (2048, 16, 4.5, 1.0, 0.5, 10.0), (4096, 10, 6.0, 0.25, 0.5, 10.0)
    ]


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(height=250), "height"),
        (dict(width=0), "width"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(target_heights=[512, 1000]), "stages[1].height"),
        (dict(target_heights=[512, 384], target_widths=[512, 384]), "grows"),
        (dict(target_heights=[256, 1024], target_widths=[256, 1024]), "stages[0]"),
        (dict(num_inference_steps_highres=[9, 3]), "at most num_inference_steps"),
        (dict(num_inference_steps_highres=[4]), "num_inference_steps_highres"),
        (dict(alphas=[1.0]), "alphas"),
        (dict(ntk_factor=[10.0, 0.0]), "ntk_factor"),
        (dict(filter_ratio=[0.2, -1.0]), "filter_ratio"),
        (dict(betas=[0.5, float("nan")]), "beta"),
        (dict(structure_guidance="wavelet"), "structure_guidance"),
        (dict(upsampling_choice="nearest"), "upsampling"),
        (dict(flow_choice="x0"), "flow_choice"),
        (dict(swin_pachify="yes"), "swin_patchify"),
        (dict(sharpening_kernel_size=4), "sharpening_kernel_size"),
        (dict(sharpening_sigma=(2.0, 1.0)), "sharpening_sigma_range"),
    ],
)
def test_bad_settings(change, field):
    with pytest.raises(HiFlowInputError, match=field.replace("[", r"\[").replace("]", r"\]")) as info:
        HiFlowConfig.from_official_kwargs(dict(OFFICIAL, **change))
    assert "is not allowed" in str(info.value)


def test_explicit_sharpening_sigmas():
    assert HiFlowConfig.from_official_kwargs(OFFICIAL, sharpening_sigma=1.5).sharpening_sigma == 1.5
    assert HiFlowConfig.from_official_kwargs(OFFICIAL, sharpening_sigma=[1.0, 2.0]).sharpening_sigma == (1.0, 2.0)
    with pytest.raises(HiFlowInputError, match="one per draw"):
        HiFlowConfig.from_official_kwargs(OFFICIAL, sharpening_sigma=[1.0])
    with pytest.raises(HiFlowInputError, match="sharpening_sigma"):
        HiFlowConfig.from_official_kwargs(OFFICIAL, sharpening_sigma="random")


def test_sizes_must_be_multiples_of_16():
    with pytest.raises(HiFlowInputError, match=f"multiple of {SIZE_MULTIPLE}"):
        HiResStage(1000, 1024, 4).validate(0)
