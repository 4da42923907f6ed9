"""Bad input to the Python API: HiFlowInputError / HiFlowModelError naming the argument, raised
before any weights are read (from_pretrained) or any denoising step runs (a call), and nothing
written."""

import math
import os
import shutil

import numpy as np
import pytest
import torch

from hiflow_fast import HiFlowConfig, HiFlowInputError, HiFlowModelError, HiFlowPipeline, HiResStage
from hiflow_fast.config import MAX_PIXELS

SMALL = HiFlowConfig(height=128, width=128, num_inference_steps=3, stages=(HiResStage(192, 192, 2),))


# ---- HiFlowConfig / HiResStage ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(stages=None), "stages"),
        (dict(stages="192x192"), "stages"),
        (dict(stages=[dict(height=192, width=192, steps=2)]), "stages[0]"),
        (dict(height=100000, width=100000), "height"),
        (dict(height=16000, width=16000), "height/width"),
        (dict(height=0), "height"),
        (dict(height=np.float64(128.0)), "height"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=10**6), "num_inference_steps"),
        (dict(guidance_scale=math.nan), "guidance_scale"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(guidance_scale=1e12), "guidance_scale"),
        (dict(sharpening_sigma="wide"), "sharpening_sigma"),
        (dict(sharpening_sigma=0.0), "sharpening_sigma"),
        (dict(sharpening_sigma=math.inf), "sharpening_sigma"),
        (dict(sharpening_amount=-1.0), "sharpening_amount"),
        (dict(butterworth_order=0), "butterworth_order"),
        (dict(max_sequence_length=1000), "max_sequence_length"),
        (dict(structure_guidance="wavelet"), "structure_guidance"),
        (dict(upsampling="nearest"), "upsampling"),
        (dict(swin_patchify="yes"), "swin_patchify"),
    ],
)
def test_bad_config(kwargs, field):
    base = dict(height=128, width=128, num_inference_steps=3, stages=(HiResStage(192, 192, 2),))
    with pytest.raises(HiFlowInputError) as info:
        HiFlowConfig(**{**base, **kwargs})
    assert info.value.field == field


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(alpha=5.0), "alpha"), (dict(alpha=-3.0), "alpha"), (dict(alpha=math.nan), "alpha"),
        (dict(beta=100.0), "beta"), (dict(beta=-0.5), "beta"), (dict(beta=math.inf), "beta"),
        (dict(filter_ratio=5.0), "filter_ratio"), (dict(filter_ratio=-0.1), "filter_ratio"),
        (dict(ntk_factor=0.0), "ntk_factor"), (dict(ntk_factor=0.5), "ntk_factor"), (dict(ntk_factor=1e12), "ntk_factor"),
        (dict(guidance_scale=-1.0), "guidance_scale"), (dict(steps=0), "steps"), (dict(steps=2.0), "steps"),
        (dict(height=30000), "height"),
    ],
)
def test_bad_stage(kwargs, field):
    stage = dict(height=192, width=192, steps=2)
    with pytest.raises(HiFlowInputError) as info:
        HiFlowConfig(height=128, width=128, num_inference_steps=3, stages=(HiResStage(**{**stage, **kwargs}),))
    assert info.value.field == f"stages[0].{field}"
    assert "high-res stage 1 of 1" in str(info.value)


def test_numpy_scalars_are_numbers():
    config = HiFlowConfig(
        height=np.int64(128), width=np.int32(128), num_inference_steps=np.int64(3), guidance_scale=np.float32(3.5),
        stages=(HiResStage(np.int64(192), np.int64(192), np.int16(2), alpha=np.float64(0.5)),),
    )
    assert type(config.height) is int and type(config.stages[0].steps) is int and type(config.stages[0].alpha) is float
    assert config.stages[0].alpha == 0.5 and config.height == 128


def test_ranges_accept_their_ends():
    stage = HiResStage(192, 192, 2, alpha=0.0, beta=1.0, filter_ratio=math.sqrt(2.0), ntk_factor=1.0, guidance_scale=0.0)
    HiFlowConfig(height=128, width=128, num_inference_steps=3, stages=(stage,))
    HiFlowConfig(height=8192, width=16384, num_inference_steps=3, stages=())
    assert 8192 * 16384 == MAX_PIXELS


# ---- from_pretrained: checked before any weights are read -------------------------------------


