"""hiflow_fast: fast HiFlow (training-free 2K/4K flow-matching generation) for Flux.

The Triton kernels live in the top-level folder kernels/ and are installed as the subpackage
`hiflow_fast.kernels`: a top-level `kernels` package would shadow huggingface's `kernels`,
which diffusers imports.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["hiflow_fast", "hiflow_fast.*"]) + ["hiflow_fast.kernels", "hiflow_fast.bench"]
# -- native backend (issue 14): csrc/ ships as package data, hiflow_fast/csrc, so that
# hiflow_fast.native can build it on first use from any install (nothing is compiled here).
packages += ["hiflow_fast.csrc"]
NATIVE_SOURCES = ["*.h", "*.cpp", "README.md", "cpu/*.h", "cpu/*.cpp", "cuda/*.cu", "cuda/*.cuh"]
# -- end native backend

setup(
    name="hiflow-fast",
    version="0.1.0",
    description="Fast, faithful HiFlow (arXiv 2504.06232) for Flux: fused kernels and a lean pipeline",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    # bench/ is installed too, so that `hiflow-fast bench NAME` works from any install.
    package_dir={"hiflow_fast.kernels": "kernels", "hiflow_fast.bench": "bench", "hiflow_fast.csrc": "csrc"},
    package_data={"hiflow_fast": ["assets/tiny_flux/*", "assets/tiny_flux/*/*"], "hiflow_fast.csrc": NATIVE_SOURCES},
    install_requires=[
        "torch>=2.11,<2.14",
        "diffusers==0.42.1",
        "numpy>=1.26,<2.4",
        "safetensors>=0.4",
        "pillow",
        "tqdm",
        # diffusers loads weights straight into place (low_cpu_mem_usage) only with accelerate,
        # and warns on every load without it; +4.3 MB installed (accelerate 3.4, psutil 0.9).
        "accelerate>=1.0,<2",
    ],
    extras_require={
        # Triton ships with CUDA torch builds; the pin is the version the kernels are tested on.
        "triton": ["triton==3.6.0"],
        "text": ["transformers>=5,<6"],
        # pytest-benchmark: the micro-benchmarks (bench/micro); tests/ runs them once at tiny sizes.
        "bench": ["nvidia-ml-py", "matplotlib", "pytest-benchmark>=5"],
        # ninja: torch.utils.cpp_extension builds the native backend with it (tests build it once).
        "test": ["pytest", "pytest-benchmark>=5", "triton==3.6.0", "ninja"],
    },
    entry_points={"console_scripts": ["hiflow-fast=hiflow_fast.cli:main"]},
)
