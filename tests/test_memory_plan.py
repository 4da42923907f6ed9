"""The memory planner (hiflow_fast.memory_plan): budgets parsed or refused, plans monotone in the
budget, the minimum stated, parameter counts equal to diffusers' modules."""

from __future__ import annotations

import pytest
import torch

from hiflow_fast.errors import HiFlowInputError
from hiflow_fast.memory_plan import (
    FLUX_DEV,
    GIB,
    OFFICIAL_STAGES,
    TransformerShape,
    minimum_budget,
    parse_budget,
    plan_memory,
    stage_specs,
)


@pytest.mark.parametrize(
    "text, expected",
    [("12GiB", 12 * GIB), ("12gib", 12 * GIB), ("12GB", 12 * 10**9), ("12", 12 * GIB), (" 7.5 GiB", int(7.5 * GIB)),
     ("512MiB", 512 * 2**20), ("100MB", 10**8), (12, 12 * GIB), (0.5, GIB // 2)],
)
def test_budgets_parse(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("bad", ["", "twelve", "12TB", "-3GiB", "0", "GiB", "12 GiB GiB", None, True, float("nan"), -1, [12]])
def test_unparsable_budgets_are_refused_naming_the_field(bad):
    with pytest.raises(HiFlowInputError) as info:
        parse_budget(bad, field="--memory-budget")
    assert info.value.field == "--memory-budget"
    assert "12GiB" in str(info.value) or "auto" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal of 'auto'")
def test_auto_needs_a_gpu():
    with pytest.raises(HiFlowInputError, match="CUDA"):
        parse_budget("auto")


def _meta_counts(config):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    blocks = [count(b) for b in list(model.transformer_blocks) + list(model.single_transformer_blocks)]
    return blocks, count(model) - sum(blocks)


@pytest.mark.parametrize(
    "config",
    [
        dict(num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=3, in_channels=64,
             joint_attention_dim=48, pooled_projection_dim=40, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
        dict(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2, in_channels=16,
             joint_attention_dim=24, pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(8, 12, 12)),
    ],
)
def test_parameter_counts_match_diffusers_modules(config):
    blocks, other = _meta_counts(config)
    shape = TransformerShape.from_config(config)
    assert shape.block_params() == blocks
    assert shape.other_params() == other


def test_flux_dev_is_11_9_billion_parameters():
    assert 11.8e9 < FLUX_DEV.total_params() < 12.0e9


def test_everything_resident_when_the_budget_is_large():
    plan = plan_memory("200GiB")
    assert plan.exact and plan.name == "exact-bfloat16"
    for stage in plan.stages:
        assert len(stage.resident_blocks) == 57 and not stage.streamed_blocks and stage.cuda_graphs
    assert not plan.streams


def test_smaller_budgets_keep_fewer_block_bytes_resident():
    sizes = FLUX_DEV.block_params()
    previous = None
    for gib in (48, 32, 24, 16, 12, 10, 8, 6):
        plan = plan_memory(f"{gib}GiB")
        resident = [sum(sizes[i] for i in s.resident_blocks) for s in plan.stages]
        assert plan.peak_bytes <= gib * GIB
        if previous is not None:
            assert all(now <= before for now, before in zip(resident, previous))
        previous = resident
        for s in plan.stages:
            assert sorted(s.resident_blocks + s.streamed_blocks) == list(range(57))
            assert s.cuda_graphs == (not s.streamed_blocks)
    # The 4K stage streams under 8 GiB while the 1K stage keeps more blocks.
    small = plan_memory("8GiB")
    assert small.stages[2].streamed_blocks
    assert sum(sizes[i] for i in small.stages[0].resident_blocks) > sum(sizes[i] for i in small.stages[2].resident_blocks)


def test_a_budget_below_the_minimum_states_it():
    minimum = minimum_budget()
    plan_memory(minimum)
    with pytest.raises(HiFlowInputError) as info:
        plan_memory(minimum - 2**20, field="--memory-budget")
    assert info.value.field == "--memory-budget"
    assert f"at least {minimum / GIB:.2f} GiB" in str(info.value)
    with pytest.raises(HiFlowInputError, match="at least"):
        plan_memory("1GiB")


def test_official_cascade_minimum_is_under_6_gib():
    assert minimum_budget() < 6 * GIB


def test_lossy_plans_are_named_and_flagged():
    exact, lossy = plan_memory("12GiB"), plan_memory("12GiB", lossy="fp8")
    assert lossy.name == "lossy-fp8" and not lossy.exact and exact.exact
    assert all(s.weight_dtype == "float8_e4m3fn" for s in lossy.stages)
    # fp8 keeps more of the model resident: compared in parameters (block counts depend on which
    # residency order wins, double blocks being 2.4x the single ones).
    params = FLUX_DEV.block_params()
    resident = lambda plan: sum(params[i] for i in plan.stages[2].resident_blocks)  # noqa: E731
    assert resident(lossy) > resident(exact)
    with pytest.raises(HiFlowInputError, match="lossy"):
        plan_memory("12GiB", lossy="int4")


def test_model_dir_config_is_read_without_weights(tiny_model_dir):
    shape = TransformerShape.from_model_dir(tiny_model_dir)
    assert (shape.double_blocks, shape.single_blocks, shape.hidden) == (1, 2, 32)
    with pytest.raises(HiFlowInputError, match="--model"):
        TransformerShape.from_model_dir("/nonexistent/model")


def test_streaming_overhead_is_small_at_4k_and_large_at_1k():
    plan = plan_memory("8GiB", stage_specs((1024, 1024), 30, [(4096, 4096)], [10]))
    base, top = plan.stages
    # A 4K step's matmuls take far longer than streaming every block; a 1K step's do not.
    assert top.compute_seconds_per_step > 2 * (sum(FLUX_DEV.block_params()) * 2 / 25e9)
    assert top.overhead == 0.0
    # On a faster card (H100-class matmuls) a 1K step is shorter than its copies.
    assert plan_memory("6GiB", OFFICIAL_STAGES, matmul_rate=700e12).stages[0].overhead > 0.5


def test_chunk_size_is_the_fast_paths():
    from hiflow_fast.fast_transformer import DEFAULT_CHUNK_TOKENS
    from hiflow_fast.memory_plan import DEFAULT_CHUNK_TOKENS as planned

    assert planned == DEFAULT_CHUNK_TOKENS
