"""The guidance step (`hiflow_fast.guidance.guidance_step`) on every backend (ref, triton, native).

* backend equivalence on fresh random inputs (fft and dwt, swin pad/crop, batch 2, non-square,
  bf16) against the plain reference `guidance_step_ref` with explicit pad/crop copies;
* every recorded high-res step of the public golden case, through every backend;
* torch.compile(fullgraph=True) captures the step whole (a graph break raises);
* the backend choice (argument > $HIFLOW_BACKEND > auto) and input validation.
The triton backend runs through Triton's interpreter on a CPU; GPU-only checks are marked `gpu`.
"""

from __future__ import annotations

import pytest
import torch

from hiflow_fast import latents as L
from hiflow_fast.backend import ENV_VAR, resolve_backend
from hiflow_fast.errors import HiFlowInputError
from hiflow_fast.guidance import GuidanceStepOutput, VelocityState, guidance_step, guidance_step_ref

BACKENDS = ["ref", "triton", "native"]
HW, REF_HW = (10, 14), (6, 8)
STEP = dict(sigma=0.58, sigma_next=0.43, alpha=0.7, beta=0.35, filter_ratio=0.3)


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def packed(b, hw, channels=4, dtype=torch.float32, *, g):
    return torch.randn(b, (hw[0] // 2) * (hw[1] // 2), 4 * channels, generator=g).to(dtype)


def make_inputs(state_hw, *, batch=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample, model_output = packed(batch, HW, dtype=dtype, g=g), packed(batch, HW, dtype=dtype, g=g)
    ref_x0 = packed(batch, REF_HW, dtype=dtype, g=g)
    state = None
    if state_hw is not None:
        state = VelocityState(packed(batch, state_hw, g=g), packed(batch, state_hw, g=g), state_hw)
    return sample, model_output, ref_x0, state


def clone_state(state):
    return None if state is None else VelocityState(state.v.clone(), state.v_ref.clone(), state.hw)


def oracle(sample, model_output, ref_x0, state, *, next_hw=None, **kwargs) -> GuidanceStepOutput:
    """guidance_step_ref, then the official explicit pad/crop onto the next grid."""
    out = guidance_step_ref(sample, model_output, ref_x0, hw=HW, ref_hw=REF_HW, state=clone_state(state), **kwargs)
    next_hw = next_hw or HW
    if next_hw == HW:
        return out
    move = L.swin_pad_packed if next_hw[0] > HW[0] else L.swin_crop_packed
    return GuidanceStepOutput(move(out.prev_sample, *HW), out.pred_x0, out.state.to_grid(next_hw))


def assert_outputs_close(got: GuidanceStepOutput, want: GuidanceStepOutput, tol=1e-5):
    assert got.prev_sample.shape == want.prev_sample.shape and got.prev_sample.dtype == want.prev_sample.dtype
    assert tuple(got.state.hw) == tuple(want.state.hw)
    for name in ("prev_sample", "pred_x0"):
        assert rel_l2(getattr(got, name), getattr(want, name)) <= tol, name
    assert rel_l2(got.state.v, want.state.v) <= tol, "state.v"
    assert rel_l2(got.state.v_ref, want.state.v_ref) <= tol, "state.v_ref"


PAD, CROP = (12, 16), (8, 12)
CASES = [
    # (state grid, next grid)
    (None, None),  # a stage's first step, official layout
    (None, PAD),
    (PAD, None),  # the official flow: the state is on the previous (padded) grid
    (HW, PAD),  # our flow with next_hw: the state is already on this grid
    (CROP, HW),
    (HW, CROP),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("structure_guidance", ["fft", "dwt"])
@pytest.mark.parametrize("state_hw, next_hw", CASES)
def test_backends_match_reference(backend, structure_guidance, state_hw, next_hw):
    inputs = make_inputs(state_hw, seed=CASES.index((state_hw, next_hw)))
    kwargs = dict(STEP, structure_guidance=structure_guidance)
    want = oracle(*inputs, next_hw=next_hw, **kwargs)
    sample, model_output, ref_x0, state = inputs
    got = guidance_step(sample, model_output, ref_x0, hw=HW, ref_hw=REF_HW, state=state, backend=backend,
                        next_hw=next_hw, **kwargs)
    assert_outputs_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_state_is_widened_before_use(backend, state_dtype):
    """A caller's fp16/bf16 velocity state enters the fp32 math as the reference takes it (each
    tensor widened, then subtracted), on this grid and on the next."""
    for state_hw, next_hw in ((HW, None), (PAD, None), (HW, PAD)):
        sample, model_output, ref_x0, state = make_inputs(state_hw, seed=11)
        state = VelocityState(state.v.to(state_dtype), state.v_ref.to(state_dtype), state.hw)
        want = oracle(sample, model_output, ref_x0, state, next_hw=next_hw, **STEP)
        got = guidance_step(sample, model_output, ref_x0, hw=HW, ref_hw=REF_HW, state=state, backend=backend,
                            next_hw=next_hw, **STEP)
        assert_outputs_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_latents(backend):
    """Packed latents with non-unit innermost strides (a transposed buffer) are valid input."""
    sample, model_output, ref_x0, state = make_inputs(HW, seed=12)
    strided = sample.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    want = oracle(sample, model_output, ref_x0, state, next_hw=PAD, **STEP)
    got = guidance_step(strided, model_output, ref_x0, hw=HW, ref_hw=REF_HW, state=state, backend=backend,
                        next_hw=PAD, **STEP)
    assert_outputs_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_latents(backend):
    """bf16 sample/model output: fp32 math, prev_sample in bf16 (rounded once, like the
    reference), fp32 pred_x0 and state."""
    inputs = make_inputs(HW, dtype=torch.bfloat16, seed=9)
    want = oracle(*inputs, next_hw=PAD, **STEP)
    sample, model_output, ref_x0, state = inputs
    got = guidance_step(sample, model_output, ref_x0, hw=HW, ref_hw=REF_HW, state=state, backend=backend, next_hw=PAD, **STEP)
    assert got.prev_sample.dtype == torch.bfloat16 and got.state.v.dtype == torch.float32
    # Both round an fp32 value once to bf16; they may differ by one bf16 ulp (2^-8) where the fp32
    # values straddle a rounding boundary.
    assert rel_l2(got.prev_sample, want.prev_sample) <= 2**-8
    for name in ("pred_x0",):
        assert rel_l2(getattr(got, name), getattr(want, name)) <= 1e-5
    assert rel_l2(got.state.v, want.state.v) <= 1e-5 and rel_l2(got.state.v_ref, want.state.v_ref) <= 1e-5


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_kernels_update_a_state_on_the_next_grid_in_place(backend):
    inputs = make_inputs(PAD, seed=4)
    want = oracle(*inputs, next_hw=PAD, **STEP)
    sample, model_output, ref_x0, state = inputs
    v_before = state.v
    got = guidance_step(sample, model_output, ref_x0, hw=HW, ref_hw=REF_HW, state=state, backend=backend, next_hw=PAD, **STEP)
    assert got.state.v is v_before  # the persistent buffer was reused
    assert_outputs_close(got, want)


# ---- golden: every recorded high-res step ---------------------------------------------------


def golden_steps(case):
    """(stage index k, step i, step, previous step or None) for every high-res step that has
    the unit tensors (the reduced copy in tests/data drops a few)."""
    needed = {"model_output", "sample", "ref_pred_x0", "prev_sample", "model_output_high_out", "model_output_ref_out"}
    for k, stage in enumerate(case["stages"]):
        if stage["kind"] != "highres":
            continue
        for i, step in enumerate(stage["steps"]):
            previous = stage["steps"][i - 1] if i > 0 else None
            if needed <= set(step) and (previous is None or {"model_output_high_out", "model_output_ref_out"} <= set(previous)):
                yield k, i, step, previous


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_steps(golden, backend):
    case, params, _ = golden
    checked = 0
    for k, i, step, previous in golden_steps(case):
        hw = (step["target_height"] // 8, step["target_width"] // 8)
        state = None
        if previous is not None:
            prev_hw = (previous["target_height"] // 8, previous["target_width"] // 8)
            state = VelocityState(previous["model_output_high_out"], previous["model_output_ref_out"], prev_hw)
        out = guidance_step(
            step["sample"], step["model_output"], step["ref_pred_x0"],
            hw=hw, ref_hw=(step["ref_height"] // 8, step["ref_width"] // 8),
            sigma=float(step["sigma"]), sigma_next=float(step["sigma_next"]),
            alpha=float(step["alpha"]), beta=float(step["beta"]),
            structure_guidance=step["structure_guidance"], filter_ratio=params["filter_ratio"][k - 1],
            state=state, backend=backend,
        )
        where = f"stage {k} step {i}"
        assert rel_l2(out.prev_sample, step["prev_sample"]) <= 1e-5, where
        assert rel_l2(out.pred_x0, step["original_pred_x0"]) <= 1e-5, where
        assert rel_l2(out.state.v, step["model_output_high_out"]) <= 1e-5, where
        assert rel_l2(out.state.v_ref, step["model_output_ref_out"]) <= 1e-5, where
        checked += 1
    assert checked >= 5  # 4 steps of the 512 stage + the first of the 1024 stage at least


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_stage_chained_on_next_grid(golden, backend):
    """Run the 512 stage with our own outputs fed forward and next_hw set: each prev_sample is
    already the next recorded `sample` (padded/cropped), and the stage ends on the recorded
    latents."""
    case, params, _ = golden
    stage = case["stages"][1]
    steps = stage["steps"]
    x, state = steps[0]["sample"], None
    for i, step in enumerate(steps):
        hw = (step["target_height"] // 8, step["target_width"] // 8)
        nxt = steps[i + 1] if i + 1 < len(steps) else None
        next_hw = (nxt["target_height"] // 8, nxt["target_width"] // 8) if nxt else hw
        out = guidance_step(
            x, step["model_output"], step["ref_pred_x0"], hw=hw,
            ref_hw=(step["ref_height"] // 8, step["ref_width"] // 8),
            sigma=float(step["sigma"]), sigma_next=float(step["sigma_next"]),
            alpha=float(step["alpha"]), beta=float(step["beta"]), filter_ratio=params["filter_ratio"][0],
            state=state, backend=backend, next_hw=next_hw,
        )
        want = nxt["sample"] if nxt else step["prev_sample"]
        assert rel_l2(out.prev_sample, want) <= 1e-5, f"step {i}"
        x, state = out.prev_sample, out.state


# ---- torch.compile --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("structure_guidance", ["fft", "dwt"])
def test_torch_compile_fullgraph_captures_the_step(backend, structure_guidance):
    from torch._dynamo.testing import CompileCounterWithBackend

    sample, model_output, ref_x0, state = make_inputs(HW, seed=13)

    def step(sample, model_output, ref_x0, v, v_ref):
        out = guidance_step(
            sample, model_output, ref_x0, hw=HW, ref_hw=REF_HW, state=VelocityState(v, v_ref, HW),
            backend=backend, next_hw=PAD, structure_guidance=structure_guidance, **STEP,
        )
        return out.prev_sample, out.pred_x0, out.state.v, out.state.v_ref

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)  # a graph break would raise
    got = compiled(sample, model_output, ref_x0, state.v.clone(), state.v_ref.clone())
    want = step(sample, model_output, ref_x0, state.v.clone(), state.v_ref.clone())
    assert counter.frame_count == 1
    for g, w in zip(got, want):
        assert rel_l2(g, w) <= 1e-6


# ---- backend choice and validation -----------------------------------------------------------


def test_backend_resolution_order(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    expected_auto = "triton" if torch.cuda.is_available() else "ref"
    assert resolve_backend(None) == expected_auto
    assert resolve_backend("auto", device="cpu") == "ref"
    monkeypatch.setenv(ENV_VAR, "triton")
    assert resolve_backend(None, device="cpu") == "triton"
    assert resolve_backend("ref") == "ref"  # the argument wins over the environment
    monkeypatch.setenv(ENV_VAR, "cuda-graphs")
    with pytest.raises(HiFlowInputError, match=ENV_VAR):
        resolve_backend(None)
    with pytest.raises(HiFlowInputError, match="backend"):
        resolve_backend("tensorrt")


def test_triton_requested_without_triton_is_an_error(monkeypatch):
    import hiflow_fast.backend as backend_module

    monkeypatch.setattr(backend_module, "triton_available", lambda: False)
    with pytest.raises(HiFlowInputError, match="triton"):
        resolve_backend("triton")
    assert resolve_backend("auto") == "ref"


def test_environment_variable_selects_the_backend_of_a_step(monkeypatch):
    """HIFLOW_BACKEND=triton routes a step with backend=None to the kernels: the in-place state
    reuse only the triton backend does is visible."""
    sample, model_output, ref_x0, state = make_inputs(HW, seed=2)
    monkeypatch.setenv(ENV_VAR, "triton")
    out = guidance_step(sample, model_output, ref_x0, hw=HW, ref_hw=REF_HW, state=state, **STEP)
    assert out.state.v is state.v
    monkeypatch.setenv(ENV_VAR, "ref")
    state = clone_state(state)
    out = guidance_step(sample, model_output, ref_x0, hw=HW, ref_hw=REF_HW, state=state, **STEP)
    assert out.state.v is not state.v


def _call(**overrides):
    sample, model_output, ref_x0, state = make_inputs(HW, batch=1, seed=3)
    kwargs = dict(hw=HW, ref_hw=REF_HW, state=state, backend="ref", **STEP)
    args = dict(sample=sample, model_output=model_output, ref_x0=ref_x0)
    for key in list(overrides):
        if key in args:
            args[key] = overrides.pop(key)
    kwargs.update(overrides)
    return guidance_step(args["sample"], args["model_output"], args["ref_x0"], **kwargs)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hw=(12, 14)), "hw"),  # token count does not match the grid
        (dict(hw=(9, 14)), "hw"),  # odd latent size
        (dict(ref_hw=(6, 6)), "ref_hw"),
        (dict(next_hw=(14, 18)), "next_hw"),  # two pads away
        (dict(structure_guidance="wavelet"), "structure_guidance"),
        (dict(butterworth_order=0), "butterworth_order"),
        (dict(filter_ratio=-0.1), "filter_ratio"),
        (dict(model_output=torch.zeros(1, 35, 12)), "model_output.shape"),
        (dict(sample=torch.zeros(1, 35, 16, dtype=torch.int32)), "sample.dtype"),
        (dict(ref_x0=torch.zeros(1, 12, 16, device="meta")), "ref_x0.device"),
        (dict(sample=torch.zeros(35, 16)), "sample.shape"),
        (dict(state=VelocityState(torch.zeros(1, 35, 16), None, HW)), "state.v_ref"),
        (dict(state=VelocityState(torch.zeros(1, 15, 16), torch.zeros(1, 15, 16), (6, 10))), "state.hw"),  # 2 crops away
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_input_is_a_clear_error(overrides, field):
    with pytest.raises(HiFlowInputError) as info:
        _call(**overrides)
    assert info.value.field == field
    assert "not allowed" in str(info.value)


# ---- GPU (run by bench/gpu_check) ------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("structure_guidance", ["fft", "dwt"])
def test_gpu_kernels_match_reference_at_4k(structure_guidance, backend):
    g = torch.Generator().manual_seed(0)
    hw, ref_hw, pad = (512, 512), (258, 258), (514, 514)

    def p(grid):
        return torch.randn(1, (grid[0] // 2) * (grid[1] // 2), 64, generator=g).cuda()

    sample, model_output, ref_x0 = p(hw), p(hw), p(ref_hw)
    state = VelocityState(p(hw), p(hw), hw)
    kwargs = dict(hw=hw, ref_hw=ref_hw, next_hw=pad, structure_guidance=structure_guidance, **STEP)
    want = guidance_step(sample, model_output, ref_x0, state=clone_state(state), backend="ref", **kwargs)
    got = guidance_step(sample, model_output, ref_x0, state=clone_state(state), backend=backend, **kwargs)
    assert_outputs_close(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("structure_guidance", ["fft", "dwt"])
def test_gpu_inductor_compile_and_cuda_graph_replay(structure_guidance):
    """Inductor (fullgraph) traces into the triton_ops on CUDA (under the interpreter they are
    opaque; the CPU test above compiles with aot_eager): the compiled step equals the eager one
    and the reference backend's; a CUDA graph of the eager step replays to the same values."""
    g = torch.Generator().manual_seed(1)
    hw, ref_hw = (128, 128), (64, 64)

    def p(grid):
        return torch.randn(1, (grid[0] // 2) * (grid[1] // 2), 64, generator=g).cuda()

    sample, model_output, ref_x0, v, v_ref = p(hw), p(hw), p(ref_hw), p(hw), p(hw)

    def step(sample, model_output, ref_x0, v, v_ref, backend="triton"):
        out = guidance_step(sample, model_output, ref_x0, hw=hw, ref_hw=ref_hw, state=VelocityState(v, v_ref, hw),
                            backend=backend, next_hw=(130, 130), structure_guidance=structure_guidance, **STEP)
        return out.prev_sample, out.pred_x0, out.state.v, out.state.v_ref

    want = step(sample, model_output, ref_x0, v, v_ref)
    reference = step(sample, model_output, ref_x0, v, v_ref, backend="ref")
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    got = compiled(sample, model_output, ref_x0, v, v_ref)
    for a, b, r in zip(got, want, reference):
        assert rel_l2(a, b) <= 1e-6
        assert rel_l2(a, r) <= 1e-5
    # CUDA graph: capture once (after a warm-up that builds the cuFFT plan), replay, compare.
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(sample, model_output, ref_x0, v, v_ref)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, want):
        assert rel_l2(a, b) <= 1e-6
