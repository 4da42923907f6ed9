"""Test setup and shared fixtures.

Triton runs through its CPU interpreter when there is no GPU: TRITON_INTERPRET must be set
before any kernel module (and so triton) is imported.
"""

import json
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import hiflow_fast  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
# CI clones the repository beside a copy of shared/; a fresh clone elsewhere uses tests/data.
SHARED_GOLDEN = os.path.join(REPO_DIR, "..", "shared", "golden")
REDUCED_GOLDEN = os.path.join(TESTS_DIR, "data")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run by bench/gpu_check)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def golden_dir() -> str:
    """The full golden data when ../shared is there, else the reduced copy in tests/data."""
    return SHARED_GOLDEN if os.path.isfile(os.path.join(SHARED_GOLDEN, "square.pt")) else REDUCED_GOLDEN


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    from hiflow_fast.cli import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_prompt(tiny_model_dir):
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(tiny_model_dir, "prompt_embeds.safetensors"))
    return tensors["prompt_embeds"], tensors["pooled_prompt_embeds"]


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir):
    from hiflow_fast import HiFlowPipeline

    return HiFlowPipeline.from_pretrained(tiny_model_dir, load_text_encoders=False)


def load_golden(directory: str | None = None):
    """(case, params-with-seed, config) of the public golden case, derived tensors filled in."""
    from hiflow_fast.conformance import config_for_case, derive_missing

    directory = directory or golden_dir()
    case = torch.load(os.path.join(directory, "square.pt"), weights_only=True)
    with open(os.path.join(directory, "square.json"), encoding="utf-8") as f:
        meta = json.load(f)
    params = dict(meta["params"], seed=meta["seed"])
    config = config_for_case(case, params)
    derive_missing(case, config)
    return case, params, config


@pytest.fixture(scope="session")
def golden():
    return load_golden()


@pytest.fixture(scope="session")
def native_ops():
    """torch.ops.hiflow_fast_native, built once (into the user cache, or $HIFLOW_NATIVE_CACHE;
    a cached up-to-date build is loaded without compiling) and loaded for the session. Skips
    only when this machine lacks the build tools (compiler, ninja); a build that fails with the
    tools present fails the tests."""
    from hiflow_fast import native

    missing = None if native.is_built() else native.missing_build_tools(native.default_variant())
    if missing is not None:
        pytest.skip(f"the native backend cannot be built here: {missing}")
    native.load()
    return torch.ops.hiflow_fast_native


@pytest.fixture(params=["triton", "native"])
def guidance_ops(request):
    """The op namespace of one implementation of the guidance ops (same schemas): Triton's
    hiflow_fast:: (through the interpreter on a CPU) or csrc/'s hiflow_fast_native::."""
    if request.param == "native":
        return request.getfixturevalue("native_ops")
    from hiflow_fast.backend import load_triton_ops

    load_triton_ops()
    return torch.ops.hiflow_fast


@pytest.fixture(autouse=True)
def _native_backend_built(request):
    """Tests parametrized with backend="native" get the session's native build (or skip, as
    `native_ops` does, where the build tools are missing)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "native":
        request.getfixturevalue("native_ops")
