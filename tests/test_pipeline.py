"""The pipeline: same seed same output, nothing left behind, bad input and NaN caught."""

import copy
import os
import random

import numpy as np
import pytest
import torch

from hiflow_fast import HiFlowConfig, HiFlowInputError, HiFlowPipeline, HiResStage, NonFiniteLatentsError
from hiflow_fast.pipeline import StepEnd

# A small plan: 128 px base (8x8 tokens), two high-res stages, swin on, odd last stage.
SMALL = HiFlowConfig(
    height=128, width=128, num_inference_steps=4,
    stages=(HiResStage(192, 256, 2, ntk_factor=4.0), HiResStage(256, 320, 3, alpha=0.25)),
)


def _run(pipe, prompt, config=SMALL, **kwargs):
    embeds, pooled = prompt
    kwargs.setdefault("seed", 7)
    kwargs.setdefault("output_type", "latent")
    return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, config=config, progress=False, **kwargs)


def _flux_pipeline(tiny_model_dir):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler"),
        vae=AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae"),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=FluxTransformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer"),
    )


def _snapshot(pipe):
    t = pipe.transformer
    sched = pipe.scheduler
    return {
        "pos_embed": t.pos_embed,
        "pos_embed_type": type(t.pos_embed),
        "processors": dict(t.attn_processors),
        "scheduler": {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in vars(sched).items()},
        "vae_tiling": pipe.vae.use_tiling,
        "params": {k: v.clone() for k, v in t.state_dict().items()},
    }


def _assert_same(before, after):
    assert after["pos_embed"] is before["pos_embed"] and after["pos_embed_type"] is before["pos_embed_type"]
    assert after["processors"].keys() == before["processors"].keys()
    assert all(after["processors"][k] is v for k, v in before["processors"].items())
    assert after["vae_tiling"] == before["vae_tiling"]
    for k, v in before["scheduler"].items():
        w = after["scheduler"][k]
        assert (torch.equal(v, w) if torch.is_tensor(v) else v == w), k
    for k, v in before["params"].items():
        assert torch.equal(v, after["params"][k]), k


def test_wrapping_a_flux_pipeline_leaves_it_as_it_was(tiny_model_dir, tiny_prompt):
    flux = _flux_pipeline(tiny_model_dir)
    flux.scheduler.set_timesteps(5, mu=0.7)  # some user state to preserve
    before = _snapshot(flux)
    pipe = HiFlowPipeline.from_flux_pipeline(flux)
    first = _run(pipe, tiny_prompt)
    _assert_same(before, _snapshot(flux))
    second = _run(pipe, tiny_prompt)
    _assert_same(before, _snapshot(flux))
    # A second call starts exactly like the first (the official pipeline's does not).
    assert torch.equal(first.latents, second.latents)


def test_restored_even_when_the_call_fails(tiny_model_dir, tiny_prompt):
    flux = _flux_pipeline(tiny_model_dir)
    before = _snapshot(flux)
    pipe = HiFlowPipeline.from_flux_pipeline(flux)
    bad = [torch.zeros(1, 3, 64)]  # wrong shape: fails inside the first high-res stage
    with pytest.raises(HiFlowInputError, match="stage_noises"):
        _run(pipe, tiny_prompt, config=SMALL.replace(stages=SMALL.stages[:1]), stage_noises=bad)
    _assert_same(before, _snapshot(flux))


def test_same_seed_same_output_and_seeds_differ(tiny_pipe, tiny_prompt):
    a = _run(tiny_pipe, tiny_prompt, seed=11)
    b = _run(tiny_pipe, tiny_prompt, seed=11)
    c = _run(tiny_pipe, tiny_prompt, seed=12)
    assert torch.equal(a.latents, b.latents)
    assert not torch.allclose(a.latents, c.latents)
    assert a.seed == 11