@pytest.fixture
def no_weights_read(monkeypatch):
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read: the bad input was not caught up front")

    for name in ("FluxTransformer2DModel", "AutoencoderKL", "FlowMatchEulerDiscreteScheduler"):
        monkeypatch.setattr(getattr(diffusers, name), "from_pretrained", classmethod(refuse))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(device="gpu"), "device"),
        (dict(device="foo"), "device"),
        (dict(device="cuda:99"), "device"),
        (dict(device=0.5), "device"),
        (dict(torch_dtype="garbage"), "torch_dtype"),
        (dict(torch_dtype=torch.int8), "torch_dtype"),
        (dict(torch_dtype=torch.float64), "torch_dtype"),
        (dict(load_text_encoders="yes"), "load_text_encoders"),
        (dict(memory_budget="lots"), "memory_budget"),
        (dict(memory_budget=-1), "memory_budget"),
        (dict(memory_budget=float("nan")), "memory_budget"),
    ]
    + ([] if torch.cuda.is_available() else [(dict(device="cuda"), "device")]),
)
def test_bad_from_pretrained_arguments(tiny_model_dir, no_weights_read, kwargs, field):
    with pytest.raises(HiFlowInputError) as info:
        HiFlowPipeline.from_pretrained(tiny_model_dir, **kwargs)
    assert info.value.field == field


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def _truncate(folder):
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _pickle_only(folder):
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "transformer" / "diffusion_pytorch_model.bin")


def _no_scheduler(folder):
    shutil.rmtree(folder / "scheduler")


def _bad_config(folder):
    (folder / "vae" / "config.json").write_text("[1, 2")


@pytest.mark.parametrize(
    "damage, words",
    [(_truncate, "truncated"), (_pickle_only, "pickled"), (_no_scheduler, "scheduler/"), (_bad_config, "JSON")],
)
def test_broken_model_folder(model_copy, no_weights_read, damage, words):
    damage(model_copy)
    with pytest.raises(HiFlowModelError, match=words):
        HiFlowPipeline.from_pretrained(model_copy)


def test_missing_model_folder(tmp_path, no_weights_read):
    with pytest.raises(HiFlowModelError, match="does not exist"):
        HiFlowPipeline.from_pretrained(tmp_path / "none")


# ---- a call: checked before any denoising step ----------------------------------------------


@pytest.fixture
def pipe(tiny_pipe, monkeypatch, tmp_path):
    """The tiny pipeline with a transformer that fails the test if it runs; cwd is an empty folder."""

    def refuse(*args, **kwargs):
        raise AssertionError("the transformer ran: the bad input was not caught up front")

    monkeypatch.setattr(tiny_pipe.transformer, "forward", refuse)
    monkeypatch.chdir(tmp_path)
    yield tiny_pipe
    assert os.listdir(tmp_path) == []


def _call(pipe, embeddings, **kwargs):
    embeds, pooled = embeddings
    args = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, config=SMALL, seed=1, progress=False, output_type="latent")
    args.update(kwargs)
    return pipe(**args)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(config=dict(height=128, width=128)), "config"),
        (dict(callback=5), "callback"),
        (dict(compile="yes"), "compile"),
        (dict(progress="no"), "progress"),
        (dict(return_stage_images=1), "return_stage_images"),
        (dict(generator=torch.Generator().manual_seed(3)), "generator"),  # with seed=1
        (dict(seed=None, generator=5), "generator"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**63), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(num_images_per_prompt=1.0), "num_images_per_prompt"),
        (dict(num_images_per_prompt=10**6), "num_images_per_prompt"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(backend="foo"), "backend"),
        (dict(backend="gpu"), "backend"),
        (dict(attention="foo"), "attention"),
        (dict(latents=np.zeros((1, 16, 16, 16), dtype=np.float32)), "latents"),
        (dict(latents=torch.zeros(1, 16, 8, 8)), "latents"),
        (dict(stage_noises=torch.zeros(1, 2, 3)), "stage_noises"),
        (dict(stage_noises=[torch.zeros(1, 2, 3)]), "stage_noises[0]"),
        (dict(stage_noises=[]), "stage_noises"),
        (dict(memory_budget="1TiB-ish"), "memory_budget"),
        (dict(memory_budget="64GiB", lossy="int4"), "lossy"),
        (dict(memory_budget="64GiB", lossy=True), "lossy"),
        (dict(lossy="fp8"), "lossy"),  # no budget: a lossy plan is a memory plan
        (dict(memory_budget="64GiB", lossy="fp8", compile=True), "compile"),
    ],
)
def test_bad_call_argument(pipe, tiny_prompt, kwargs, field):
    with pytest.raises(HiFlowInputError) as info:
        _call(pipe, tiny_prompt, **kwargs)
    assert info.value.field == field


