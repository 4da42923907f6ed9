"""The attention backend registry (hiflow_fast.attention_backends)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from hiflow_fast import attention_backends as ab
from hiflow_fast.errors import HiFlowInputError
from hiflow_fast.ref.attention import attention as attention_ref
from hiflow_fast.ref.attention import proportional_attention_scale

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
CUDA = torch.cuda.is_available()


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def qkv(seq=60, heads=2, head_dim=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, seq, heads, head_dim, generator=gen).to(dtype) for _ in range(3)]


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(ab.ENV_VAR, raising=False)


def test_default_is_sdpa_and_bit_identical_to_diffusers_native(no_env):
    name, fn = ab.get_attention_backend()
    assert name == "sdpa"
    q, k, v = qkv(seq=77)
    scale = proportional_attention_scale(77, 16)
    native = dispatch_attention_fn(q, k, v, scale=scale)  # diffusers' default (native) backend
    assert torch.equal(fn(q, k, v, scale), native)


def test_argument_beats_environment_beats_default(monkeypatch):
    monkeypatch.setenv(ab.ENV_VAR, "sdpa-math")
    assert ab.get_attention_backend()[0] == "sdpa-math"
    assert ab.get_attention_backend("sdpa")[0] == "sdpa"


def test_unknown_name_from_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv(ab.ENV_VAR, "fastest")
    with pytest.raises(HiFlowInputError) as info:
        ab.get_attention_backend()
    assert info.value.field == ab.ENV_VAR and info.value.value == "fastest"
    assert "sdpa" in info.value.allowed and "sdpa-math" in info.value.allowed


def test_unknown_name_from_argument(no_env):
    with pytest.raises(HiFlowInputError) as info:
        ab.get_attention_backend("flash-attention-9")
    assert info.value.field == "attention"
    assert all(name in info.value.allowed for name in ab.available_backends())


@pytest.mark.skipif(CUDA, reason="checks the CPU-only answer")
@pytest.mark.parametrize("name", ["sdpa-cudnn", "sdpa-efficient"])
def test_cuda_only_sdpa_kernels_are_missing_on_cpu(name, no_env):
    assert name in ab.registered_backends() and name not in ab.available_backends()
    with pytest.raises(HiFlowInputError) as info:
        ab.get_attention_backend(name)
    assert info.value.field == "attention" and "no CUDA device" in info.value.allowed


@pytest.mark.parametrize(
    "name,package",
    [("flash", "flash_attn"), ("_flash_3", "flash_attn_interface"), ("sage", "sageattention"), ("xformers", "xformers")],
)
def test_diffusers_backends_need_their_packages(name, package, no_env):
    if CUDA and importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    assert name not in ab.available_backends()
    with pytest.raises(HiFlowInputError) as info:
        ab.get_attention_backend(name)
    assert name in str(info.value)


@pytest.mark.parametrize("name", ["sdpa", "sdpa-math", "sdpa-flash", "triton"])
def test_backends_available_here_match_the_reference(name, no_env):
    assert name in ab.available_backends()
    q, k, v = qkv(seq=45, head_dim=32)
    scale = 0.21
    out = ab.attention(q, k, v, scale, backend=name)
    assert out.shape == q.shape
    assert rel_l2(out, attention_ref(q, k, v, scale)) < 1e-5


def test_constraints_fail_with_the_field_value_and_allowed_values(no_env):
    _, flash = ab.get_attention_backend("sdpa-flash")
    q, k, v = qkv(head_dim=12)  # not a multiple of 8
    with pytest.raises(HiFlowInputError) as info:
        flash(q, k, v, 0.3)
    assert info.value.field.startswith("head_dim") and info.value.value == 12
    assert "multiple of 8" in info.value.allowed
    _, triton_fn = ab.get_attention_backend("triton")
    q, k, v = qkv(head_dim=8)  # below the kernel's 16
    with pytest.raises(HiFlowInputError) as info:
        triton_fn(q, k, v, 0.3)
    assert info.value.value == 8 and "16 to 256" in info.value.allowed
    q, k, v = qkv(dtype=torch.float64)
    with pytest.raises(HiFlowInputError) as info:
        triton_fn(q, k, v, 0.3)
    assert info.value.field.startswith("query.dtype")


def test_availability_is_decided_once(monkeypatch, no_env):
    calls = []
    backend = ab.AttentionBackend("test-once", ab._sdpa, "probe counter", probe=lambda: calls.append(1))
    ab.register_backend(backend)
    try:
        for _ in range(3):
            ab.get_attention_backend("test-once")
            ab.available_backends()
        assert len(calls) == 1
    finally:
        ab._REGISTRY.pop("test-once")
        ab._probe.cache_clear()


def test_hiflow_processor_takes_a_backend_name(no_env):
    from hiflow_fast.transformer import HiFlowAttnProcessor

    assert HiFlowAttnProcessor(attention="triton").attention_name == "triton"
    with pytest.raises(HiFlowInputError):
        HiFlowAttnProcessor(attention="nope")