def test_no_global_rng_no_files_no_prints(tiny_pipe, tiny_prompt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    _run(tiny_pipe, tiny_prompt, output_type="pil", return_stage_images=True)
    assert torch.equal(torch_state, torch.get_rng_state())
    assert py_state == random.getstate()
    assert all(np.array_equal(x, y) for x, y in zip(np_state, np.random.get_state()))
    assert os.listdir(tmp_path) == []
    assert capsys.readouterr().out == ""


def test_output_is_cropped_to_the_requested_size_unless_official_compat(tiny_pipe, tiny_prompt):
    out = _run(tiny_pipe, tiny_prompt, output_type="np", return_stage_images=True)
    assert out.images.shape == (1, 256, 320, 3)  # 3 steps: ends on the padded grid, cropped back
    assert out.latent_hw == (34, 42)  # the uncropped latents stay available
    assert [s.shape[1:3] for s in out.stage_images] == [(128, 128), (192, 256), (256, 320)]
    compat = _run(tiny_pipe, tiny_prompt, config=SMALL.replace(official_compat=True), output_type="np")
    assert compat.images.shape == (1, 272, 336, 3)
    # The crop is the centre of the official padded image, pixel for pixel.
    np.testing.assert_array_equal(out.images, compat.images[:, 8:-8, 8:-8])


def test_pil_and_pt_outputs(tiny_pipe, tiny_prompt):
    config = SMALL.replace(stages=SMALL.stages[:1])
    pil = _run(tiny_pipe, tiny_prompt, config=config, output_type="pil")
    pt = _run(tiny_pipe, tiny_prompt, config=config, output_type="pt")
    assert pil.images[0].size == (256, 192)
    assert pt.images.shape == (1, 3, 192, 256) and 0 <= pt.images.min() and pt.images.max() <= 1


def test_batch_of_two_images(tiny_pipe, tiny_prompt):
    config = SMALL.replace(stages=SMALL.stages[:1])
    out = _run(tiny_pipe, tiny_prompt, config=config, num_images_per_prompt=2)
    assert out.latents.shape[0] == 2
    assert not torch.equal(out.latents[0], out.latents[1])


@pytest.mark.parametrize(
    "overrides",
    [
        dict(structure_guidance="dwt"),
        dict(upsampling="pixel", sharpening_sigma=1.0),
        dict(swin_patchify=False),
        dict(text_duplication=True, proportional_attention=False),
    ],
    ids=["dwt", "pixel", "no-swin", "text-dup-no-proportional"],
)
def test_every_mode_runs_and_stays_finite(tiny_pipe, tiny_prompt, overrides):
    out = _run(tiny_pipe, tiny_prompt, config=SMALL.replace(**overrides))
    assert torch.isfinite(out.latents).all()


def test_a_stage_longer_than_the_previous_reads_older_references(tiny_pipe, tiny_prompt):
    # Stage 2 runs timesteps stage 1 never ran: their reference comes from the base stage.
    config = SMALL.replace(stages=(HiResStage(192, 192, 1), HiResStage(256, 256, 3)))
    seen = []
    _run(tiny_pipe, tiny_prompt, config=config, callback=lambda e: seen.append((type(e).__name__, e.stage)))
    assert seen.count(("StepEnd", 2)) == 3


def test_nan_in_given_latents_is_detected(tiny_pipe, tiny_prompt):
    noise = torch.randn(1, 16, 16, 16)
    noise[0, 3, 4, 5] = float("nan")
    with pytest.raises(NonFiniteLatentsError, match="base noise"):
        _run(tiny_pipe, tiny_prompt, latents=noise)


def test_nan_produced_by_the_model_is_detected(tiny_model_dir, tiny_prompt):
    pipe = HiFlowPipeline.from_pretrained(tiny_model_dir, load_text_encoders=False)
    with torch.no_grad():
        pipe.transformer.proj_out.bias[0] = float("nan")
    with pytest.raises(NonFiniteLatentsError, match="after step 1 of 4 of the base stage"):
        _run(pipe, tiny_prompt)


def test_nan_in_prompt_embeds_is_rejected(tiny_pipe, tiny_prompt):
    embeds, pooled = tiny_prompt
    bad = embeds.clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(HiFlowInputError, match="prompt_embeds"):
        _run(tiny_pipe, (bad, pooled))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(output_type="jpeg"), "output_type"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(seed=-1), "seed"),
        (dict(latents=torch.zeros(1, 16, 8, 8)), "latents"),
        (dict(stage_noises=[torch.zeros(1)]), "stage_noises"),
        (dict(attention="no-such-backend"), "attention"),
    ],
)
def test_bad_call_arguments(tiny_pipe, tiny_prompt, kwargs, field):
    with pytest.raises(HiFlowInputError, match=field):
        _run(tiny_pipe, tiny_prompt, **kwargs)


def test_prompt_needs_text_encoders(tiny_pipe):
    with pytest.raises(HiFlowInputError, match="prompt"):
        tiny_pipe("a cat", config=SMALL, seed=1, progress=False)


def test_prompt_embeds_shape_is_checked(tiny_pipe, tiny_prompt):
    embeds, pooled = tiny_prompt
    with pytest.raises(HiFlowInputError, match="prompt_embeds"):
        _run(tiny_pipe, (embeds[..., :8], pooled))
    with pytest.raises(HiFlowInputError, match="pooled_prompt_embeds"):
        _run(tiny_pipe, (embeds, pooled[:, :8]))


def test_prompt_goes_through_the_wrapped_pipelines_encoder(tiny_model_dir, tiny_prompt):
    # Real CLIP/T5 encoders cannot be built offline here; the wrapped pipeline's encode_prompt
    # stands in for them, and must be called with the prompt, the device and the batch size.
    flux = _flux_pipeline(tiny_model_dir)
    embeds, pooled = tiny_prompt
    calls = []

    def encode_prompt(prompt, prompt_2, device, num_images_per_prompt, max_sequence_length):
        calls.append((prompt, num_images_per_prompt, max_sequence_length))
        return embeds.repeat(num_images_per_prompt, 1, 1), pooled.repeat(num_images_per_prompt, 1), None

    flux.text_encoder = object()
    flux.encode_prompt = encode_prompt
    pipe = HiFlowPipeline.from_flux_pipeline(flux)
    config = SMALL.replace(stages=SMALL.stages[:1], max_sequence_length=77)
    by_prompt = pipe("a cat", config=config, seed=3, num_images_per_prompt=2, output_type="latent", progress=False)
    by_embeds = _run(pipe, (embeds.repeat(2, 1, 1), pooled.repeat(2, 1)), config=config, seed=3)
    assert calls == [("a cat", 2, 77)]
    assert torch.equal(by_prompt.latents, by_embeds.latents)


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_folded_swin_moves_equal_separate_copies(tiny_pipe, tiny_prompt, backend):
    # Without a callback the step writes straight onto the next swin grid; with one, the
    # pad/crop is a separate copy. Both are exact, so the latents must be identical.
    config = SMALL.replace(stages=(HiResStage(192, 192, 3),))
    folded = _run(tiny_pipe, tiny_prompt, config=config, backend=backend)
    seen = []
    separate = _run(tiny_pipe, tiny_prompt, config=config, backend=backend, callback=lambda e: seen.append(e))
    assert torch.equal(folded.latents, separate.latents)
    assert [e.hw for e in seen if isinstance(e, StepEnd) and e.stage == 1] == [(26, 26), (24, 24), (26, 26)]
