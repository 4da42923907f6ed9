"""Host-resident loading (`from_pretrained(..., memory_budget=...)`, hiflow_fast.host_placement):
the blocks never reach the device except while a call's plan places or streams them, and the
latents equal the resident run's bit for bit.

There is no GPU here. Placement is observed on the meta device (a block that had been on it
could not come back with its values: meta tensors hold none) and pinning through a spy on
Tensor.pin_memory; the runs use the CPU as the "device", where the host-origin path still makes
real copies (a resident block is a copy of its host tensor, a streamed one a placeholder)."""

from __future__ import annotations

import types

import pytest
import torch

from hiflow_fast import HiFlowConfig, HiFlowInputError, HiFlowPipeline, HiResStage
from hiflow_fast import host_placement
from hiflow_fast.block_streaming import BlockStreamer, transformer_blocks
from hiflow_fast.memory_plan import plan_for_call
from hiflow_fast.pipeline import StepEnd

# Small and odd: batch 2, non-square, two high-res stages (residency changes between them).
SMALL = HiFlowConfig(height=128, width=160, num_inference_steps=3,
                     stages=(HiResStage(160, 208, 2, ntk_factor=4.0), HiResStage(192, 240, 2, alpha=0.25)))
BUDGET = "64GiB"  # far above the tiny model's needs: every block resident, placed per stage


def _run(pipe, prompt, **kwargs):
    embeds, pooled = prompt
    return pipe(prompt_embeds=embeds.repeat(2, 1, 1), pooled_prompt_embeds=pooled.repeat(2, 1), config=SMALL, seed=11,
                output_type="latent", progress=False, **kwargs)


@pytest.fixture(scope="module")
def host_pipe(tiny_model_dir):
    return HiFlowPipeline.from_pretrained(tiny_model_dir, load_text_encoders=False, memory_budget=BUDGET)


@pytest.fixture(scope="module")
def resident_latents(tiny_pipe, tiny_prompt):
    return _run(tiny_pipe, tiny_prompt).latents


def _block_params(transformer):
    return {id(p) for b in transformer_blocks(transformer) for p in b.parameters()}


def test_from_pretrained_with_a_budget_leaves_the_blocks_on_the_host(tiny_model_dir, tiny_pipe, monkeypatch):
    import hiflow_fast.pipeline as pipeline_module

    # "meta" stands in for the accelerator: anything moved there loses its values for good.
    monkeypatch.setattr(pipeline_module, "check_device", lambda value, field: torch.device(value))
    pipe = HiFlowPipeline.from_pretrained(tiny_model_dir, load_text_encoders=False, device="meta", memory_budget="8GiB")
    assert pipe.device == torch.device("meta") and pipe.placement.memory_budget == "8GiB"
    blocks = _block_params(pipe.transformer)
    reference = dict(tiny_pipe.transformer.named_parameters())
    for name, p in pipe.transformer.named_parameters():
        if id(p) in blocks:
            assert p.device.type == "cpu" and torch.equal(p, reference[name]), name  # never was on "meta"
        else:
            assert p.device.type == "meta", name
    assert all(b.device.type == "meta" for b in pipe.transformer.buffers())
    assert all(p.device.type == "meta" for p in pipe.vae.parameters())


def test_blocks_are_pinned_for_a_cuda_device(tiny_model_dir, monkeypatch):
    pipe = HiFlowPipeline.from_pretrained(tiny_model_dir, load_text_encoders=False)
    pinned = []

    def pin_memory(self):  # a CPU-only torch cannot pin: record, and hand back a copy as pinning does
        pinned.append(self.data_ptr())
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    blocks = [p for b in transformer_blocks(pipe.transformer) for p in b.parameters()]
    before = [p.data_ptr() for p in blocks]
    host_placement.place_host_resident(pipe, torch.device("meta"), "8GiB", 8 * 2**30, pin=True)
    assert sorted(pinned) == sorted(before)
    assert all(p.device.type == "cpu" and p.data_ptr() not in before for p in blocks)
    pinned.clear()
    host_placement.place_host_resident(pipe, torch.device("meta"), "8GiB", 8 * 2**30)  # default: pin for cuda only
    assert pinned == []


