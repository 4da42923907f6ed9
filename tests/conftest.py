"""Test setup: Triton runs through its CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any kernel module (and so triton) is imported.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run by bench/gpu_check)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
