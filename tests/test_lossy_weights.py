"""LOSSY fp8 plans applied per call (hiflow_fast.lossy_weights): the arithmetic is a plain
PyTorch reference's (block weights rounded through float8_e4m3fn), the bytes are the planner's,
the result is named lossy, and nothing is left on the transformer afterwards."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from hiflow_fast import HiFlowConfig, HiFlowInputError, HiFlowPipeline, HiResStage
from hiflow_fast.block_streaming import transformer_blocks
from hiflow_fast.lossy_weights import Fp8BlockWeights, check_blocks_unhooked
from hiflow_fast.memory_plan import DTYPE_BYTES, TransformerShape

SMALL = HiFlowConfig(height=128, width=160, num_inference_steps=3,
                     stages=(HiResStage(160, 208, 2, ntk_factor=4.0), HiResStage(192, 240, 2, alpha=0.25)))
# Two configs unlike the tiny model's (guidance on and off, other widths).
CONFIGS = [
    dict(num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=3, in_channels=64,
         joint_attention_dim=48, pooled_projection_dim=40, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    dict(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2, in_channels=16,
         joint_attention_dim=24, pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(8, 12, 12)),
]


def _model(config, dtype, seed):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**config).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # every value from the private generator (and none zero-initialised)
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _inputs(model, dtype, seed, batch=2, rows=5, cols=7, text=13):
    cfg = model.config
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return dict(
        hidden_states=torch.randn(batch, rows * cols, cfg.in_channels, generator=gen).to(dtype),
        encoder_hidden_states=torch.randn(batch, text, cfg.joint_attention_dim, generator=gen).to(dtype),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=gen).to(dtype),
        timestep=torch.full([batch], 0.6, dtype=dtype),
        guidance=torch.full([batch], 3.5, dtype=dtype) if cfg.guidance_embeds else None,
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )


def _reference_fp8(model):
    """Plain PyTorch: a copy whose block Linear layers (not the ones named *norm*) hold their
    weight and bias rounded through float8_e4m3fn."""
    reference = copy.deepcopy(model)
    for block_list in ("transformer_blocks", "single_transformer_blocks"):
        for name, module in getattr(reference, block_list).named_modules():
            if type(module) is torch.nn.Linear and "norm" not in name:
                for p in module.parameters(recurse=False):
                    p.data = p.data.to(torch.float8_e4m3fn).to(p.dtype)
    return reference


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 0.0), (torch.bfloat16, 0.0)])
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_fp8_blocks_compute_what_the_reference_computes(config, dtype, tol):
    model = _model(CONFIGS[config], dtype, seed=config)
    inputs = _inputs(model, dtype, seed=config)
    with torch.no_grad():
        exact = model(**inputs)[0]
        expected = _reference_fp8(model)(**inputs)[0]
        with Fp8BlockWeights(model, dtype):
            lossy = model(**inputs)[0]
    # Same rounded values, same ops: equal (tol 0 for both dtypes), and clearly not the exact run.
    assert torch.allclose(lossy.float(), expected.float(), rtol=0, atol=tol)
    assert (lossy.float() - exact.float()).norm() > 1e-3 * exact.float().norm()


@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_fp8_block_bytes_are_the_planners(config):
    dtype = torch.bfloat16
    model = _model(CONFIGS[config], dtype, seed=3)
    shape = TransformerShape.from_config(CONFIGS[config])
    with Fp8BlockWeights(model, dtype):
        counted = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in transformer_blocks(model)]
    assert counted == shape.block_bytes(DTYPE_BYTES["bfloat16"], "fp8")
    assert counted != shape.block_bytes(DTYPE_BYTES["bfloat16"])


def test_nothing_is_left_on_the_transformer():
    model = _model(CONFIGS[0], torch.float32, seed=4)
    before = {name: (p, p.data_ptr(), p.data.clone()) for name, p in model.named_parameters()}
    inputs = _inputs(model, torch.float32, seed=4)
    with torch.no_grad():
        exact = model(**inputs)[0]
        with Fp8BlockWeights(model, torch.float32) as weights:
            model(**inputs)
            assert any(p.dtype == torch.float8_e4m3fn for p in model.parameters())
        assert not weights.applied
        again = model(**inputs)[0]
    for name, p in model.named_parameters():
        param, ptr, values = before[name]
        assert p is param and p.data_ptr() == ptr and torch.equal(p.data, values), name
    for module in model.modules():
        assert not hasattr(module, "_diffusers_hook") and "forward" not in vars(module)
    assert torch.equal(again, exact)


def test_an_apply_that_fails_halfway_leaves_no_hook(monkeypatch):
    """diffusers fails while hooking the third layer: the two layers it had hooked are cleaned
    up too, and every weight is back."""
    from diffusers.hooks.hooks import HookRegistry

    model = _model(CONFIGS[0], torch.float32, seed=6)
    before = {name: p.data.clone() for name, p in model.named_parameters()}
    register = HookRegistry.register_hook
    calls = []

    def third_fails(self, hook, name):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("hook install failed")
        return register(self, hook, name)

    monkeypatch.setattr(HookRegistry, "register_hook", third_fails)
    with pytest.raises(RuntimeError, match="hook install failed"):
        Fp8BlockWeights(model, torch.float32).apply()
    assert len(calls) == 3
    for module in model.modules():
        assert not getattr(getattr(module, "_diffusers_hook", None), "hooks", None) and "forward" not in vars(module)
    for name, p in model.named_parameters():
        assert torch.equal(p.data, before[name]), name


def test_blocks_already_hooked_are_refused():
    model = _model(CONFIGS[1], torch.bfloat16, seed=5)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    with pytest.raises(HiFlowInputError) as info:
        check_blocks_unhooked(model)
    assert info.value.field == "lossy"


# ---- through the pipeline --------------------------------------------------------------------


def _run(pipe, prompt, **kwargs):
    embeds, pooled = prompt
    return pipe(prompt_embeds=embeds.repeat(2, 1, 1), pooled_prompt_embeds=pooled.repeat(2, 1), config=SMALL, seed=11,
                output_type="latent", progress=False, **kwargs)


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_a_lossy_call_is_named_measured_and_undone(tiny_pipe, tiny_model_dir, tiny_prompt, caplog):
    transformer = tiny_pipe.transformer
    before = {name: (p.data_ptr(), p.data.clone()) for name, p in transformer.named_parameters()}
    exact = _run(tiny_pipe, tiny_prompt)
    with caplog.at_level(logging.WARNING, logger="hiflow_fast.lossy_weights"):
        lossy = _run(tiny_pipe, tiny_prompt, memory_budget="64GiB", lossy="fp8")
    assert lossy.memory_plan == "lossy-fp8" and exact.memory_plan is None and "LOSSY" in caplog.text
    error = rel_l2(lossy.latents, exact.latents)
    assert 1e-4 < error < 0.1, error  # a different result, but the same image's neighbourhood
    for name, p in transformer.named_parameters():
        assert p.data_ptr() == before[name][0] and torch.equal(p.data, before[name][1]), name
    assert not any(hasattr(m, "_diffusers_hook") for m in transformer.modules())
    assert torch.equal(_run(tiny_pipe, tiny_prompt).latents, exact.latents)
    # A pipeline loaded with a budget (blocks in host memory) applies the same casts.
    host = HiFlowPipeline.from_pretrained(tiny_model_dir, load_text_encoders=False, memory_budget="64GiB")
    assert torch.equal(_run(host, tiny_prompt, lossy="fp8").latents, lossy.latents)
