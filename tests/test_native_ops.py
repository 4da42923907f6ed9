"""The native backend as a backend (csrc/, hiflow_fast.native): what the per-op tests
(tests/test_<op>.py, which run every op on both Triton and native) do not cover.

* the native schemas are the Triton ops' schemas, argument for argument;
* fp16 / bf16 elements are read exactly and x_next is rounded exactly as torch rounds (the
  conversion routines of csrc/common.h, which the GPU runs too);
* the backend choice: "auto" never picks native on a CPU and never compiles; "native" that
  cannot be built is a HiFlowInputError naming the reason (never silently replaced);
* GPU-marked (bench/gpu_check): the CUDA build (cpp_extension with the .cu kernels) against the
  reference and against Triton, op by op and as a whole step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hiflow_fast import native
from hiflow_fast.backend import ENV_VAR, load_triton_ops, resolve_backend
from hiflow_fast.errors import HiFlowInputError

from test_guided_velocity import (  # noqa: E402  (helpers only)
    BETA,
    HW,
    PAD,
    REF_HW,
    SIGMA,
    SIGMA_NEXT,
    make_case,
    oracle,
    rel_l2,
    run_op,
)


def _schema_signature(op) -> list[tuple]:
    """(name, type, writes?) of every argument and return of an op's schema."""
    schema = op.default._schema
    return [(a.name, str(a.type), bool(a.alias_info and a.alias_info.is_write)) for a in schema.arguments] + [
        ("return", str(r.type), False) for r in schema.returns
    ]


@pytest.mark.parametrize("name", native.OPS)
def test_native_schemas_equal_the_triton_schemas(native_ops, name):
    triton_ops = (load_triton_ops(), torch.ops.hiflow_fast)[1]
    assert _schema_signature(getattr(native_ops, name)) == _schema_signature(getattr(triton_ops, name))