def test_a_budget_loaded_pipeline_gives_the_resident_latents(host_pipe, tiny_prompt, resident_latents):
    transformer = host_pipe.transformer
    blocks = transformer_blocks(transformer)
    own = {id(p): (p.data_ptr(), p.data.clone()) for b in blocks for p in b.parameters()}
    seen = []

    def watch(event):  # during every step: each block a copy of its host tensor, none the tensor itself
        if isinstance(event, StepEnd) and event.i == 0:
            seen.append([all(p.numel() and p.data_ptr() != own[id(p)][0] for p in b.parameters()) for b in blocks])

    out = _run(host_pipe, tiny_prompt, callback=watch)
    assert torch.equal(out.latents, resident_latents)
    assert out.memory_plan == "exact-float32"
    assert seen == [[True] * len(blocks)] * 3
    for b in blocks:  # back to the block's own host tensors, unchanged, no hooks left
        assert not b._forward_pre_hooks and not b._forward_hooks
        for p in b.parameters():
            assert p.data_ptr() == own[id(p)][0] and torch.equal(p.data, own[id(p)][1])


# Resident blocks per stage (base, stage 1, stage 2) of the tiny model's 1 + 2 blocks: a budget
# alone streams none at this size, so the plan is set here (as in test_block_streaming.py).
RESIDENCY = {"all streamed": ([], [], []), "partial, changing per stage": ([0, 2], [1], [])}


@pytest.mark.parametrize("residency", list(RESIDENCY))
def test_streamed_blocks_from_host_memory_give_the_resident_latents(host_pipe, tiny_prompt, resident_latents, monkeypatch,
                                                                    residency):
    import hiflow_fast.pipeline as pipeline_module

    blocks = transformer_blocks(host_pipe.transformer)
    streamers = []

    def plan_with_residency(pipe, config, memory_budget, **kwargs):
        session = plan_for_call(pipe, config, memory_budget, **kwargs)
        for stage, resident in zip(session.plan.stages, RESIDENCY[residency]):
            stage.resident_blocks = list(resident)
            stage.streamed_blocks = [i for i in range(len(blocks)) if i not in resident]
            stage.prefetch = 1
        return session

    real_close = BlockStreamer.close

    def spy_close(self):
        streamers.append((self.host_origin, self.copies))
        real_close(self)

    placeholders = []

    def watch(event):  # a streamed block holds no data between its forwards
        if isinstance(event, StepEnd) and event.i == 0:
            placeholders.append([all(p.numel() == 0 for p in b.parameters()) for b in blocks])

    monkeypatch.setattr(pipeline_module, "plan_for_call", plan_with_residency)
    monkeypatch.setattr(BlockStreamer, "close", spy_close)
    out = _run(host_pipe, tiny_prompt, callback=watch)
    monkeypatch.undo()
    assert torch.equal(out.latents, resident_latents)
    assert streamers[0][0] and streamers[0][1] >= 3 + 2 + 2  # a copy per streamed block per step
    assert placeholders == [[i not in resident for i in range(len(blocks))] for resident in RESIDENCY[residency]]


def test_a_call_budget_overrides_the_loaded_one(host_pipe, tiny_prompt, resident_latents):
    with pytest.raises(HiFlowInputError, match="memory_budget.*at least"):
        _run(host_pipe, tiny_prompt, memory_budget="1MiB")
    assert torch.equal(_run(host_pipe, tiny_prompt, memory_budget="32GiB").latents, resident_latents)


# ---- text encoders ---------------------------------------------------------------------------


class _Encoder(torch.nn.Linear):
    """A stand-in text encoder whose moves are recorded (and not made: "meta" would lose it)."""

    def __init__(self, events, name, size=8):
        super().__init__(size, size)
        self.events, self.name = events, name

    def to(self, device, *args, **kwargs):
        self.events.append((self.name, str(torch.device(device))))
        return self


def _fake_pipe(tiny_pipe, events):
    flux = types.SimpleNamespace(text_encoder=_Encoder(events, "clip"), text_encoder_2=_Encoder(events, "t5"))
    return types.SimpleNamespace(transformer=tiny_pipe.transformer, vae=tiny_pipe.vae, flux_pipeline=flux)


def test_text_encoders_visit_the_device_for_the_encode_only(tiny_pipe):
    events = []
    pipe = _fake_pipe(tiny_pipe, events)
    placement = host_placement.HostPlacement(torch.device("meta"), "8GiB", 8 * 2**30)
    with host_placement.text_encoders_for_encode(pipe, placement, placement.budget_bytes) as device:
        assert device == torch.device("meta") and events == [("clip", "meta"), ("t5", "meta")]
        events.append("encode")
    assert events[-2:] == [("clip", "cpu"), ("t5", "cpu")]


