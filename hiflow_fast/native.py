"""The native backend: build and load the C++/CUDA ops of csrc/ (`hiflow_fast_native::<op>`).

The ops have the schemas of the Triton ops `hiflow_fast::<op>` (see csrc/binding.cpp for why
they live in a namespace of their own) and are built from source on first use, with
`torch.utils.cpp_extension.load` (ninja and a C++ compiler; nvcc too for the CUDA kernels),
into a per-user cache:

    $HIFLOW_NATIVE_CACHE, else $XDG_CACHE_HOME/hiflow_fast/native, else ~/.cache/hiflow_fast/native

Each build lives in a folder named after a digest of its sources, flags, torch version and
variant ("cpu", or "cuda" where nvcc and a CUDA torch exist), so an up-to-date build is found
(and loaded without any compiler) by the file's existence alone, and a change of sources or
torch builds anew instead of loading a stale library.

Why at first use and not at install: `pip install .` stays a quick, pure-Python install that
works without a compiler (a build at install would need torch in pip's isolated build
environment, which pulls a multi-GB CUDA torch, and would add a minute to every install for a
backend few runs use); the build happens once, when the native backend is asked for
(`backend="native"`, `--backend native`, HIFLOW_BACKEND=native) or ahead of time with
`python -m hiflow_fast.native`. When it cannot be built the request fails with a
HiFlowInputError naming the reason; it is never silently replaced by another backend.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .errors import HiFlowInputError

logger = logging.getLogger(__name__)

NAMESPACE = "hiflow_fast_native"
OPS = ("reference_flow", "spectral_lowpass_blend", "haar_lowpass_blend", "guided_velocity")
CACHE_ENV_VAR = "HIFLOW_NATIVE_CACHE"
# Host flags: -O3 for the element loops; -fopenmp because at::parallel_for is an inline
# OpenMP region in the extension's own code (without it the loops run on one thread).
CXX_FLAGS = ("-O3", "-fopenmp")
LD_FLAGS = ("-fopenmp",)
CUDA_FLAGS = ("-O3", "-std=c++17")


class NativeUnavailable(RuntimeError):
    """The native ops cannot be built or loaded here; the message says why."""


def source_dir() -> Path:
    """csrc/: installed as hiflow_fast/csrc (package data); in a source checkout beside the package."""
    installed = Path(__file__).resolve().parent / "csrc"
    if (installed / "binding.cpp").is_file():
        return installed
    return Path(__file__).resolve().parent.parent / "csrc"


def sources(*, cuda: bool) -> list[Path]:
    root = source_dir()
    found = [root / "binding.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    if cuda:
        found += sorted((root / "cuda").glob("*.cu"))
    return found


def _headers() -> list[Path]:
    root = source_dir()
    # Every header, cpu/*.h included: the build's name must change with any of them.
    return sorted(root.glob("*.h")) + sorted((root / "cpu").glob("*.h")) + sorted((root / "cuda").glob("*.cuh"))


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hiflow_fast" / "native"


def cuda_toolkit() -> str | None:
    """The CUDA toolkit a CUDA build would use (None when torch has no CUDA or nvcc is missing)."""
    if torch.version.cuda is None:
        return None
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return CUDA_HOME
    return None


def default_variant() -> str:
    """"cuda" where a CUDA torch, nvcc and a GPU exist (CPU and CUDA kernels in one library), else
    "cpu". Without a GPU a CUDA build has no architecture to target (torch's cpp_extension fails
    with an IndexError), which is the case of a CUDA torch wheel on a CPU machine: CI's torch 2.11."""
    return "cuda" if cuda_toolkit() is not None and torch.cuda.is_available() else "cpu"


def build_name(variant: str) -> str:
    """Library name: a digest of everything the build depends on."""
    digest = hashlib.sha256()
    for path in sources(cuda=variant == "cuda") + _headers():
        digest.update(path.relative_to(source_dir()).as_posix().encode())
        digest.update(path.read_bytes())
    digest.update(repr((variant, torch.__version__, CXX_FLAGS, LD_FLAGS, CUDA_FLAGS, sys.version_info[:2])).encode())
    return f"{NAMESPACE}_{variant}_{digest.hexdigest()[:16]}"


def library_path(variant: str) -> Path:
    name = build_name(variant)
    return cache_dir() / name / f"{name}.so"


_loaded_variant: str | None = None


def loaded_variant() -> str | None:
    """The variant loaded in this process ("cpu" or "cuda"), or None."""
    return _loaded_variant


def is_built(variant: str | None = None) -> bool:
    """Whether an up-to-date build is loaded or cached (checked without compiling anything)."""
    variant = variant or default_variant()
    if _loaded_variant == variant or (_loaded_variant == "cuda" and variant == "cpu"):
        return True
    try:
        return library_path(variant).is_file()
    except OSError:
        return False