def _embeds(tiny_prompt, which, change):
    embeds, pooled = tiny_prompt
    if which == "prompt_embeds":
        return change(embeds), pooled
    return embeds, change(pooled)


@pytest.mark.parametrize(
    "which, change, field",
    [
        ("prompt_embeds", lambda t: t.numpy(), "prompt_embeds"),
        ("pooled_prompt_embeds", lambda t: t.numpy(), "pooled_prompt_embeds"),
        ("prompt_embeds", lambda t: t.to(torch.int64), "prompt_embeds"),
        ("prompt_embeds", lambda t: t.index_fill(2, torch.tensor([0]), math.nan), "prompt_embeds"),
        ("pooled_prompt_embeds", lambda t: t * math.inf, "pooled_prompt_embeds"),
        ("prompt_embeds", lambda t: t.repeat(1, 17, 1), "prompt_embeds"),  # 544 > 512 tokens
        ("prompt_embeds", lambda t: t[0], "prompt_embeds"),
        ("pooled_prompt_embeds", lambda t: None, "pooled_prompt_embeds"),
        ("pooled_prompt_embeds", lambda t: t[:, :8], "pooled_prompt_embeds"),
        ("pooled_prompt_embeds", lambda t: torch.cat([t, t]), "pooled_prompt_embeds"),
    ],
    ids=["numpy", "numpy-pooled", "int", "nan", "inf-pooled", "too-long", "2d", "missing-pooled", "pooled-dim", "pooled-batch"],
)
def test_bad_prompt_embeds(pipe, tiny_prompt, which, change, field):
    embeds, pooled = _embeds(tiny_prompt, which, change)
    with pytest.raises(HiFlowInputError) as info:
        _call(pipe, (embeds, pooled))
    assert info.value.field == field
    assert "tensor(" not in str(info.value)  # no tensor dumped into the message


def test_prompt_must_be_text(pipe, tiny_prompt):
    with pytest.raises(HiFlowInputError) as info:
        _call(pipe, (None, None), prompt=5)
    assert info.value.field == "prompt"


def test_max_sequence_length_of_the_config_bounds_the_embeddings(pipe, tiny_prompt):
    with pytest.raises(HiFlowInputError, match="max_sequence_length=16"):
        _call(pipe, tiny_prompt, config=SMALL.replace(max_sequence_length=16))


# ---- accepted: numpy integers, generator alone --------------------------------------------------


def test_numpy_integers_and_a_generator_alone_are_accepted(tiny_pipe, tiny_prompt):
    config = HiFlowConfig(height=64, width=64, num_inference_steps=2, stages=())
    out = _call(tiny_pipe, tiny_prompt, config=config, seed=np.int64(5), num_images_per_prompt=np.int32(1))
    again = _call(tiny_pipe, tiny_prompt, config=config, seed=None, generator=torch.Generator().manual_seed(5))
    assert out.seed == again.seed == 5
    torch.testing.assert_close(out.latents, again.latents, rtol=0, atol=0)


# ---- failures that can only show up mid-run name their stage ---------------------------------


def test_out_of_memory_names_the_stage(tiny_pipe, tiny_prompt, monkeypatch):
    from hiflow_fast import StageOutOfMemoryError

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")

    monkeypatch.setattr(tiny_pipe, "_run_highres_stage", out_of_memory)
    with pytest.raises(StageOutOfMemoryError, match=r"high-res stage 1 of 1 \(192x192\).*Tried to allocate 20.00 GiB"):
        _call(tiny_pipe, tiny_prompt)


def test_cpu_allocation_failure_in_the_base_stage_is_out_of_memory(tiny_pipe, tiny_prompt, monkeypatch):
    from hiflow_fast import StageOutOfMemoryError

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes.")

    monkeypatch.setattr(tiny_pipe, "_run_base_stage", out_of_memory)
    with pytest.raises(StageOutOfMemoryError, match=r"the base stage \(128x128\) on cpu"):
        _call(tiny_pipe, tiny_prompt)