def test_text_encoders_that_do_not_fit_encode_on_the_cpu(tiny_pipe, caplog):
    events = []
    pipe = _fake_pipe(tiny_pipe, events)
    placement = host_placement.HostPlacement(torch.device("meta"), "8GiB", 8 * 2**30)
    with host_placement.text_encoders_for_encode(pipe, placement, host_placement.TEXT_ENCODE_WORK_BYTES) as device:
        assert device == torch.device("cpu")
    assert all(d == "cpu" for _, d in events) and "encoding on the CPU" in caplog.text


@pytest.mark.parametrize("loaded_with_budget", [False, True])
def test_text_encoders_are_off_the_device_before_the_base_stage(tiny_model_dir, tiny_prompt, loaded_with_budget):
    events = []
    kwargs = dict(memory_budget=BUDGET) if loaded_with_budget else {}
    pipe = HiFlowPipeline.from_pretrained(tiny_model_dir, load_text_encoders=False, **kwargs)
    embeds, pooled = tiny_prompt
    flux = types.SimpleNamespace(text_encoder=_Encoder(events, "clip"), text_encoder_2=_Encoder(events, "t5"),
                                 _execution_device=torch.device("cpu"))

    def encode_prompt(prompt, prompt_2, device, num_images_per_prompt, max_sequence_length):
        events.append(("encode", str(device)))
        return embeds, pooled, None

    flux.encode_prompt = encode_prompt
    pipe.flux_pipeline = flux
    real_forward = pipe.transformer.forward

    def forward(*args, **kwargs):
        events.append("forward")
        return real_forward(*args, **kwargs)

    pipe.transformer.forward = forward
    config = SMALL.replace(stages=SMALL.stages[:1], max_sequence_length=int(embeds.shape[1]))
    pipe("a cat", config=config, seed=3, output_type="latent", progress=False, **({} if loaded_with_budget else dict(memory_budget=BUDGET)))
    first_forward = events.index("forward")
    before = events[:first_forward]
    assert ("encode", "cpu") in before
    encode_at = before.index(("encode", "cpu"))
    # After the encode and before the first step, each encoder's last move is to the host.
    for name in ("clip", "t5"):
        moves = [d for e in before[encode_at:] if isinstance(e, tuple) and e[0] == name for d in [e[1]]]
        assert moves and moves[-1] == "cpu", (name, events)
    if loaded_with_budget:  # brought to the device for the encode (the CPU here) first
        assert ("clip", "cpu") in before[:encode_at] and ("t5", "cpu") in before[:encode_at]


# ---- on a GPU (bench/gpu_check's gpu_tests step) ---------------------------------------------


@pytest.mark.gpu
def test_on_a_gpu_blocks_stay_in_pinned_host_memory_and_the_latents_are_the_resident_ones(tiny_model_dir, tiny_prompt):
    resident = HiFlowPipeline.from_pretrained(tiny_model_dir, load_text_encoders=False, device="cuda")
    host = HiFlowPipeline.from_pretrained(tiny_model_dir, load_text_encoders=False, device="cuda", memory_budget="4GiB")
    blocks = _block_params(host.transformer)
    for p in host.transformer.parameters():
        assert (p.device.type == "cpu" and p.is_pinned()) if id(p) in blocks else p.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in host.vae.parameters())
    expected = _run(resident, tiny_prompt).latents
    assert torch.equal(_run(host, tiny_prompt).latents, expected)
    assert all(p.device.type == "cpu" and p.is_pinned() for p in host.transformer.parameters() if id(p) in blocks)
    lossy = _run(host, tiny_prompt, lossy="fp8")
    assert lossy.memory_plan == "lossy-fp8" and not torch.equal(lossy.latents, expected)
    assert torch.equal(_run(host, tiny_prompt).latents, expected)
    # A device-resident pipeline under a lossy call: its own device tensors come back, bit for bit.
    before = {name: p.detach().clone() for name, p in resident.transformer.named_parameters()}
    assert torch.equal(_run(resident, tiny_prompt, memory_budget="4GiB", lossy="fp8").latents, lossy.latents)
    for name, p in resident.transformer.named_parameters():
        assert p.device.type == "cuda" and torch.equal(p, before[name]), name