def missing_build_tools(variant: str) -> str | None:
    """Why this machine cannot build `variant` (no compiler, ninja, nvcc or sources), or None."""
    if not (source_dir() / "binding.cpp").is_file():
        return f"its sources (csrc/) are not installed (looked in {source_dir()})"
    from torch.utils.cpp_extension import get_cxx_compiler

    compiler = get_cxx_compiler()
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH; set CXX or install g++)"
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed (pip install ninja)"
    if variant == "cuda" and cuda_toolkit() is None:
        return "a CUDA build needs a CUDA torch and nvcc (set CUDA_HOME)"
    return None


def load(variant: str | None = None, *, verbose: bool = False) -> str:
    """Load the native ops (building them first if no up-to-date build is cached) and return
    the loaded variant. Raises NativeUnavailable with the reason when that is not possible."""
    global _loaded_variant
    variant = variant or default_variant()
    if variant not in ("cpu", "cuda"):
        raise ValueError(f"variant {variant!r}: expected 'cpu' or 'cuda'")
    if _loaded_variant is not None:
        if _loaded_variant == variant or _loaded_variant == "cuda":
            return _loaded_variant
        raise NativeUnavailable(
            f"the {_loaded_variant} build is already loaded in this process; a {variant} build needs a new process"
        )
    path = library_path(variant)
    if not path.is_file():
        reason = missing_build_tools(variant)
        if reason is not None:
            raise NativeUnavailable(f"the native ops are not built and cannot be built here: {reason}")
        _build(variant, path, verbose=verbose)
    try:
        torch.ops.load_library(str(path))
    except OSError as exc:
        raise NativeUnavailable(f"the native library {path} does not load: {exc}") from exc
    _loaded_variant = variant
    return variant


def _build(variant: str, path: Path, *, verbose: bool) -> None:
    from torch.utils.cpp_extension import load as load_extension

    path.parent.mkdir(parents=True, exist_ok=True)
    cuda = variant == "cuda"
    started = time.perf_counter()
    logger.info("building the native ops (%s; once, about a minute) in %s", variant, path.parent)
    try:
        # is_python_module=False: a plain library whose TORCH_LIBRARY blocks register the ops
        # when it is loaded (it is loaded again, idempotently, by the caller).
        load_extension(
            name=path.stem,
            sources=[str(s) for s in sources(cuda=cuda)],
            extra_cflags=list(CXX_FLAGS) + (["-DHIFLOW_NATIVE_WITH_CUDA"] if cuda else []),
            extra_cuda_cflags=list(CUDA_FLAGS),
            extra_ldflags=list(LD_FLAGS),
            extra_include_paths=[str(source_dir())],
            build_directory=str(path.parent),
            with_cuda=cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except (RuntimeError, OSError, ImportError) as exc:  # compiler errors arrive as RuntimeError
        raise NativeUnavailable(f"building the native ops failed ({type(exc).__name__}: {exc})".strip()) from exc
    logger.info("built the native ops in %.0f s", time.perf_counter() - started)


def load_native_ops(*, device_type: str | None = None, field: str = "backend", requested: str = "native"):
    """The torch.ops namespace of the native ops, built and loaded as needed, for tensors on
    `device_type` ("cpu", "cuda" or None = this machine's default). Failures are a
    HiFlowInputError on `field` naming the reason (the backend is never silently replaced)."""
    if device_type not in (None, "cpu", "cuda"):
        raise HiFlowInputError("device", device_type, "'cpu' or 'cuda' for the native backend")
    want = "cuda" if device_type == "cuda" else None
    if want == "cuda" and cuda_toolkit() is None and _loaded_variant != "cuda":
        raise HiFlowInputError(
            field, requested, "'ref' or 'triton' for CUDA tensors here: the native CUDA kernels need a CUDA torch and "
            "nvcc to build (set CUDA_HOME)"
        )
    try:
        load(want)
    except NativeUnavailable as exc:
        raise HiFlowInputError(field, requested, f"another backend ('ref' or 'triton'): {exc}") from exc
    return getattr(torch.ops, NAMESPACE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hiflow_fast.native",
        description="Build (if needed) and load the native ops of csrc/ into the per-user cache, and print where.",
    )
    parser.add_argument("--variant", choices=("cpu", "cuda"), default=None,
                        help="cpu, or cuda (CPU and CUDA kernels; needs a CUDA torch and nvcc). Default: "
                        f"{default_variant()} here")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    variant = args.variant or default_variant()
    try:
        load(variant, verbose=args.verbose)
    except NativeUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"native ops ({variant}) loaded from {library_path(variant)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