# Values whose conversions are easy to get wrong: subnormals, the largest finite values, ties.
def _special_values(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    specials = [0.0, -0.0, info.tiny, info.tiny / 4, -info.tiny / 2, info.max, -info.max, info.eps, 1.0 + info.eps,
                float("inf"), float("-inf"), 65504.0 if dtype == torch.float16 else 3.0e38]
    g = torch.Generator().manual_seed(1)
    return torch.cat([torch.tensor(specials), torch.randn(1000, generator=g) * 100]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_elements_are_read_exactly(native_ops, dtype):
    """sigma = 0: x0 = x exactly, so pred_x0 is the fp32 value of every input element."""
    values = _special_values(dtype)
    n = values.numel() - values.numel() % 16
    sample = values[:n].reshape(1, n // 16, 16)  # 4 channels, a grid of 2 x (n / 16 * 2)
    hw = (2, 2 * (n // 16))
    zeros = torch.zeros_like(sample)
    pred_x0 = torch.full(sample.shape, float("nan"))
    diff = torch.empty(1, 4, *hw)
    native_ops.reference_flow(sample, zeros, sample, hw[0], hw[1], 0.0, pred_x0, diff)
    assert torch.equal(pred_x0, sample.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_x_next_is_rounded_to_nearest_even_as_torch_rounds(native_ops, dtype):
    """The same step written once in fp32 and once in the low-precision dtype: the second is the
    first rounded by torch, bit for bit (incl. overflow to inf and subnormal results)."""
    case = make_case(2, 4, HW, REF_HW, HW, seed=3)
    sample = case[0] * torch.logspace(-9, 5.5, case[0].shape[-1])  # spans the half / bf16 range
    case = (sample, *case[1:])
    x32 = run_op(native_ops, *case, REF_HW, PAD, out_dtype=torch.float32)[0]
    low = run_op(native_ops, *case, REF_HW, PAD, out_dtype=dtype)[0]
    assert torch.isinf(x32.to(dtype)).any() or dtype == torch.bfloat16
    assert torch.equal(low, x32.to(dtype))


# ---- backend choice -----------------------------------------------------------------------------


def test_native_is_a_backend_choice(native_ops, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend("native", device="cpu") == "native"
    monkeypatch.setenv(ENV_VAR, "native")
    assert resolve_backend(None, device="cpu") == "native"


def test_auto_never_picks_native_on_a_cpu(native_ops, monkeypatch):
    """Even with the native ops built and loaded, auto on CPU tensors is the reference (see
    hiflow_fast.backend: reproducible numbers whatever the cache holds)."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert native.is_built()
    assert resolve_backend("auto", device="cpu") == "ref"


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_cpu_spectral_blend_runs_slices_in_worker_threads_alike(native_ops, mode):
    """On a CPU the native spectral blend runs its FFT pair one slice at a time, slices in
    parallel, the torch FFT ops called from the worker threads: under inference mode too (the
    caller's thread-local state travels with them), with the result of the reference low-pass
    with 1 thread and with 2, each run repeating bit for bit (batch 2, odd non-square slices).
    (Across thread counts the last bit may differ: MKL plans a transform by its thread limit,
    as torch's own FFTs do.)"""
    from hiflow_fast.ref.spectral_blend import spectral_lowpass

    g = torch.Generator().manual_seed(11)
    diff = torch.randn(2, 5, 21, 14, generator=g)
    want = 0.6 * spectral_lowpass(diff, 0.3, 4)
    threads = torch.get_num_threads()
    got = {}
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            with getattr(torch, mode)():
                out = diff.clone()
                native_ops.spectral_lowpass_blend(out, 0.3, 4, 0.6)
            if n in got:
                assert torch.equal(out, got[n]), f"two runs with {n} threads differ"
            got[n] = out
    finally:
        torch.set_num_threads(threads)
    for n in (1, 2):
        assert rel_l2(got[n], want) <= 1e-5
    torch.testing.assert_close(got[1], got[2], rtol=0, atol=1e-6)


def test_cpu_guided_velocity_outputs_at_any_alignment(native_ops):
    """The CPU writes the outputs of guided_velocity with streaming stores where a row is 16-byte
    aligned and with plain stores elsewhere: outputs that start 4 bytes into their storage
    (contiguous, but never aligned) get the values aligned outputs get, and the reference's."""
    sample, pred_x0, lowpass, ref_x0, state = make_case(2, 3, HW, REF_HW, HW, seed=5)
    aligned = run_op(native_ops, sample, pred_x0, lowpass, ref_x0, state, REF_HW, PAD)
    shape = aligned[0].shape
    storages = [torch.full((aligned[0].numel() + 1,), float("nan")) for _ in range(3)]
    x_next, v, v_ref = (t[1:].view(shape) for t in storages)
    assert all(t.data_ptr() % 16 == 4 for t in (x_next, v, v_ref))
    native_ops.guided_velocity(
        sample, pred_x0, lowpass, ref_x0, state.v, state.v_ref, REF_HW[0], REF_HW[1], HW[0], HW[1], PAD[0], PAD[1],
        SIGMA, SIGMA_NEXT, BETA, 1, x_next, v, v_ref,
    )
    for got, want in zip((x_next, v, v_ref), aligned):
        assert torch.equal(got, want)
    for got, want in zip(aligned, oracle(sample, pred_x0, lowpass, ref_x0, state, HW, REF_HW, PAD)):
        assert rel_l2(got, want) <= 1e-5


@pytest.mark.parametrize("cached", [True, False])
def test_auto_on_a_gpu_without_triton_takes_native_only_when_cached(monkeypatch, cached):
    import hiflow_fast.backend as backend_module

    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(backend_module, "triton_available", lambda: False)
    monkeypatch.setattr(native, "is_built", lambda variant=None: cached and variant == "cuda")
    loads = []
    monkeypatch.setattr(native, "load", lambda variant=None, **kw: loads.append(variant) or variant)
    assert resolve_backend("auto", device="cuda") == ("native" if cached else "ref")
    assert loads == (["cuda"] if cached else [])  # nothing is built when nothing is cached


def test_unbuildable_native_backend_is_a_clear_error(tmp_path):
    """No compiler and no cached build: asking for native raises HiFlowInputError naming the
    backend and the reason, in a fresh process (this one has the library loaded)."""
    script = textwrap.dedent(
        """
        import torch
        from hiflow_fast.errors import HiFlowInputError
        from hiflow_fast.guidance import guidance_step
        x = torch.zeros(1, 4, 16)
        try:
            guidance_step(x, x, x, hw=(4, 4), ref_hw=(4, 4), sigma=0.5, sigma_next=0.4, alpha=0.5, beta=0.2,
                          backend="native")
        except HiFlowInputError as exc:
            print("ERROR", exc)
        """
    )
    env = dict(os.environ, HIFLOW_NATIVE_CACHE=str(tmp_path / "empty-cache"), CXX=str(tmp_path / "no-such-compiler"))
    env.pop(ENV_VAR, None)
    result = subprocess.run([sys.executable, "-P", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    message = result.stdout.strip()
    assert message.startswith("ERROR backend='native' is not allowed"), message
    assert "no C++ compiler" in message and "no-such-compiler" in message
    assert not (tmp_path / "empty-cache").exists() or not any((tmp_path / "empty-cache").rglob("*.so"))


def test_native_without_cuda_support_refuses_cuda_tensors(monkeypatch):
    monkeypatch.setattr(native, "cuda_toolkit", lambda: None)
    monkeypatch.setattr(native, "_loaded_variant", "cpu")
    with pytest.raises(HiFlowInputError, match="nvcc"):
        resolve_backend("native", device="cuda")


def test_every_native_source_is_installed_as_package_data():
    """The build reads csrc/ from the install (hiflow_fast/csrc), so a wheel can build it: every
    source of the repository's csrc/ is there (setup.py's package_data globs cover them all)."""
    code = "import hiflow_fast, os; print(os.path.join(os.path.dirname(hiflow_fast.__file__), 'csrc'))"
    installed = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True, cwd="/")
    installed_dir = installed.stdout.strip()
    repo_csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

    def files(root):
        return {os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names
                if not f.endswith(".pyc")}

    assert files(repo_csrc) and files(repo_csrc) <= files(installed_dir)


# ---- GPU: the CUDA build --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_native_ops():
    """The CUDA build (CPU + CUDA kernels in one library: cpp_extension.load with the .cu
    sources, i.e. a CUDAExtension built at first use), loaded into this process."""
    missing = native.missing_build_tools("cuda")
    if missing is not None:
        pytest.fail(f"the native CUDA build is impossible on this GPU machine: {missing}")
    assert native.load("cuda") == "cuda"
    return torch.ops.hiflow_fast_native


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_guided_velocity_matches_reference_and_triton(cuda_native_ops, dtype):
    load_triton_ops(interpret=False)
    for state_hw, out_hw, in_place in [(None, PAD, False), (PAD, HW, False), (PAD, PAD, True)]:
        case = make_case(2, 4, HW, REF_HW, state_hw, dtype=dtype, seed=7)
        want = oracle(*case, HW, REF_HW, out_hw)
        gpu_case = tuple(None if t is None else t.cuda() for t in case[:4]) + (
            None if case[4] is None else type(case[4])(case[4].v.cuda(), case[4].v_ref.cuda(), case[4].hw),
        )
        native_out = run_op(cuda_native_ops, *gpu_case, REF_HW, out_hw, in_place=in_place, out_dtype=dtype)
        triton_out = run_op(torch.ops.hiflow_fast, *gpu_case, REF_HW, out_hw, in_place=in_place, out_dtype=dtype)
        tol = 1e-5 if dtype == torch.float32 else 2**-8
        for got, from_triton, expected in zip(native_out, triton_out, want):
            assert rel_l2(got.cpu(), expected.to(got.dtype)) <= tol
            assert rel_l2(got, from_triton) <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("structure_guidance", ["fft", "dwt"])
def test_cuda_guidance_step_matches_reference_and_triton(cuda_native_ops, structure_guidance):
    """The whole step (reference_flow, the low-pass blend, guided_velocity) at a padded,
    non-square grid with batch 2, native vs ref vs triton on the GPU."""
    from hiflow_fast.guidance import VelocityState, guidance_step

    g = torch.Generator().manual_seed(5)
    hw, ref_hw, next_hw = (66, 98), (32, 48), (68, 100)

    def packed(grid):
        return torch.randn(2, (grid[0] // 2) * (grid[1] // 2), 64, generator=g).cuda()

    sample, model_output, ref_x0 = packed(hw), packed(hw), packed(ref_hw)
    state = (packed(hw), packed(hw))
    step = dict(hw=hw, ref_hw=ref_hw, next_hw=next_hw, sigma=0.6, sigma_next=0.45, alpha=0.7, beta=0.3,
                structure_guidance=structure_guidance)
    outs = {
        backend: guidance_step(sample, model_output, ref_x0, state=VelocityState(state[0].clone(), state[1].clone(), hw),
                               backend=backend, **step)
        for backend in ("ref", "triton", "native")
    }
    for other in ("ref", "triton"):
        for name in ("prev_sample", "pred_x0"):
            assert rel_l2(getattr(outs["native"], name), getattr(outs[other], name)) <= 1e-5, (other, name)
        assert rel_l2(outs["native"].state.v, outs[other].state.v) <= 1e-5, other
        assert rel_l2(outs["native"].state.v_ref, outs[other].state.v_ref) <= 1e-5, other
